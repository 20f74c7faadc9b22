"""The console's parts: the epoch line, verbose mode (flag and variable), the tracking switches, Tune kept quiet.

The console of a whole run (a reduced quickstart) and the MLflow / TensorBoard records it leaves are checked
in tests/test_quickstart.py."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TRAIN_CSV, tiny_overrides
from ptm_ray.config import load_config
from ptm_ray.console import VERBOSE_ENV, epoch_line, ray_init_options, verbose

ROOT = Path(__file__).resolve().parents[1]

METRICS = {"epoch": 3, "train_loss": 0.51234, "train_accuracy": 0.8, "samples_per_s": 412.345, "epoch_time_s": 2.0,
           "val_loss": 0.61, "val_accuracy": 0.75, "val_macro_f1": 0.7, "gap_loss": 0.09766, "best_val_accuracy": 0.75,
           "trainable_params": 4680, "stop_reason": ""}


def test_epoch_line_shows_train_and_validation_metrics_gap_and_throughput_once():
    assert epoch_line(METRICS, 5) == (
        "[ptm_ray] epoch 3/5 train_loss=0.5123 train_accuracy=0.8000 val_loss=0.6100 val_accuracy=0.7500 "
        "val_macro_f1=0.7000 gap_loss=+0.0977 412.3 samples/s")
    assert epoch_line(METRICS | {"gap_loss": -0.5}, 3, early_stop=True).endswith(
        "gap_loss=-0.5000 412.3 samples/s (early stop)")


class _Terminal(io.StringIO):
    """Text written to a terminal, as tqdm sees one."""

    def isatty(self) -> bool:
        return True


def test_the_step_bar_draws_on_a_terminal_and_nothing_in_a_log():
    from ptm_ray.progress import StepBar

    terminal, log = _Terminal(), io.StringIO()
    for stream in (terminal, log):
        bar = StepBar(2, stream)
        for epoch, done in ((1, 3), (1, 10), (2, 4)):
            bar.update(epoch, done, 10)
        bar.close()
        assert bar.bar is None
    assert log.getvalue() == ""
    drawn = terminal.getvalue()
    assert re.search(r"\[ptm_ray\] epoch 1/2: +30%.* 3/10", drawn) and re.search(r"epoch 1/2: 100%.* 10/10", drawn)
    assert re.search(r"\[ptm_ray\] epoch 2/2: +40%.* 4/10", drawn), drawn


def test_the_count_bar_draws_on_a_terminal_and_nothing_in_a_log():
    from ptm_ray.progress import CountBar

    terminal, log = _Terminal(), io.StringIO()
    for stream in (terminal, log):
        with CountBar(70, "[ptm_ray] feature cache", "row", stream) as bar:
            for n in (32, 32, 6):
                bar.update(n)
    assert log.getvalue() == ""
    assert re.search(r"\[ptm_ray\] feature cache: +46%.* 32/70", terminal.getvalue())
    assert re.search(r"feature cache: 100%.* 70/70", terminal.getvalue())


def test_a_search_on_a_terminal_keeps_its_lines_and_a_bar_of_trials_finished(capsys):
    import pickle
    from types import SimpleNamespace

    from ptm_ray.progress import SearchProgress
    from ptm_ray.tune import num_trials

    assert num_trials({"a": {"grid": [1, 2]}, "b": {"grid": [1, 2, 3]}, "c": {"loguniform": [1e-4, 1e-2]}}, 2) == 12
    assert num_trials({"c": {"loguniform": [1e-4, 1e-2]}}, 5) == 5
    trials = [SimpleNamespace(trial_id=f"t{i}", status="RUNNING" if i < 2 else "PENDING", last_result={"epoch": 2},
                              local_path=f"/runs/t{i}") for i in range(4)]
    lines = {}
    for name, stream in (("terminal", _Terminal()), ("log", io.StringIO())):
        progress = SearchProgress("val_accuracy", "max", 2, total=4, stream=stream)
        progress.on_trial_result(0, trials, trials[0], {"epoch": 1, "val_accuracy": 0.5})
        progress.on_trial_result(0, trials, trials[1], {"epoch": 1, "val_accuracy": 0.25})
        progress.on_trial_complete(0, trials, trials[0])
        pickle.dumps(progress)  # Tune may pickle its callbacks: the bar is not part of that
        progress.on_experiment_end(trials)
        lines[name] = capsys.readouterr().out.splitlines()
        drawn = stream.getvalue()
        if name == "log":
            assert drawn == ""
        else:
            assert re.search(r"\[ptm_ray\] search: +25%.* 1/4 .*1 running \| best val_accuracy=0.5000 \(t0\)", drawn), drawn
    assert lines["terminal"] == lines["log"] == [  # the same lines either way
        "[ptm_ray] search: trial t0 epoch 1/2 val_accuracy=0.5000 | 0 done, 2 running, 2 pending | "
        "best val_accuracy=0.5000 (t0)",
        "[ptm_ray] search: trial t1 epoch 1/2 val_accuracy=0.2500 | 0 done, 2 running, 2 pending | "
        "best val_accuracy=0.5000 (t0)",
        "[ptm_ray] search: trial t0 finished (ran every epoch) | 1 done, 1 running, 2 pending"]


def test_a_fit_on_a_terminal_shows_rank_0s_steps_through_each_epoch(ray_cluster, tiny_text, tmp_path, monkeypatch):
    from ptm_ray.train import fit, plan_run

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    cfg = load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "bar", train__epochs=2, scaling__num_workers=1))
    fit(cfg)
    steps = math.ceil(plan_run(cfg).data.num_train_rows / cfg.train.batch_size)
    drawn = terminal.getvalue()
    # the workers' steps reached the driver's bar, each epoch to its last step
    for epoch in (1, 2):
        assert re.search(rf"\[ptm_ray\] epoch {epoch}/2: 100%.* {steps}/{steps}", drawn), re.findall(r"\[ptm_ray\] epoch [^\r\n]*", drawn)


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False),
                                             ("no", False)])
def test_the_environment_variable_turns_verbose_mode_on(monkeypatch, value, expected):
    monkeypatch.setenv(VERBOSE_ENV, value)
    assert verbose() is expected
    assert ray_init_options() == {"log_to_driver": expected}  # the workers' output reaches the console or not


# `--verbose` before or after the command sets the variable, so the Ray processes this one starts inherit it
_VERBOSE_FLAG = """
import os, sys
from ptm_ray import cli
cli._config_list = lambda args: print("VERBOSE=" + os.environ.get("PTM_RAY_VERBOSE", "unset")) or 0
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv, expected", [(["config", "list"], "unset"), (["--verbose", "config", "list"], "1")])
def test_the_verbose_flag_sets_the_variable(argv, expected):
    env = {k: v for k, v in __import__("os").environ.items() if k != VERBOSE_ENV}
    proc = subprocess.run([sys.executable, "-c", _VERBOSE_FLAG, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"VERBOSE={expected}"


def test_the_run_commands_take_verbose_after_the_command_too():
    from ptm_ray.cli import _parser

    for command in ("finetune", "search", "deploy"):
        assert _parser().parse_args([command, "--config", "x", "--verbose"]).verbose is True
        assert _parser().parse_args(["--verbose", command, "--config", "x"]).verbose is True
        assert _parser().parse_args([command, "--config", "x"]).verbose is False


def test_tracking_settings_are_checked_and_default_to_a_file_store_under_storage(tmp_path):
    from ptm_ray.tracking import mlflow_uri

    cfg = load_config(None, ["model.name=minilm-l6", f"data.train={TRAIN_CSV}", f"storage.path={tmp_path}"])
    assert (cfg.tracking.mlflow, cfg.tracking.tensorboard) == ("auto", "auto")
    assert mlflow_uri(cfg) == (tmp_path / "mlruns").as_uri()
    cfg = load_config(None, ["model.name=minilm-l6", f"data.train={TRAIN_CSV}", "tracking.uri=http://127.0.0.1:5000",
                             "tracking.mlflow=off", "tracking.tensorboard=on"])
    assert mlflow_uri(cfg) == "http://127.0.0.1:5000"
    assert (cfg.tracking.mlflow, cfg.tracking.tensorboard) == ("off", "on")  # YAML's bare off/on: booleans, mapped
    with pytest.raises(ValueError, match="tracking.mlflow='sometimes' is not allowed; choose one of auto, on, off"):
        load_config(None, ["model.name=minilm-l6", f"data.train={TRAIN_CSV}", "tracking.mlflow=sometimes"])


def test_mlflow_on_object_storage_needs_a_server(capsys):
    """MLflow's file store is a local folder: on s3:// storage `auto` says it is off and why (a fine-tune on S3 used
    to train every epoch, then die in MLflow), `on` is refused when the config loads, a server URI is used."""
    from ptm_ray.tracking import mlflow_uri, tracking_wanted

    on_s3 = ["model.name=minilm-l6", f"data.train={TRAIN_CSV}", "storage.path=s3://bucket/runs"]
    cfg = load_config(None, on_s3)
    assert mlflow_uri(cfg) == "" and tracking_wanted(cfg, "mlflow") is False
    assert ("MLflow tracking is off: storage.path=s3://bucket/runs is object storage, where MLflow's file store "
            "cannot live; set tracking.uri to an MLflow server") in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"tracking.mlflow=on needs tracking.uri \(an MLflow server, such as "
                                         r"http://mlflow:5000\) when storage.path is object storage \(s3://bucket/runs\)"):
        load_config(None, on_s3 + ["tracking.mlflow=on"])
    served = load_config(None, on_s3 + ["tracking.mlflow=on", "tracking.uri=http://127.0.0.1:5000"])
    assert mlflow_uri(served) == "http://127.0.0.1:5000" and tracking_wanted(served, "mlflow") is True
    assert mlflow_uri(load_config(None, on_s3[:2] + ["storage.path=file:///tmp/runs"])) == "file:///tmp/runs/mlruns"


# Without the tracking extra: `auto` tracks nothing, `on` stops with the line that installs it
_WITHOUT_TRACKING = """
import sys
for name in ("mlflow", "tensorboard"):
    sys.modules[name] = None
from ptm_ray.config import load_config
from ptm_ray.tracking import tracking_wanted
base = ["model.name=minilm-l6", "data.train=" + sys.argv[1]]
print("AUTO", tracking_wanted(load_config(None, base), "mlflow"), tracking_wanted(load_config(None, base), "tensorboard"))
tracking_wanted(load_config(None, base + ["tracking.mlflow=on"]), "mlflow")
"""


def test_tracking_without_the_extra():
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TRACKING, TRAIN_CSV], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert "AUTO False False" in proc.stdout
    assert proc.returncode == 1
    assert "tracking.mlflow=on needs mlflow, which comes with the 'tracking' extra: pip install 'ptm_ray[tracking]'" \
        in proc.stderr


@pytest.mark.parametrize("verbose_value, box_expected", [("0", False), ("1", True)])
def test_tune_prints_its_experiment_box_only_in_verbose_mode(ray_cluster, tmp_path, capfd, monkeypatch, verbose_value,
                                                             box_expected):
    from ray import tune

    from ptm_ray.console import quiet_tune

    monkeypatch.setenv(VERBOSE_ENV, verbose_value)
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)

    def score(config: dict) -> dict:  # defined here: pickled by value, the workers cannot import this test file
        return {"score": config["x"]}

    tuner = tune.Tuner(score, param_space={"x": tune.grid_search([1, 2])},
                       tune_config=tune.TuneConfig(metric="score", mode="max"),
                       run_config=tune.RunConfig(name="quiet", storage_path=str(tmp_path), verbose=0))
    with quiet_tune():
        best = tuner.fit().get_best_result().metrics["score"]
    out = capfd.readouterr()
    assert best == 2
    assert ("Configuration for experiment" in out.out + out.err) is box_expected, out.out[-2000:]
    assert "RAY_AIR_NEW_OUTPUT" not in __import__("os").environ  # put back as it was
