"""Ray Tune search: space validation, a small real search with ASHA, leaderboard, promotion and restore;
single-worker trials training inside the trial, multi-worker ones through Ray Train; TPE with ASHA."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptm_ray.checkpoint import load_artifact, read_meta
from ptm_ray.config import load_config
from ptm_ray.inference import predict
from ptm_ray.model_store import ModelStore
from ptm_ray.tune import (LeaderboardRow, apply_budget, best_epoch, fit_in_trials, format_leaderboard, run_search,
                          validate_search)

from conftest import TRAIN_CSV, check_classification_predictions, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _search_overrides(tiny_text, tmp_path, name, space, **extra):
    base = tiny_overrides(tiny_text["bert"], tmp_path, "unused", train__epochs=2, scaling__num_workers=1,
                          scaling__resources_per_worker="{CPU: 0.5}")
    values = {"search.space": space, "search.name": name, "search.trial_cpus": 0.5,
              "search.max_concurrent_trials": 1, "search.registry": str(tmp_path / "registry"),
              "search.registry_name": "intents", "search.grace_period": 1, "search.reduction_factor": 2}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return base + [f"{k}={v}" for k, v in values.items()]


@pytest.mark.parametrize("space, message", [
    ("{model.name: {choice: [hf:/nowhere/model]}}", "search.space.model.name: candidate 'hf:/nowhere/model'"),
    ("{model.name: {choice: [bogus]}}", "candidate 'bogus': model.name='bogus' is not a known model"),
    ("{model.freeze_depth: {choice: [1, 4]}}", "search.space.model.freeze_depth: 4 for candidate"),
    ("{optim.lr: {choice: []}}", "search.space.optim.lr.choice needs a non-empty list"),
    ("{optim.lr: {loguniform: [0, 1.0e-3]}}", "need 0 < low < high"),
    ("{optim.lrr: {choice: [0.1]}}", "search.space.optim.lrr: value 0.1 is not valid: unknown config key optim.lrr"),
    ("{optim.lr: [0.1, 0.2]}", "search.space.optim.lr must be one of"),
    ("{}", "search.space is empty"),
])
def test_bad_search_space_is_refused_before_any_trial(tiny_text, tmp_path, space, message):
    cfg = load_config(None, _search_overrides(tiny_text, tmp_path, "bad", space))
    with pytest.raises(ValueError) as e:
        validate_search(cfg)
    assert message in str(e.value)


def test_a_trials_best_epoch_is_the_latest_of_equal_scores():
    # Ray keeps the latest checkpoint of equal scores and deletes earlier ones: a trial that never left 0.125
    # was ranked by its epoch 1, whose checkpoint was gone, and the search died loading it (bench_search)
    flat = [{"epoch": e, "val_accuracy": 0.125} for e in (1, 2, 3)]
    assert best_epoch(flat, "val_accuracy", 1)["epoch"] == 3
    rising = [{"epoch": 1, "val_loss": 0.9}, {"epoch": 2, "val_loss": 0.5}, {"epoch": 3, "val_loss": 0.7}]
    assert best_epoch(rising, "val_loss", -1)["epoch"] == 2 and best_epoch(rising, "val_loss", 1)["epoch"] == 1
    assert best_epoch([], "val_loss", -1) == {}


@pytest.mark.parametrize("algorithm, space, message", [
    ("grid", "{optim.lr: {grid: [1.0e-3]}, model.freeze_depth: {choice: [0, 1]}}",
     "search.space.model.freeze_depth: search.algorithm=grid needs {grid: [...]} for every key, got {choice: ...}"),
    ("tpe", "{optim.lr: {loguniform: [1.0e-4, 1.0e-3]}, model.freeze_depth: {grid: [0, 1]}}",
     "search.space.model.freeze_depth: search.algorithm=tpe draws every point itself and cannot take a grid; "
     "use {choice: [...]}"),
])
def test_algorithm_refuses_entries_it_cannot_sample(tiny_text, tmp_path, algorithm, space, message):
    cfg = load_config(None, _search_overrides(tiny_text, tmp_path, "bad", space, search__algorithm=algorithm))
    with pytest.raises(ValueError) as e:
        validate_search(cfg)
    assert message in str(e.value)


def test_random_draws_are_fixed_by_the_seed_not_by_numpy_global_state(tiny_text, tmp_path):
    import numpy as np
    from ray import tune

    from ptm_ray.tune import _search_algorithm, build_param_space

    space = "{model.name: {grid: [hf:%s, hf:%s]}, optim.lr: {loguniform: [1.0e-5, 1.0e-3]}}" % (
        tiny_text["bert"], tiny_text["roberta"])

    def draws(seed: int) -> list[tuple[str, float]]:
        cfg = load_config(None, _search_overrides(tiny_text, tmp_path, "seeded", space, search__num_samples=2,
                                                  train__seed=seed))
        algorithm, drawn = _search_algorithm(cfg), []
        algorithm.add_configurations([tune.Experiment("seeded", run=lambda config: None, num_samples=2,
                                                      config=build_param_space(cfg.search.space))])
        while (trial := algorithm.next_trial()) is not None:
            drawn.append((trial.config["model.name"], trial.config["optim.lr"]))
            algorithm.on_trial_complete(trial.trial_id)  # max_concurrent_trials=1: the next one comes after
        return drawn

    first = draws(0)
    np.random.seed(123)  # what else the driver drew from NumPy's global generator must not matter
    np.random.rand(7)
    assert draws(0) == first and len(first) == 4 and len({lr for _, lr in first}) == 4
    assert draws(1) != first


def test_fraction_depths_fit_candidates_of_different_depths(tiny_text, tmp_path):
    space = "{model.name: {choice: [hf:%s, hf:%s]}, model.freeze_depth: {uniform: [0.0, 1.0]}}" % (
        tiny_text["bert"], tiny_text["t5"])
    depths = validate_search(load_config(None, _search_overrides(tiny_text, tmp_path, "ok", space)))
    assert sorted(depths.values()) == [3, 5]


def test_small_search_ranks_by_best_epoch_and_promotes(ray_cluster, tiny_text, tmp_path):
    space = "{model.name: {grid: [hf:%s, hf:%s]}, model.freeze_depth: {grid: [0, all]}, optim.lr: {grid: [1.0e-3, 1.0e-5]}}" % (
        tiny_text["bert"], tiny_text["gpt2"])
    cfg = load_config(None, _search_overrides(tiny_text, tmp_path, "small", space, search__top_k=2))
    result = run_search(cfg)
    board = result.leaderboard
    assert len(board) == 8 and [r.rank for r in board] == list(range(1, 9))
    assert len({r.trial_id for r in board}) == 8  # Tune's own trial ids
    scores = [r.best_score for r in board]
    assert scores == sorted(scores, reverse=True)  # ranked by each trial's best val_accuracy
    assert {r.stop_reason for r in board} <= {"completed", "stopped_by_asha", "early_stopping"}
    assert any(r.stop_reason == "stopped_by_asha" for r in board)  # ASHA halves the field after epoch 1
    assert all(r.trainable_params and r.best_epoch for r in board)
    # serving cost: every best checkpoint timed and counted (all parameters, frozen ones too)
    assert all(r.latency_ms_p50 > 0 and r.params >= r.trainable_params for r in board if r.checkpoint)
    assert {r.params for r in board if "bert" in r.model} != {r.params for r in board if "gpt2" in r.model}
    assert {r.model.split("/")[-1] for r in board} == {"bert", "gpt2"}

    rows = list(csv.DictReader(open(Path(result.experiment_path) / "leaderboard.csv")))
    assert [row["trial_id"] for row in rows] == [r.trial_id for r in board]

    # the two best trials' best checkpoints are versions 1 and 2 in the registry, with lineage
    assert [(m.name, m.version) for m in result.promoted] == [("intents", 1), ("intents", 2)]
    top = result.promoted[0]
    assert top.lineage["trial_id"] == board[0].trial_id and top.lineage["best_score"] == board[0].best_score
    artifact = load_artifact(top.path)
    texts = ["where is my order #12345", "i want my money back"]
    check_classification_predictions(artifact, texts, predict(artifact, texts))
    assert json.loads((Path(top.path) / "lineage.json").read_text())["overrides"] == board[0].overrides

    # a rerun of the trial alone from its overrides is a valid config
    rerun = load_config(None, [f"model.name=minilm-l6", f"data.train={TRAIN_CSV}", *board[0].overrides.split()])
    assert rerun.optim.lr == board[0].lr

    # promoting the same checkpoint again (a search run twice) returns its version; another one takes the next
    store = ModelStore(str(tmp_path / "registry"))
    again = store.promote(board[0].checkpoint, "intents", {"note": "again"})
    assert (again.version, again.lineage["rank"]) == (1, 1) and [v.version for v in store.versions("intents")] == [1, 2]
    other = next(r.checkpoint for r in board[2:] if r.checkpoint)
    assert store.promote(other, "intents", {"note": "third"}).version == 3
    assert store.get("intents", 1).lineage["rank"] == 1  # never overwritten


def _world_sizes(experiment: Path) -> dict[str, int]:
    """trial id -> the number of training workers its epochs reported (from each trial's result.json)."""
    sizes = {}
    for path in experiment.glob("*/result.json"):
        last = json.loads(path.read_text().splitlines()[-1])
        sizes[last["trial_id"]] = last["world_size"]
    return sizes


def test_single_worker_trials_train_in_the_trial_and_two_worker_trials_through_ray_train(ray_cluster, tiny_text,
                                                                                           tmp_path):
    space = "{scaling.num_workers: {grid: [1, 2]}}"
    cfg = load_config(None, _search_overrides(tiny_text, tmp_path, "mixed", space, train__epochs=1,
                                              search__scheduler="fifo", search__top_k=2))
    result = run_search(cfg)
    experiment = Path(result.experiment_path)
    rows = {row.overrides: row for row in result.leaderboard}
    one, two = rows["scaling.num_workers=1"], rows["scaling.num_workers=2"]
    assert _world_sizes(experiment) == {one.trial_id: 1, two.trial_id: 2}
    # two workers: a Ray Train run named after the trial, its checkpoint in that run's folder
    assert Path(two.checkpoint).is_relative_to(experiment / "trials" / two.trial_id)
    # one worker: no Train run; the checkpoint is one Tune kept in the trial's own folder
    assert not (experiment / "trials" / one.trial_id).exists()
    assert Path(one.checkpoint).parent.parent == experiment and Path(one.checkpoint).name.startswith("checkpoint_")
    # both checkpoints are whole artifacts, promoted alike
    assert len(result.promoted) == 2
    for version in result.promoted:
        artifact = load_artifact(version.path)
        texts = ["where is my order #12345"]
        check_classification_predictions(artifact, texts, predict(artifact, texts))


def _optuna_study(experiment: Path):
    """The Optuna study that the search's searcher saved in the experiment folder (OptunaSearch.save pickles
    its attributes, the study among them)."""
    (state,) = experiment.glob("searcher-state-*.pkl")
    return pickle.loads(state.read_bytes())["_ot_study"]


def _asha_stops(experiment: Path, metric: str) -> dict[str, bool]:
    """trial id -> whether ASHA's rule stops it after epoch 1 (reduction factor 2, as Tune's ``_Bracket``): its
    epoch-1 score is below the median of the epoch-1 scores of the trials created before it."""
    import numpy as np

    firsts = []
    for path in experiment.glob("*/result.json"):
        first = json.loads(path.read_text().splitlines()[0])
        # a trial's folder is "<trainable>_<trial id>_<n>_<params>...", n counting trials as Tune creates them
        number = int(path.parent.name.split(f"_{first['trial_id']}_", 1)[1].split("_")[0])
        firsts.append((number, first["trial_id"], first[metric]))
    stops, seen = {}, []
    for _, trial_id, score in sorted(firsts):
        stops[trial_id] = bool(seen) and score < np.percentile(seen, 50)
        seen.append(score)
    return stops


def test_tpe_search_with_asha_samples_continuous_learning_rates(ray_cluster, tiny_text, tmp_path):
    import optuna

    space = "{optim.lr: {loguniform: [1.0e-5, 3.0e-3]}, model.freeze_depth: {choice: [0, 1]}}"
    cfg = load_config(None, _search_overrides(tiny_text, tmp_path, "tpe", space, search__algorithm="tpe",
                                              search__num_samples=6))
    result = run_search(cfg)
    board = result.leaderboard
    shown = format_leaderboard(board, cfg.train.metric)
    assert len(board) == 6 and all(1e-5 <= r.lr <= 3e-3 for r in board) and len({r.lr for r in board}) == 6, shown
    assert {r.freeze_depth for r in board} <= {0, 1}
    # ASHA decided every trial after its first epoch, by its rule (which trials it stops depends on TPE's draws)
    stopped = {r.trial_id: r.stop_reason == "stopped_by_asha" for r in board}
    assert stopped == _asha_stops(Path(result.experiment_path), cfg.train.metric), shown
    # TPE (Optuna's study) was told the last score of every trial, those ASHA stopped included
    study = _optuna_study(Path(result.experiment_path))
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    told = {t.params["optim.lr"]: t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    lasts = [json.loads(p.read_text().splitlines()[-1]) for p in Path(result.experiment_path).glob("*/result.json")]
    assert told == {last["config"]["optim.lr"]: last[cfg.train.metric] for last in lasts}, shown


def _terminated_trials(experiment: Path) -> int:
    states = list(experiment.glob("experiment_state*.json"))
    return max((s.read_text().count("TERMINATED") for s in states), default=0)


@pytest.mark.parametrize("algorithm, space, samples", [
    ("random", "{optim.lr: {grid: [1.0e-3, 3.0e-4, 1.0e-4]}}", 1),
    ("tpe", "{optim.lr: {loguniform: [1.0e-4, 1.0e-3]}}", 3),
])
def test_interrupted_search_restores_without_rerunning_finished_trials(ray_cluster, tiny_text, tmp_path, algorithm,
                                                                       space, samples):
    import ray

    overrides = _search_overrides(tiny_text, tmp_path, "resumable", space, search__max_concurrent_trials=1,
                                  search__scheduler="fifo", search__num_samples=samples,
                                  search__algorithm=algorithm)
    command = [sys.executable, "jobs/search.py", "--config", "jobs/configs/text_search.yaml", *overrides]
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, RAY_AUTH_MODE="token")
    experiment = tmp_path / "runs" / "resumable"

    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and _terminated_trials(experiment) < 1 and driver.poll() is None:
        time.sleep(0.5)
    assert driver.poll() is None, "the search finished before it could be interrupted"
    driver.send_signal(signal.SIGKILL)  # the driver dies mid-search (our own subprocess)
    driver.wait()
    finished = {p.parent.name: p.read_text() for p in experiment.glob("*/result.json") if p.read_text().count("\n") >= 2}
    assert finished, "no trial had finished before the interruption"

    restored = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert restored.returncode == 0, restored.stdout[-2000:] + restored.stderr[-2000:]
    assert "restoring search" in restored.stdout
    for trial_dir, before in finished.items():  # finished trials were not trained again
        assert (experiment / trial_dir / "result.json").read_text() == before
    board = list(csv.DictReader(open(experiment / "leaderboard.csv")))
    assert len(board) == 3 and all(row["epochs_run"] == "2" for row in board)


def _row(trial: str, score: float, ms: float, params: int) -> LeaderboardRow:
    return LeaderboardRow(rank=0, trial_id=trial, model="m", freeze_depth=0, lr=1e-3, head_lr=None, trainable_params=1,
                          best_score=score, best_epoch=1, epochs_run=1, wall_time_s=1.0, stop_reason="completed",
                          checkpoint=f"/c/{trial}", overrides="", latency_ms_p50=ms, params=params)


def test_a_serving_budget_ranks_trials_within_it_first_and_only_they_are_promoted(tmp_path):
    rows = [_row("big", 0.9, 5.0, 10_000), _row("slow", 0.8, 50.0, 100), _row("fits", 0.7, 4.0, 100),
            _row("fits2", 0.6, 3.0, 90)]  # already ranked by score
    base = ["data.train=unused", "model.name=minilm-l6"]
    ranked = apply_budget(list(rows), load_config(None, base + ["search.max_latency_ms=10", "search.max_params=1000"]))
    assert [(r.trial_id, r.rank, r.within_budget) for r in ranked] == [
        ("fits", 1, True), ("fits2", 2, True), ("big", 3, False), ("slow", 4, False)]
    assert "over budget" in format_leaderboard(ranked, "val_accuracy").splitlines()[3]
    unbounded = apply_budget(list(rows), load_config(None, base))
    assert [r.trial_id for r in unbounded] == ["big", "slow", "fits", "fits2"] and all(r.within_budget for r in unbounded)
    with pytest.raises(ValueError, match="search.max_latency_ms=-1.0 and search.max_params=0 must be >= 0"):
        load_config(None, base + ["search.max_latency_ms=-1"])


@pytest.mark.parametrize("second, message", [
    (["storage.name=a", "scaling.num_workers=2"], "a: scaling.num_workers above 1 trains through fit"),
    (["storage.name=b"], "storage.name repeats among ['b', 'b']"),
    (["storage.name=c", "train.metric=val_loss", "train.mode=min"], "the runs differ in train.metric/mode/keep_checkpoints"),
])
def test_runs_in_trials_refuse_what_one_experiment_cannot_hold(tmp_path, second, message):
    base = ["data.train=unused", "model.name=minilm-l6", "scaling.num_workers=1", f"storage.path={tmp_path}"]
    cfgs = [load_config(None, base + ["storage.name=b"]), load_config(None, base + second)]
    with pytest.raises(ValueError) as e:
        fit_in_trials(cfgs, "study")
    assert message in str(e.value)
    assert not (tmp_path / "study").exists()  # refused before Ray or Tune wrote anything


def test_runs_in_trials_train_in_their_own_folders_and_a_rerun_restores_them(ray_cluster, tiny_text, tmp_path):
    base = tiny_overrides(tiny_text["bert"], tmp_path, "unused", train__epochs=2, scaling__num_workers=1,
                          train__max_steps_per_epoch=3, scaling__resources_per_worker="{CPU: 1}")
    cfgs = [load_config(None, base + [f"storage.name={name}", f"optim.lr={lr}"])
            for name, lr in (("fast", 3e-3), ("slow", 1e-5))]
    first = fit_in_trials(cfgs, "study")
    study = tmp_path / "runs" / "study"
    assert [Path(r.run_path) for r in first] == [study / "fast", study / "slow"]
    for result in first:  # the best checkpoint is a whole ptm_ray checkpoint in the run's own folder
        assert Path(result.best_checkpoint).parent == Path(result.run_path)
        assert [h["epoch"] for h in result.history] == [1, 2]
        assert read_meta(result.best_checkpoint)["history"][-1]["epoch"] == result.best_metrics["epoch"]
        assert "time_total_s" not in result.best_metrics  # what the run reported, not Tune's bookkeeping
    assert first[0].history != first[1].history  # each trial trained its own config
    again = fit_in_trials(cfgs, "study")  # the experiment exists: restored, finished runs kept, none retrained
    assert [r.history for r in again] == [r.history for r in first]
    assert _checkpoints(again) == _checkpoints(first)  # (a retrained run, seeded alike, would rewrite them later)


def _checkpoints(results) -> dict[str, list[tuple[str, int]]]:
    """Each run's checkpoint folders and when their ptm_ray.json was written."""
    return {r.run_path: sorted((p.name, (p / "ptm_ray.json").stat().st_mtime_ns)
                               for p in Path(r.run_path).glob("checkpoint_*")) for r in results}
