"""Data-parallel fine-tuning on Ray Train: the per-worker loop, top to bottom, and ``fit(cfg)``.

``fit`` checks config and data on the driver (no Ray work yet), then runs ``train_loop_per_worker`` on
``scaling.num_workers`` workers with a ``TorchTrainer``. Each epoch every worker trains on its shard,
validation is computed across all workers, and rank 0 writes a self-describing checkpoint that Ray keeps
or drops by the validation metric. A run that finds a checkpoint (worker restart, or the same
``storage.name`` launched again) continues after the epoch that checkpoint holds. The loop's steps are
in ``ptm_ray.worker``.

A search hands every trial the data it checked and read once (``prepare_data``), and a single-worker trial
runs the same loop inside the Tune trial itself (``fit_in_trial``) instead of starting a worker group.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ptm_ray.checkpoint import as_uri, read_meta
from ptm_ray.config import Config, config_to_dict, parse_freeze_depth, storage_path
from ptm_ray.console import epoch_line, logs_dir
from ptm_ray.data import MEDIA_BLOCK_BYTES, DataSummary, materialize_decision
from ptm_ray.feature_cache import cache_decision, prepare_cache
from ptm_ray.lora import lora_targets
from ptm_ray.models import resolve_model
from ptm_ray.tasks import task_for, tasks_for_family
from ptm_ray.worker import (RaySession, Session, TuneSession, checkpoint_and_report, record_epoch, setup_worker,
                            train_one_epoch, validate)

__all__ = ["FitResult", "PreparedData", "RunPlan", "fit", "fit_in_trial", "plan_run", "prepare_data", "run_loop",
           "train_loop_per_worker"]


@dataclass
class FitResult:
    """What a fine-tuning run produced."""

    best_checkpoint: str
    """Folder (or URI) of the best checkpoint by ``train.metric``."""
    best_metrics: dict[str, Any]
    """The metrics reported with that checkpoint."""
    history: list[dict[str, Any]]
    """Per-epoch metrics of the whole run, in order."""
    run_path: str
    """The run's folder under ``storage.path``."""
    tracking: list[str] = field(default_factory=list)
    """Where the run's MLflow run and TensorBoard events are (empty when tracking is off)."""


@dataclass(frozen=True)
class RunPlan:
    """What the driver settled before starting Ray work."""

    data: DataSummary
    num_blocks: int
    freeze_blocks: int
    feature_cache: bool = False
    """Whether the run trains on cached frozen-prefix outputs (``train.feature_cache``)."""
    feature_cache_reason: str = ""

    @property
    def labels(self) -> list[str]:
        return self.data.labels


@dataclass(frozen=True)
class PreparedData:
    """Data checked on the driver and read into Ray's object store once; runs take it by reference."""

    summary: DataSummary
    datasets: dict[str, Any]
    """``train`` and ``validation``, materialized Ray datasets (their blocks stay in the object store)."""


def prepare_data(cfg: Config) -> PreparedData:
    """Check ``cfg.data`` for ``cfg.model`` and read it into the object store, for runs that share it."""
    from ptm_ray.runtime import init_ray

    family, _ = resolve_model(cfg.model)
    task = task_for(cfg.model.task)
    summary = task.inspect(cfg, family.modality)
    init_ray()
    return PreparedData(summary, task.datasets(summary, cfg))


def plan_run(cfg: Config, data: DataSummary | None = None) -> RunPlan:
    """Check the task, the data (unless ``data`` is its summary, checked already) and the model's depth on
    the driver, before any Ray work.

    Raises:
        ValueError: for bad data, an unknown model, a task the model cannot do, a freeze depth beyond the
        model's depth or a ``model.lora`` with nothing to adapt.
    """
    family, ref = resolve_model(cfg.model)
    task = task_for(cfg.model.task)
    reason = task.unsupported_by(family)
    if reason:
        raise ValueError(f"model.task={cfg.model.task} is not available for model.name={cfg.model.name}: {reason} "
                         f"({family.name} models do {', '.join(tasks_for_family(family))})")
    if cfg.model.pooling != "cls" and family.name != "hf-text":
        raise ValueError(f"model.pooling={cfg.model.pooling} is for Hugging Face text encoders; {family.name} models "
                         f"(model.name={cfg.model.name}) pool as they were built: leave model.pooling=cls")
    summary = data or task.inspect(cfg, family.modality)
    with torch.device("meta"):  # architecture only: no weights read, no memory used
        skeleton = family.build(ref, summary.labels, cfg.model, task.head, pretrained=False)
    blocks = family.blocks(skeleton)
    num_blocks = len(blocks)
    depth = parse_freeze_depth(cfg.model.freeze_depth, num_blocks)
    if cfg.model.lora.r:  # the adapters' target layers exist above the frozen blocks (else a ValueError naming why)
        lora_targets(skeleton, blocks, depth, cfg.model.lora)
    use_cache, why = cache_decision(cfg, task, family, skeleton, depth)
    return RunPlan(summary, num_blocks, depth, use_cache, why)


HEALTH_CHECK_INTERVAL_S = "0.5"
"""How often each run's Ray Train controller polls its workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``)."""


def _run_name(cfg: Config) -> str:
    if cfg.storage.name:
        return cfg.storage.name
    stem = re.sub(r"[^A-Za-z0-9]+", "-", cfg.model.name.rsplit("/", 1)[-1]).strip("-") or "model"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def fit(cfg: Config, run_config_callbacks: list | None = None, data: PreparedData | None = None) -> FitResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with Ray Train and return the best checkpoint.

    The driver prints one line per epoch (rank 0's metrics) and feeds the trackers (``tracking.*``).

    Args:
        cfg: a validated config (``load_config``).
        run_config_callbacks: extra Ray Train callbacks (the search uses Tune's report callback).
        data: ``cfg.data`` already checked and read (``prepare_data``); read here when None.
    """
    from ptm_ray.progress import EpochStream, StepBar
    from ptm_ray.runtime import init_ray
    from ptm_ray.tracking import RunTracker

    plan = plan_run(cfg, data.summary if data else None)
    refuse_changed_resume(cfg, plan.labels)
    init_ray()
    _warn_local_storage_on_many_nodes(cfg)
    datasets = data.datasets if data else task_for(cfg.model.task).datasets(plan.data, cfg)
    loop_config = _loop_config(cfg, plan, datasets, in_process=_cache_in_driver(cfg))
    datasets = _preprocess_in_ray_data(cfg, plan, truncated_epochs(cfg, datasets), loop_config,
                                       in_search=data is not None or bool(run_config_callbacks))
    name = _run_name(cfg)
    tracker = RunTracker(cfg, name, f"{storage_path(cfg)}/{name}")
    stream = EpochStream([_epoch_printer(cfg), tracker.log_epoch], StepBar(cfg.train.epochs))
    loop_config["progress"] = stream.queue  # rank 0's steps, for the bar
    # preprocessing in Ray Data runs beside the workers every epoch, as streamed reads do
    streamed = not materialize_decision(plan.data, cfg.data)[0] or bool(loop_config["prepared_splits"])
    trainer = _trainer(cfg, name, loop_config, datasets, [stream.callback, *(run_config_callbacks or [])], streamed)
    best_path = None
    try:
        with stream:
            result = _fit_keeping_sigint(trainer)
        if not result.best_checkpoints:
            raise RuntimeError(f"run {name} produced no checkpoint (see the worker logs in {logs_dir()})")
        sign = 1 if cfg.train.mode == "max" else -1
        best, metrics = max(result.best_checkpoints, key=lambda cm: sign * cm[1][cfg.train.metric])
        best_path = as_uri(best.path, storage_path(cfg))  # Ray reports object-storage paths without their scheme
    finally:
        tracker.finish(best_path)
    history = read_meta(as_uri((result.checkpoint or best).path, storage_path(cfg)))["history"]
    return FitResult(best_path, metrics, history, as_uri(result.path, storage_path(cfg)), tracker.where())


def truncated_epochs(cfg: Config, datasets: dict) -> dict:
    """``datasets`` with streamed training data cut to the rows an epoch trains on where
    ``train.max_steps_per_epoch`` stops it early: the first ``max_steps_per_epoch x batch_size x num_workers``
    rows in the data's order, which each worker's local shuffle buffer then mixes among themselves (uncut,
    the buffer also drew from the rows after them).

    Ray Data reads ahead of the workers by what its object-store budget, the split and each worker's prefetch
    hold (about 20 blocks here); an epoch that stops early throws that read-ahead away, and on a small node the
    tasks reading it take CPU from the training steps. Cut at the rows used, the read stops where the epoch
    does (the data-scale benchmark's 30-step epochs: 52 reading tasks for 32 blocks used at 8,000 and 32,000
    files; 32 at 2,000, which the epoch reads whole). Data in the object store is left whole (nothing to read).
    Cut before any preprocessing in Ray Data (which then stops there too) and after the feature cache is built
    (from every row)."""
    from ray.data.dataset import MaterializedDataset

    steps, train = cfg.train.max_steps_per_epoch, datasets.get("train")
    if not steps or train is None or isinstance(train, MaterializedDataset):
        return datasets
    return datasets | {"train": train.limit(steps * cfg.train.batch_size * cfg.scaling.num_workers)}


def _fit_keeping_sigint(trainer: Any) -> Any:
    """``trainer.fit()``, then the caller's SIGINT handler back in place.

    Ray installs a SIGINT handler that holds the run's controller actor (and with it the workers'
    placement group) for as long as the handler stays installed: put the caller's back, so the next job in
    this process (a search after a fine-tune, say) gets those CPUs.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigint = signal.getsignal(signal.SIGINT) if in_main_thread else None
    try:
        return trainer.fit()
    except Exception as e:
        raise _plain_failure(e, trainer.run_config) from e
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_sigint)


# What a resumed run may change: its length, patience, workers and where results go. Anything else would be
# silently overridden by the saved state (the optimizer restores its own learning rates) or would not fit it.
_FIXED_ON_RESUME = ("model.", "data.", "optim.", "train.batch_size", "train.grad_accum_steps", "train.seed",
                    "train.metric", "train.mode", "train.precision", "train.feature_cache")


def refuse_changed_resume(cfg: Config, labels: list[str]) -> None:
    """Refuse to resume a run whose saved checkpoints came from a different model, data, optimizer or labels.

    Re-running with the same ``storage.name`` resumes from the latest checkpoint (Ray Train's own behaviour);
    checked on a local folder and on object storage alike.
    """
    import pyarrow.fs
    import yaml

    root = storage_path(cfg)
    fs, base = pyarrow.fs.FileSystem.from_uri(root) if "://" in root else (pyarrow.fs.LocalFileSystem(), root)
    run = f"{base}/{_run_name(cfg)}"
    found = fs.get_file_info(pyarrow.fs.FileSelector(run, allow_not_found=True))
    folders = sorted(i.path for i in found if i.type == pyarrow.fs.FileType.Directory
                     and i.base_name.startswith("checkpoint_"))
    configs = fs.get_file_info([f"{folder}/config.yaml" for folder in folders])
    saved = [info.path for info in configs if info.type == pyarrow.fs.FileType.File]
    if not saved:
        return
    with fs.open_input_stream(saved[-1]) as f:
        before = _flat(yaml.safe_load(f.read()))
    now = _flat(config_to_dict(cfg))
    changed = [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(before.keys() | now.keys())
               if key.startswith(_FIXED_ON_RESUME) and before.get(key) != now.get(key)]
    saved_labels = read_meta(as_uri(saved[-1].rsplit("/", 1)[0], root))["labels"]
    if saved_labels != labels:
        changed.append(f"labels: {saved_labels} -> {labels}")
    if changed:
        raise ValueError(f"storage.name={_run_name(cfg)!r} already holds a run ({as_uri(run, root)}) that this "
                         f"config would resume, but it differs: {'; '.join(changed)}. Resuming would ignore or break "
                         "on these; use a new storage.name, or put the values back to continue that run")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("kwargs", "task_options", "space", "resources_per_worker"):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plain_failure(error: Exception, run_config: Any) -> Exception:
    """A worker's own error, when every worker failed for a reason of ours, in place of Ray's traceback dump."""
    from ptm_ray.worker import NonFiniteLoss

    causes = list(getattr(error, "worker_failures", {}).values())
    ours = [c for c in causes if isinstance(c, NonFiniteLoss)]
    if not ours:
        return error
    return NonFiniteLoss(f"run {run_config.name} stopped: {ours[0]} (checkpoints: "
                         f"{run_config.storage_path}/{run_config.name})")


def fit_in_trial(cfg: Config, data: PreparedData | None = None) -> None:
    """Run a single-worker ``cfg`` inside the calling Ray Tune trial, with no worker group of its own.

    The trial process is the worker: the same loop as ``fit``'s, each epoch's metrics and checkpoint reported
    to Tune (``ray.tune.report``); a restored trial resumes after its latest Tune checkpoint.
    """
    if cfg.scaling.num_workers != 1:
        raise ValueError(f"scaling.num_workers={cfg.scaling.num_workers}: only a single-worker run trains inside "
                         "a Tune trial; several workers need fit (a Ray Train worker group)")
    plan = plan_run(cfg, data.summary if data else None)
    datasets = data.datasets if data else task_for(cfg.model.task).datasets(plan.data, cfg)
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    run_loop(_loop_config(cfg, plan, datasets, in_process=True), TuneSession(truncated_epochs(cfg, datasets), device))


def _cache_in_driver(cfg: Config) -> bool:
    """Whether the driver builds a feature cache itself: on a single node without GPUs, where Ray Data actors
    would run the same prefix on the same cores after starting a process each, importing torch and loading
    the model again (the quickstart's MiniLM cache: 16.1 s through two actors). On several nodes the actors
    spread the work; with GPUs they hold them."""
    import ray

    return not cfg.scaling.use_gpu and sum(1 for node in ray.nodes() if node.get("Alive")) == 1


def _loop_config(cfg: Config, plan: RunPlan, datasets: dict, in_process: bool = False) -> dict[str, Any]:
    """What every worker's loop is given: the config, the labels, the training rows, the feature cache
    (built by this process itself, ``in_process``: a trial that is its run's only worker, or a driver on a
    single CPU node)."""
    loop_config = {"cfg": config_to_dict(cfg), "labels": plan.labels, "num_train_rows": plan.data.num_train_rows,
                   "num_val_rows": plan.data.num_val_rows}
    return loop_config | _feature_cache(cfg, plan, datasets, in_process)


def _preprocess_in_ray_data(cfg: Config, plan: RunPlan, datasets: dict, loop_config: dict[str, Any],
                            in_search: bool) -> dict:
    """``datasets`` with the splits ``data.preprocess`` moves into Ray Data preprocessed there (said in one line),
    and in ``loop_config`` which splits, and the run's preprocessor for the workers to save with checkpoints."""
    import ray

    from ptm_ray.preprocess import pack_preprocessor, preprocess_datasets, preprocess_splits

    family, ref = resolve_model(cfg.model)
    task = task_for(cfg.model.task)

    def make_preprocessor() -> Any:
        with torch.device("meta"):  # the preprocessor reads the model's pretrained config only, never its weights
            skeleton = family.build(ref, plan.labels, cfg.model, task.head, pretrained=False)
        return family.preprocessor(ref, skeleton, cfg)

    workers_cpus = cfg.scaling.num_workers * cfg.scaling.resources_per_worker.get("CPU", 1.0)
    spare = ray.cluster_resources().get("CPU", 0.0) - workers_cpus
    splits, why, preprocessor = preprocess_splits(cfg, task, family, make_preprocessor,
                                                  bool(loop_config.get("feature_cache")), spare, in_search)
    loop_config["prepared_splits"] = splits
    if not splits:
        print(f"[ptm_ray] preprocessing in the training workers ({why})")
        return datasets
    print(f"[ptm_ray] preprocessing {' and '.join(splits)} data in Ray Data tasks beside the workers ({why})")
    loop_config["preprocessor"] = packed = pack_preprocessor(preprocessor)
    return preprocess_datasets(datasets, splits, family, packed)


def _epoch_printer(cfg: Config) -> Any:
    def print_epoch(metrics: dict[str, Any], checkpoint: str | None) -> None:
        print(epoch_line(metrics, cfg.train.epochs, metrics.get("stop_reason") == "early_stopping"), flush=True)

    return print_epoch


def _trainer(cfg: Config, name: str, loop_config: dict[str, Any], datasets: dict, callbacks: list,
             streamed: bool) -> Any:
    """The ``TorchTrainer`` of a run: workers, storage, checkpoint ranking by ``train.metric``, retries."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's controller looks at its workers every 2 s by default: each report (an epoch line, a
    # checkpoint) and the run's end wait for that look. 0.5 s took 3-4 s off a short run here (16 s instead of
    # 20 for two epochs of a tiny BERT). Ray hands this variable from the driver to the controller; a value the
    # user set wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    resources = dict(cfg.scaling.resources_per_worker)
    if streamed:
        resources = leave_cpus_for_data(resources, cfg.scaling.num_workers)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute=cfg.train.metric,
                                               checkpoint_score_order=cfg.train.mode),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=_shards_config(datasets["train"].context.target_max_block_size or MEDIA_BLOCK_BYTES),
    )


def _shards_config(block_bytes: int) -> Any:
    """Ray Train's ``DataConfig``, but validation split into unequal shards: every row exactly once; and data
    already in the object store cut once where whole blocks allow (``_cut_at_blocks``), not streamed through a
    split coordinator.

    Ray's default splits every dataset with ``equal=True`` (each worker the same number of rows, up to
    world size - 1 rows dropped), right for training (every worker takes the same number of steps), wrong
    for validation, whose metrics must cover every row. Workers combine their sums after their last batch,
    so shards of different sizes cost nothing.

    Streamed data may hold ``INGEST_BLOCKS`` blocks (of ``block_bytes``, the training data's) of the object
    store ahead of the workers (Ray Data's default budget is a share of the whole store, so a read ran ahead
    by the whole file)."""
    import copy

    from ray.data import ExecutionResources
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    limits = options.resource_limits
    options.resource_limits = ExecutionResources(cpu=limits.cpu, gpu=limits.gpu, memory=limits.memory,
                                                 object_store_memory=INGEST_BLOCKS * block_bytes)

    class Shards(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            cut = {name: _cut_at_blocks(ds, world_size, equal=name != "validation") for name, ds in datasets.items()}
            rest = {name: ds for name, ds in datasets.items() if name != "validation" and cut[name] is None}
            for shard, split in zip(output, super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)):
                shard.update(split)
            for name, shards in cut.items():
                for shard, split in zip(output, shards or []):
                    shard[name] = split.iterator()
            if "validation" in datasets and cut["validation"] is None:
                val = datasets["validation"]
                val = val.copy(val)  # as Ray's configure: options set here stay off the caller's dataset
                val.context.execution_options = copy.deepcopy(options)
                hints = worker_node_ids if self._enable_shard_locality else None
                for shard, split in zip(output, val.streaming_split(world_size, equal=False, locality_hints=hints)):
                    shard["validation"] = split
            return output

    return Shards(datasets_to_split=["train"], execution_options=options)


def _cut_at_blocks(dataset: Any, world_size: int, equal: bool) -> list[Any] | None:
    """``world_size`` consecutive shards of a dataset already in the object store, cut once for the whole run
    where whole blocks make them (no task: Ray's own cutting asks a CPU the workers may hold), else None
    (``streaming_split`` then: a coordinator actor per dataset, a process each, and a task every epoch).

    ``equal`` shards (training: each worker the same number of steps) are made here only for a single worker (the
    whole dataset); shards of every row once (validation, ``equal=False``) take whole blocks, balanced by rows."""
    from ray.data.dataset import MaterializedDataset

    if not isinstance(dataset, MaterializedDataset):
        return None
    if world_size == 1:
        return [dataset]
    rows = [meta.num_rows for bundle in dataset.iter_internal_ref_bundles() for meta in bundle.metadata]
    if equal or None in rows:
        return None
    total, bounds, cuts = sum(rows), list(itertools.accumulate(rows))[:-1], []
    for rank in range(1, world_size):  # each cut at the block boundary nearest an equal share
        options = [b for b in bounds if not cuts or b >= cuts[-1]] or [total]  # no boundary left: empty shards
        cuts.append(min(options, key=lambda b: abs(b - total * rank / world_size)))
    return dataset.split_at_indices(cuts)


# Streamed data is read by Ray Data tasks (a quarter of a CPU each) while the workers train.
DATA_CPUS = 0.5
# What streamed data may hold of the object store ahead of the workers, in blocks: a few blocks (thousands
# of text rows, hundreds of small images) keep them busy; more only grows with the dataset.
INGEST_BLOCKS = 4


def leave_cpus_for_data(resources: dict[str, float], num_workers: int, who: str = "workers") -> dict[str, float]:
    """``resources_per_worker`` with the CPU lowered, where the workers would hold every CPU of the cluster,
    so that streamed reads always find ``DATA_CPUS`` free; said on the console. Otherwise unchanged.

    Without it, two workers of 1 CPU on a 2-CPU node wait forever for their first batch: the read task
    that would make it waits for a CPU they hold."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    cpu = resources.get("CPU", 1.0)
    spare = total - num_workers * cpu
    if spare >= DATA_CPUS or cpu <= 0:
        return resources
    lowered = round(max(cpu - (DATA_CPUS - spare) / num_workers, 0.05), 3)
    print(f"[ptm_ray] streamed data: each of the {num_workers} {who} reserves {lowered:g} CPU instead of {cpu:g}, "
          f"so that Ray Data's reads find {DATA_CPUS:g} of the cluster's {total:g} CPUs free")
    return resources | {"CPU": lowered}


def _feature_cache(cfg: Config, plan: RunPlan, datasets: dict, in_process: bool = False) -> dict[str, Any]:
    """Build or reuse the frozen-prefix cache when the plan allows it; what the loop needs to read it."""
    if not plan.feature_cache:
        if plan.freeze_blocks > 0:
            print(f"[ptm_ray] feature cache off: {plan.feature_cache_reason}")
        return {"feature_cache": None, "feature_cache_bytes": 0, "feature_cache_build_s": 0.0}
    family, ref = resolve_model(cfg.model)
    info = prepare_cache(cfg, family, ref, plan.labels, plan.freeze_blocks, plan.num_blocks, plan.data, datasets,
                         f"{storage_path(cfg)}/feature_cache", in_process)
    how = f"built in {info.build_s:.1f} s" if info.built else "reused"
    print(f"[ptm_ray] feature cache {how}: {info.path} ({info.size_bytes / 1e6:.1f} MB), "
          f"{plan.freeze_blocks}/{plan.num_blocks} frozen blocks computed once")
    return {"feature_cache": info.path, "feature_cache_bytes": info.size_bytes,
            "feature_cache_build_s": info.build_s if info.built else 0.0}


def _warn_local_storage_on_many_nodes(cfg: Config) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and "://" not in cfg.storage.path:
        print(f"[ptm_ray] warning: storage.path={cfg.storage.path} is a local path but the cluster has {len(nodes)} "
              "nodes: checkpoints written on one node are not visible on the others unless this path is a shared "
              "mount (NFS) on every node. Use storage.path=s3://<bucket>/<prefix> (or gs://, or an NFS path).")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One data-parallel worker of a Ray Train worker group: ``run_loop`` in a ``RaySession``."""
    run_loop(loop_config, RaySession())


def run_loop(loop_config: dict[str, Any], session: Session) -> None:
    """One worker: set up (build or restore, freeze, optimizer), then per epoch train on its shard, validate
    across all workers, record the epoch, checkpoint and report, and stop early if due."""
    worker = setup_worker(loop_config, session)
    for epoch in worker.epochs():
        train = train_one_epoch(worker, epoch)
        val = validate(worker)
        metrics = record_epoch(worker, epoch, train, val)
        checkpoint_and_report(worker, metrics)
        if worker.stopper.should_stop:
            break
