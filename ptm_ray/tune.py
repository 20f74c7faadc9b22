"""Ray Tune search over candidate models, freezing depths, LoRA ranks and learning rates; leaderboard; promotion.

Each trial is a Tune function that turns its sampled dotted overrides into a config. The data is checked
and read into the object store once per search and every trial takes it by reference. A single-worker
trial then trains inside the trial process itself (``fit_in_trial``: no worker group to start, epochs and
checkpoints reported straight to Tune); a multi-worker trial calls ``fit`` (a real data-parallel
TorchTrainer run named after the trial, so a restored trial resumes its own Train run; its epochs reach
Tune through ``TuneReportCallback``). ASHA stops weak trials at epoch boundaries and frees their resources;
trials are drawn at random, as a full grid, or by Optuna's TPE (``search.algorithm``). The leaderboard
ranks trials by their *best* epoch, and the top k best checkpoints are promoted to the model registry with
their lineage. Trials on a frozen prefix share its feature cache (built by the first, under the search).

``fit_in_trials`` runs a list of fixed single-worker configs the same way, one trial each (the quickstart's
pretrained-vs-scratch and data-efficiency runs), with ``fit``'s console lines and trackers.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ptm_ray.checkpoint import as_uri, read_meta
from ptm_ray.config import (Config, config_from_dict, config_to_dict, format_overrides, parse_freeze_depth, storage_path,
                            with_overrides)
from ptm_ray.data import materialize_decision
from ptm_ray.model_store import ModelStore, ModelVersion
from ptm_ray.train import (FitResult, PreparedData, fit, fit_in_trial, leave_cpus_for_data, plan_run,
                           prepare_data)

__all__ = ["LeaderboardRow", "SearchResult", "best_epoch", "build_param_space", "fit_in_trials", "leaderboard", "promote",
           "run_search", "validate_search"]

_DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
# Keys whose value changes what the datasets hold: a search over one of them reads the data in every trial.
_DATA_KEYS = ("data.", "model.task", "train.seed")


@dataclass
class LeaderboardRow:
    """One trial, summarised by its best epoch."""

    rank: int
    trial_id: str
    model: str
    freeze_depth: Any
    lr: float
    head_lr: float | None
    trainable_params: int | None
    best_score: float | None
    best_epoch: int | None
    epochs_run: int
    wall_time_s: float
    stop_reason: str
    checkpoint: str | None
    overrides: str  # "key=value ..." to rerun this trial alone
    latency_ms_p50: float | None = None  # single-input prediction of the best checkpoint, on this machine
    params: int | None = None  # all parameters of the model (what serving holds in memory)
    within_budget: bool = True  # search.max_latency_ms / search.max_params
    lora_r: int = 0  # model.lora.r: 0 without adapters


@dataclass
class SearchResult:
    """A finished search: its folder, the ranked leaderboard and the promoted registry versions."""

    experiment_path: str
    leaderboard: list[LeaderboardRow]
    promoted: list[ModelVersion]
    metric: str
    mode: str
    tracking: list[str] = field(default_factory=list)
    """Where the search's MLflow parent run is (empty when tracking is off)."""


def _spec(key: str, spec: Any) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _DISTRIBUTIONS:
        raise ValueError(f"search.space.{key} must be one of {{{'|'.join(_DISTRIBUTIONS)}: [...]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ValueError(f"search.space.{key}.{kind} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"search.space.{key}.{kind} needs [low, high] numbers, got {values!r}")
        if not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
            raise ValueError(f"search.space.{key}.{kind}={values}: need 0 < low < high" if kind == "loguniform"
                             else f"search.space.{key}.{kind}={values}: need low < high")
    return kind, values


def _examples(kind: str, values: list) -> list:
    """Values that stand for a distribution when checking it: every choice, or both ends of a range."""
    if kind in ("choice", "grid"):
        return values
    return [values[0], values[1] - 1] if kind == "randint" else [float(values[0]), float(values[1])]


def validate_search(cfg: Config) -> dict[str, list]:
    """Check the search space before any trial starts; return, per candidate model, its depth.

    Refuses unknown keys, empty choices, bad ranges, unknown candidates and freeze depths beyond a
    candidate's depth, each with the dotted key named.
    """
    space = cfg.search.space
    if not space:
        raise ValueError("search.space is empty: give at least one dotted key to search, e.g. "
                         "search.space={optim.lr: {loguniform: [1e-5, 1e-3]}}")
    if cfg.data.preprocess == "ray_data" or "data.preprocess" in space:
        # the trials hold the CPUs between them (each its own share): Ray Data tasks beside them could wait forever
        raise ValueError("data.preprocess=ray_data is not available in a search: its trials share the CPUs the Ray "
                         "Data tasks would need; set data.preprocess=auto or workers (and leave it out of search.space)")
    examples = {}
    for key, spec in space.items():
        if key.startswith("search."):
            raise ValueError(f"search.space.{key}: the search settings themselves cannot be searched")
        kind, values = _spec(key, spec)
        _check_algorithm(cfg.search.algorithm, key, kind)
        examples[key] = _examples(kind, values)
        for value in examples[key]:
            try:
                with_overrides(cfg, {key: value})
            except ValueError as e:
                raise ValueError(f"search.space.{key}: value {value!r} is not valid: {e}") from None
    depths = {}
    lora = [r for r in examples.get("model.lora.r", [cfg.model.lora.r]) if r][:1]  # checks the adapters' targets
    for name in examples.get("model.name", [cfg.model.name]):
        try:
            plan = plan_run(with_overrides(cfg, {"model.name": name} | ({"model.lora.r": lora[0]} if lora else {})))
        except ValueError as e:
            raise ValueError(f"search.space.model.name: candidate {name!r}: {e}") from None
        for depth in examples.get("model.freeze_depth", [cfg.model.freeze_depth]):
            try:
                parse_freeze_depth(depth, plan.num_blocks)
            except ValueError as e:
                raise ValueError(f"search.space.model.freeze_depth: {depth!r} for candidate {name!r}: {e}") from None
        depths[name] = plan.num_blocks
    return depths


def _check_algorithm(algorithm: str, key: str, kind: str) -> None:
    """A grid search needs grids only; TPE draws every point itself and cannot take a grid."""
    if algorithm == "grid" and kind != "grid":
        raise ValueError(f"search.space.{key}: search.algorithm=grid needs {{grid: [...]}} for every key, got "
                         f"{{{kind}: ...}}; use search.algorithm=random (or tpe) to draw from it")
    if algorithm == "tpe" and kind == "grid":
        raise ValueError(f"search.space.{key}: search.algorithm=tpe draws every point itself and cannot take a "
                         "grid; use {choice: [...]} (TPE learns which choices score best)")


def build_param_space(space: dict[str, Any]) -> dict[str, Any]:
    """The Tune param space for the dotted keys (flat: Tune's config of a trial is its overrides)."""
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, (kind, values) in ((k, _spec(k, s)) for k, s in space.items())}


def num_trials(space: dict[str, Any], num_samples: int) -> int:
    """How many trials Tune runs: ``num_samples`` of every combination of the grids (as ``tune.grid_search``)."""
    return num_samples * math.prod(len(values) for kind, values in (_spec(k, s) for k, s in space.items())
                                   if kind == "grid")


def _in_trial(cfg: Config) -> bool:
    """Whether this trial trains inside the Tune trial process (a single worker) rather than a worker group."""
    return cfg.search.in_trial and cfg.scaling.num_workers == 1


def _trial(overrides: dict[str, Any], base: dict[str, Any], trials_path: str, data: PreparedData | None) -> None:
    """One Tune trial: the base config plus this trial's overrides, trained in this process (one worker) or
    by a Ray Train worker group (several), on the search's shared data."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = with_overrides(config_from_dict(base), dict(overrides))
    cfg.storage.path = trials_path
    cfg.storage.name = ray.tune.get_context().get_trial_id()  # a restored trial resumes its own Train run
    cfg.tracking.mlflow = cfg.tracking.tensorboard = "off"  # Tune's callbacks track trials (run_search)
    if _in_trial(cfg):
        fit_in_trial(cfg, data)
    else:
        fit(cfg, run_config_callbacks=[TuneReportCallback()], data=data)


def _trial_resources(cfg: Config, streamed: bool = False) -> Callable[[dict[str, Any]], Any]:
    """Per trial, what Tune reserves: the worker's resources when the trial trains itself, else
    ``search.trial_cpus`` for a driver that waits on its worker group. Trials that train themselves on
    streamed data leave Ray Data's reads a share of the CPUs (``leave_cpus_for_data``)."""
    from ray.tune import PlacementGroupFactory

    base = config_to_dict(cfg)
    cpu = {"CPU": cfg.scaling.resources_per_worker.get("CPU", 1.0)}
    if streamed:
        cpu = leave_cpus_for_data(cpu, cfg.search.max_concurrent_trials, "concurrent trials")

    def resources(overrides: dict[str, Any]) -> PlacementGroupFactory:
        trial = with_overrides(config_from_dict(base), dict(overrides))
        if not _in_trial(trial):
            return PlacementGroupFactory([{"CPU": trial.search.trial_cpus}])
        return _worker_bundle(trial, cpu)

    return resources


def _worker_bundle(cfg: Config, cpu: dict[str, float]) -> Any:
    """The placement of a trial that is its run's only worker: the worker's resources (``cpu`` overriding
    its CPU), and a GPU when the run uses one."""
    from ray.tune import PlacementGroupFactory

    bundle = {"CPU": 1.0, **cfg.scaling.resources_per_worker, **cpu}
    if cfg.scaling.use_gpu:
        bundle.setdefault("GPU", 1.0)
    return PlacementGroupFactory([bundle])


def _shared_data(cfg: Config) -> PreparedData | None:
    """The search's data, checked and read once for every trial; None when the space changes the data."""
    searched = [key for key in cfg.search.space if key.startswith(_DATA_KEYS)]
    if searched:
        print(f"[ptm_ray] the space searches {', '.join(searched)}: every trial reads its own data")
        return None
    return prepare_data(cfg)


def _search_algorithm(cfg: Config) -> Any:
    """Tune's search algorithm for ``search.algorithm``, seeded by ``train.seed``: Tune's variant generator
    (``random``, ``grid``), which runs at most ``search.max_concurrent_trials`` at once itself, or Optuna's TPE.

    TPE starts from a few random trials (a third of the budget, 2 to 10) before it models the scores.
    """
    if cfg.search.algorithm != "tpe":
        from ray.tune.search import BasicVariantGenerator

        # unseeded, its draws came from NumPy's global generator: whatever the driver had drawn before
        return BasicVariantGenerator(max_concurrent=cfg.search.max_concurrent_trials or 0, random_state=cfg.train.seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    startup = min(10, max(2, cfg.search.num_samples // 3))
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.train.seed, n_startup_trials=startup))


def _experiment_name(cfg: Config) -> str:
    return cfg.search.name or f"search-{time.strftime('%Y%m%d-%H%M%S')}"


def run_search(cfg: Config) -> SearchResult:
    """Run (or, when the experiment exists, restore) the search, then rank and promote.

    Raises:
        ValueError: for a bad space or config, before any trial starts.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ptm_ray.console import quiet_tune, verbose
    from ptm_ray.progress import SearchProgress
    from ptm_ray.runtime import init_ray
    from ptm_ray.tracking import SearchTracker, allow_file_store, mlflow_uri

    validate_search(cfg)
    init_ray()
    name = _experiment_name(cfg)
    root = storage_path(cfg)
    experiment = f"{root}/{name}"
    metric, mode = cfg.train.metric, cfg.train.mode
    shared = _shared_data(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=config_to_dict(cfg), trials_path=f"{experiment}/trials", data=shared),
        _trial_resources(cfg, streamed=shared is not None and not materialize_decision(shared.summary, cfg.data)[0]),
    )
    tracker = None
    if tune.Tuner.can_restore(experiment):
        print(f"[ptm_ray] restoring search {experiment}: finished trials are kept, unfinished ones resume")
        allow_file_store(mlflow_uri(cfg))  # the restored trials' MLflow callback logs to the same store
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tracker = SearchTracker(cfg, name, experiment)
        scheduler = (ASHAScheduler(max_t=cfg.train.epochs, grace_period=cfg.search.grace_period,
                                   reduction_factor=cfg.search.reduction_factor)
                     if cfg.search.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=build_param_space(cfg.search.space),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=cfg.search.num_samples,
                                        search_alg=_search_algorithm(cfg), scheduler=scheduler,
                                        # the variant generator limits itself (Tune wraps only searchers)
                                        max_concurrent_trials=cfg.search.max_concurrent_trials
                                        if cfg.search.algorithm == "tpe" else None, reuse_actors=True),
            run_config=_run_config(cfg, name, root, verbose=None if verbose() else 0,
                                   callbacks=[SearchProgress(metric, mode, cfg.train.epochs,
                                                              num_trials(cfg.search.space, cfg.search.num_samples)),
                                               *tracker.callbacks()]),
        )
    with quiet_tune():
        grid = tuner.fit()
    board = apply_budget(measure_serving_cost(leaderboard(grid, cfg), shared or prepare_data(cfg)), cfg)
    csv_path = write_leaderboard(board, Path(experiment) if "://" not in experiment else Path(root) / name)
    promoted = promote(board, cfg, experiment)
    if tracker is not None:
        tracker.finish(csv_path, board[0].best_score if board else None, promoted[0].path if promoted else None)
    return SearchResult(experiment, board, promoted, metric, mode, tracker.where() if tracker else [])


def _run_config(cfg: Config, name: str, root: str, verbose: int | None, callbacks: list) -> Any:
    """Where the experiment lives, its console and tracking callbacks; which checkpoints of a trial that trains
    itself Tune keeps (the best by ``train.metric``, and the latest to resume from) and how often it restarts it
    after a failure (a worker group retries on its own: ``scaling.max_failures`` counts once)."""
    from ray import tune

    return tune.RunConfig(
        name=name, storage_path=root, verbose=verbose, callbacks=callbacks,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                checkpoint_score_attribute=cfg.train.metric,
                                                checkpoint_score_order=cfg.train.mode),
        failure_config=tune.FailureConfig(max_failures=cfg.scaling.max_failures if _in_trial(cfg) else 0))


def fit_in_trials(cfgs: list[Config], name: str) -> list[FitResult]:
    """Fine-tune single-worker runs one after another as the trials of one Tune experiment, each training inside
    its trial (``fit_in_trial``) on data the driver checked and read first; a ``FitResult`` per run, in order.

    ``fit`` starts a Ray Train controller and a worker process per run, each importing torch and the model's
    libraries (about 10 s of a short run on 2 CPUs, ``bench/bench_fit_overhead.py``); here Tune starts one
    trial process and reuses it for every run (``reuse_actors``). One run at a time, so that their epoch times
    compare as separate fits' would. Each run keeps its own folder, ``<storage.path>/<name>/<storage.name>``,
    and the driver prints its epochs and feeds its trackers as ``fit`` does (``RunsProgress``). An experiment
    that exists is restored: finished runs are kept, unfinished ones resume.

    Raises:
        ValueError: a run with several workers (``fit`` runs those), runs sharing a ``storage.name``, or runs
        with different ``storage.path`` or checkpoint ranking (one experiment keeps checkpoints one way).
        RuntimeError: naming the run that failed and where its error is.
    """
    from ray import tune

    from ptm_ray.console import quiet_tune, verbose
    from ptm_ray.progress import RunsProgress, reported_metrics
    from ptm_ray.runtime import init_ray
    from ptm_ray.tracking import mlflow_uri, tracking_wanted

    runs = {cfg.storage.name: cfg for cfg in cfgs}
    if len(runs) != len(cfgs):
        raise ValueError(f"fit_in_trials: storage.name repeats among {[c.storage.name for c in cfgs]}")
    several = [run for run, cfg in runs.items() if cfg.scaling.num_workers != 1]
    if several:
        raise ValueError(f"{', '.join(several)}: scaling.num_workers above 1 trains through fit (a Ray Train worker "
                         "group); only single-worker runs train inside Tune trials")
    for what, values in (("storage.path", {storage_path(c) for c in cfgs}),
                         ("train.metric/mode/keep_checkpoints",
                          {(c.train.metric, c.train.mode, c.train.keep_checkpoints) for c in cfgs})):
        if len(values) > 1:
            raise ValueError(f"fit_in_trials: the runs differ in {what} ({sorted(map(str, values))}); one "
                             "experiment holds them all")
    first = cfgs[0]
    root = storage_path(first)
    experiment = f"{root}/{name}"
    init_ray()
    data = {run: prepare_data(cfg) for run, cfg in runs.items()}  # bad data fails here, before any trial
    placement = {}
    for run, cfg in runs.items():
        streamed = not materialize_decision(data[run].summary, cfg.data)[0]
        cpu = {"CPU": cfg.scaling.resources_per_worker.get("CPU", 1.0)}
        placement[run] = _worker_bundle(cfg, leave_cpus_for_data(cpu, 1, "trial") if streamed else cpu)
    trainable = tune.with_resources(tune.with_parameters(_run_in_trial, runs=runs, data=data),
                                    lambda config: placement[config["run"]])
    if tune.Tuner.can_restore(experiment):
        print(f"[ptm_ray] restoring {experiment}: finished runs are kept, unfinished ones resume")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        run_config = _run_config(first, name, root, verbose=None if verbose() else 0, callbacks=[RunsProgress(runs)])
        run_config.failure_config = tune.FailureConfig(max_failures=max(c.scaling.max_failures for c in cfgs))
        tuner = tune.Tuner(trainable, param_space={"run": tune.grid_search(list(runs))}, run_config=run_config,
                           tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True,
                                                       trial_dirname_creator=_run_folder_name))
    with quiet_tune():
        grid = tuner.fit()
    results = {}
    for result in grid:
        run = result.config["run"]
        cfg = runs[run]
        if result.error is not None or not result.best_checkpoints:
            raise RuntimeError(f"run {run} failed: {result.error or 'it reported no checkpoint'} (its trial's "
                               f"folder: {result.path})")
        sign = 1 if cfg.train.mode == "max" else -1
        best, metrics = max(result.best_checkpoints, key=lambda cm: (sign * cm[1][cfg.train.metric], cm[1]["epoch"]))
        run_path = as_uri(result.path, root)
        tracking = ([f"MLflow run {run} in {mlflow_uri(cfg)}"] if tracking_wanted(cfg, "mlflow") else []) + \
            ([f"TensorBoard events in {run_path}/tensorboard"]
             if tracking_wanted(cfg, "tensorboard") and "://" not in run_path else [])
        history = read_meta(as_uri(result.checkpoint.path, root))["history"]
        results[run] = FitResult(as_uri(best.path, root), reported_metrics(metrics), history, run_path, tracking)
    return [results[run] for run in runs]


def _run_in_trial(config: dict[str, Any], runs: dict[str, Config], data: dict[str, PreparedData]) -> None:
    """One run of ``fit_in_trials``: its config trained in this trial process on the data the driver read."""
    cfg = runs[config["run"]]
    tracked = with_overrides(cfg, {"tracking.mlflow": "off", "tracking.tensorboard": "off"})  # the driver tracks
    fit_in_trial(tracked, data[config["run"]])


def _run_folder_name(trial: Any) -> str:
    return trial.config["run"]


def _stop_reason(result, history: list[dict], epochs: int) -> str:
    if result.error is not None:
        return "error"
    if history and history[-1].get("stop_reason") == "early_stopping":
        return "early_stopping"
    return "completed" if len(history) >= epochs else "stopped_by_asha"


def best_epoch(history: list[dict[str, Any]], metric: str, sign: int) -> dict[str, Any]:
    """The epoch with the best ``metric`` (``sign`` 1: highest), the latest of equal ones: Ray keeps the latest
    checkpoint among equal scores and deletes earlier ones beyond ``keep_checkpoints``, so the first of equal
    epochs may have no checkpoint left. ``{}`` for an empty history."""
    return max(history, key=lambda h: (sign * h[metric], h.get("epoch", 0))) if history else {}


def leaderboard(grid, cfg: Config) -> list[LeaderboardRow]:
    """Rank the trials of a ``ResultGrid`` by each trial's best ``train.metric`` (not its last)."""
    metric, sign = cfg.train.metric, (1 if cfg.train.mode == "max" else -1)
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        history = frame.to_dict("records") if frame is not None and metric in frame else []
        scored = [h for h in history if h.get(metric) is not None and not math.isnan(h[metric])]
        best = best_epoch(scored, metric, sign)
        overrides = dict(result.config or {})
        trial_cfg = with_overrides(cfg, overrides)
        rows.append(LeaderboardRow(
            rank=0,
            trial_id=str((result.metrics or {}).get("trial_id") or Path(result.path).name),
            model=trial_cfg.model.name,
            freeze_depth=trial_cfg.model.freeze_depth,
            lr=trial_cfg.optim.lr,
            head_lr=trial_cfg.optim.head_lr,
            trainable_params=best.get("trainable_params"),
            best_score=best.get(metric),
            best_epoch=best.get("epoch"),
            epochs_run=len(history),
            wall_time_s=float(history[-1].get("time_total_s", 0.0)) if history else 0.0,
            stop_reason=_stop_reason(result, history, cfg.train.epochs),
            checkpoint=_checkpoint_uri(best.get("checkpoint_path") or _tune_checkpoint(result, best.get("epoch")), cfg),
            overrides=" ".join(format_overrides(overrides)),
            lora_r=trial_cfg.model.lora.r,
        ))
    rows.sort(key=lambda r: (r.best_score is None, -sign * (r.best_score or 0.0)))
    for rank, row in enumerate(rows, 1):
        row.rank = rank
    return rows


def measure_serving_cost(rows: list[LeaderboardRow], data: PreparedData) -> list[LeaderboardRow]:
    """Each trial's best checkpoint timed on one validation input (p50) and its parameters counted."""
    from ptm_ray.serving_cost import measure

    sample = data.datasets["validation"].take(1)[0]["input"]
    for row in rows:
        if row.checkpoint:
            cost = measure(row.checkpoint, sample)
            row.latency_ms_p50, row.params = cost.latency_ms_p50, cost.params
    return rows


def apply_budget(rows: list[LeaderboardRow], cfg: Config) -> list[LeaderboardRow]:
    """Rows within ``search.max_latency_ms`` / ``search.max_params`` first (each part still ranked by score)."""
    budget_ms, budget_params = cfg.search.max_latency_ms, cfg.search.max_params
    for row in rows:
        slow = budget_ms > 0 and (row.latency_ms_p50 is None or row.latency_ms_p50 > budget_ms)
        big = budget_params > 0 and (row.params is None or row.params > budget_params)
        row.within_budget = not (slow or big)
    rows.sort(key=lambda r: not r.within_budget)  # stable: the score order holds inside each part
    for rank, row in enumerate(rows, 1):
        row.rank = rank
    return rows


def _checkpoint_uri(path: str | None, cfg: Config) -> str | None:
    """Ray reports checkpoints on object storage without the scheme: put it back, so promotion can read them."""
    return as_uri(path, storage_path(cfg)) if path else None


def _tune_checkpoint(result, epoch: int | None) -> str | None:
    """The folder of the checkpoint Tune kept for ``epoch`` of a trial that trained itself."""
    for checkpoint, metrics in result.best_checkpoints or []:
        if epoch is not None and metrics.get("epoch") == epoch:
            return checkpoint.path
    return None


def format_leaderboard(rows: list[LeaderboardRow], metric: str) -> str:
    """A readable fixed-width table of the leaderboard."""
    header = f"{'rank':>4}  {'trial':<10} {'model':<28} {'freeze':>6} {'lora_r':>6} {'lr':>9} {'head_lr':>9} {'trainable':>11} " \
             f"{'best ' + metric:>18} {'@epoch':>6} {'epochs':>6} {'wall_s':>7} {'p50_ms':>7} {'params':>11}  stop"
    lines = [header]
    for r in rows:
        model = r.model if len(r.model) <= 28 else "..." + r.model[-25:]
        score = f"{r.best_score:.4f}" if r.best_score is not None else "-"
        lines.append(f"{r.rank:>4}  {r.trial_id:<10} {model:<28} {str(r.freeze_depth):>6} {r.lora_r:>6} {r.lr:>9.2e} "
                     f"{(r.head_lr or r.lr):>9.2e} {r.trainable_params or 0:>11,} {score:>18} {r.best_epoch or '-':>6} "
                     f"{r.epochs_run:>6} {r.wall_time_s:>7.1f} {_number(r.latency_ms_p50, '.1f'):>7} "
                     f"{_number(r.params, ','):>11}  {r.stop_reason}{'' if r.within_budget else ', over budget'}")
    return "\n".join(lines)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_leaderboard(rows: list[LeaderboardRow], folder: Path) -> Path:
    """Write ``leaderboard.csv`` into the experiment folder (local experiments); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "leaderboard.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]) if rows else LeaderboardRow.__annotations__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return path


def promote(rows: list[LeaderboardRow], cfg: Config, experiment: str) -> list[ModelVersion]:
    """Copy the best checkpoints of the top ``search.top_k`` trials into the registry as new versions."""
    registry = ModelStore(cfg.search.registry)
    name = cfg.search.registry_name or Path(experiment).name
    promoted = []
    for row in [r for r in rows if r.checkpoint and r.within_budget][: cfg.search.top_k]:
        lineage = {"experiment": experiment, "trial_id": row.trial_id, "rank": row.rank, "overrides": row.overrides,
                   "metric": cfg.train.metric, "mode": cfg.train.mode, "best_score": row.best_score,
                   "best_epoch": row.best_epoch, "latency_ms_p50": row.latency_ms_p50, "params": row.params}
        promoted.append(registry.promote(row.checkpoint, name, lineage))
    return promoted
