"""Data-parallel fine-tuning on Ray Train: the per-worker loop, top to bottom, and ``fit(cfg)``.

``fit`` checks config and data on the driver (no Ray work yet), then runs ``train_loop_per_worker`` on
``scaling.num_workers`` workers with a ``TorchTrainer``. Each epoch every worker trains on its shard,
validation is computed across all workers, and rank 0 writes a self-describing checkpoint that Ray keeps
or drops by the validation metric. A run that finds a checkpoint (worker restart, or the same
``storage.name`` launched again) continues after the epoch that checkpoint holds.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptm_ray.checkpoint import load_train_state, read_meta, save_checkpoint
from ptm_ray.config import Config, config_from_dict, config_to_dict, parse_freeze_depth
from ptm_ray.data import DataSummary
from ptm_ray.feature_cache import FeatureStore, cache_decision, prepare_cache
from ptm_ray.freeze import freeze, param_groups, parameter_counts, set_train_mode
from ptm_ray.models import resolve_model
from ptm_ray.tasks import WorkerContext, all_reduce, task_for
from ptm_ray.tasks.classification import classification_metrics

__all__ = ["FitResult", "classification_metrics", "fit", "plan_run", "storage_path", "train_loop_per_worker"]


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


def plan_run(cfg: Config) -> RunPlan:
    """Check the data and the model's depth on the driver, before any Ray work.

    Raises:
        ValueError: for bad data, an unknown model or a freeze depth beyond the model's depth.
    """
    adapter, ref = resolve_model(cfg.model)
    supported = getattr(adapter, "tasks", ("classification",))
    if cfg.model.task not in supported:
        raise ValueError(f"model.task={cfg.model.task} is not available for model.name={cfg.model.name} "
                         f"({adapter.family} models do {', '.join(supported)})")
    summary = task_for(cfg.model.task).inspect(cfg.data, adapter.modality)
    with torch.device("meta"):  # architecture only: no weights read, no memory used
        skeleton = adapter.build(ref, summary.labels, cfg.model, pretrained=False)
    num_blocks = len(adapter.blocks(skeleton))
    depth = parse_freeze_depth(cfg.model.freeze_depth, num_blocks)
    use_cache, reason = cache_decision(cfg, adapter, skeleton, depth)
    return RunPlan(summary, num_blocks, depth, use_cache, reason)


def storage_path(cfg: Config) -> str:
    """``storage.path`` as Ray Train wants it: a URI as given, a local folder made absolute."""
    return cfg.storage.path if "://" in cfg.storage.path else str(Path(cfg.storage.path).expanduser().resolve())


def _run_name(cfg: Config) -> str:
    if cfg.storage.name:
        return cfg.storage.name
    stem = re.sub(r"[^A-Za-z0-9]+", "-", cfg.model.name.rsplit("/", 1)[-1]).strip("-") or "model"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def fit(cfg: Config, run_config_callbacks: list | None = None) -> FitResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with Ray Train and return the best checkpoint.

    Args:
        cfg: a validated config (``load_config``).
        run_config_callbacks: extra Ray Train callbacks (the search uses Tune's report callback).
    """
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ptm_ray.runtime import init_ray

    plan = plan_run(cfg)
    init_ray()
    _warn_local_storage_on_many_nodes(cfg)
    name = _run_name(cfg)
    datasets = task_for(cfg.model.task).datasets(plan.data, cfg.data, cfg.train.seed)
    loop_config = {
        "cfg": config_to_dict(cfg),
        "labels": plan.labels,
        "num_train_rows": datasets["train"].count(),
    } | _feature_cache(cfg, plan, datasets)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=dict(cfg.scaling.resources_per_worker),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path(cfg),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.train.metric,
                checkpoint_score_order=cfg.train.mode,
            ),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=run_config_callbacks,
        ),
        datasets=datasets,
        # Training data is split across workers; every worker sees all of validation and evaluates
        # its stride of batches, so the metrics cover every validation row exactly once.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    # Ray installs a SIGINT handler that holds the run's controller actor (and with it the workers'
    # placement group) for as long as the handler stays installed: put the caller's back, so the next
    # job in this process (a search after a fine-tune, say) gets those CPUs.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigint = signal.getsignal(signal.SIGINT) if in_main_thread else None
    try:
        result = trainer.fit()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_sigint)
    if not result.best_checkpoints:
        raise RuntimeError(f"run {name} produced no checkpoint (see the worker logs above)")
    sign = 1 if cfg.train.mode == "max" else -1
    best, metrics = max(result.best_checkpoints, key=lambda cm: sign * cm[1][cfg.train.metric])
    latest = result.checkpoint or best
    history = read_meta(latest.path)["history"] if "://" not in latest.path else metrics.get("history", [])
    return FitResult(best.path, metrics, history, result.path)


def _feature_cache(cfg: Config, plan: RunPlan, datasets: dict) -> dict[str, Any]:
    """Build or reuse the frozen-prefix cache when the plan allows it; what the loop needs to read it."""
    if not plan.feature_cache:
        if plan.freeze_blocks > 0:
            print(f"[ptm_ray] feature cache off: {plan.feature_cache_reason}")
        return {"feature_cache": None, "feature_cache_bytes": 0}
    adapter, ref = resolve_model(cfg.model)
    info = prepare_cache(cfg, adapter, ref, plan.labels, plan.freeze_blocks, plan.num_blocks, plan.data, datasets,
                         f"{storage_path(cfg)}/feature_cache")
    how = f"built in {info.build_s:.1f} s" if info.built else "reused"
    print(f"[ptm_ray] feature cache {how}: {info.path} ({info.size_bytes / 1e6:.1f} MB), "
          f"{plan.freeze_blocks}/{plan.num_blocks} frozen blocks computed once")
    return {"feature_cache": info.path, "feature_cache_bytes": info.size_bytes}


class _CachedSuffix(torch.nn.Module):
    """The model seen from cached prefix outputs: its forward runs only the unfrozen top.

    A module of its own so that DDP wraps (and synchronises gradients through) the forward actually run.
    """

    def __init__(self, adapter: Any, model: torch.nn.Module, depth: int) -> None:
        super().__init__()
        self.adapter, self.model, self.depth = adapter, model, depth

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.adapter.suffix_logits(self.model, features, self.depth)


def _warn_local_storage_on_many_nodes(cfg: Config) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and "://" not in cfg.storage.path:
        print(f"[ptm_ray] warning: storage.path={cfg.storage.path} is a local path but the cluster has {len(nodes)} "
              "nodes: checkpoints written on one node are not visible on the others unless this path is a shared "
              "mount (NFS) on every node. Use storage.path=s3://<bucket>/<prefix> (or gs://, or an NFS path).")


def _batches(shard: Any, cfg: Config, shuffle_seed: int | None = None):
    kwargs = {"batch_size": cfg.train.batch_size, "batch_format": "numpy"}
    if shuffle_seed is not None and cfg.train.shuffle_buffer > 0:
        kwargs |= {"local_shuffle_buffer_size": cfg.train.shuffle_buffer, "local_shuffle_seed": shuffle_seed}
    return shard.iter_batches(**kwargs)


def _gaps(train: dict[str, float], val: dict[str, float]) -> dict[str, float]:
    """Validation minus training loss (and training minus validation accuracy where both exist)."""
    gaps = {"gap_loss": val["val_loss"] - train["train_loss"]}
    if "train_accuracy" in train and "val_accuracy" in val:
        gaps["gap_accuracy"] = train["train_accuracy"] - val["val_accuracy"]
    return gaps


def _is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    return best is None or (value > best + min_delta if mode == "max" else value < best - min_delta)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One data-parallel worker: build or restore, freeze, train, validate, checkpoint, early-stop."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.util.metrics import Gauge
    from transformers import get_scheduler

    cfg = config_from_dict(loop_config["cfg"])
    labels: list[str] = loop_config["labels"]
    task = task_for(cfg.model.task)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    adapter, ref = resolve_model(cfg.model)

    # --- model: fresh from pretrained weights, or restored from the latest checkpoint -------------
    restored = ray.train.get_checkpoint()
    state: dict[str, Any] = {"epoch": 0, "best": None, "best_epoch": None, "bad_epochs": 0, "history": []}
    if restored:
        with restored.as_directory() as d:
            model = adapter.load(Path(d) / "model")
            preprocessor = adapter.load_preprocessor(Path(d) / "preprocessor")
            state = load_train_state(d) | {"history": read_meta(d)["history"]}
    else:
        model = adapter.build(ref, labels, cfg.model)
        preprocessor = adapter.preprocessor(ref, model, cfg)

    # --- freezing and optimizer: the same pure functions for every family ------------------------
    blocks = adapter.blocks(model)
    depth = parse_freeze_depth(cfg.model.freeze_depth, len(blocks))
    frozen = freeze(model, blocks, depth)
    trainable, total = parameter_counts(model)
    node = ray.get_runtime_context().get_node_id()[:8]
    print(f"[ptm_ray] rank {rank} on node {node} ({ray.util.get_node_ip_address()})")
    if rank == 0:
        print(f"[ptm_ray] {cfg.model.name}: froze {depth}/{len(blocks)} blocks; "
              f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%); "
              f"{world} worker(s) on {device}, {torch.get_num_threads()} torch threads each")
    optimizer = torch.optim.AdamW(
        param_groups(model, blocks, cfg.optim.lr, cfg.optim.head_lr or cfg.optim.lr,
                     cfg.optim.layer_decay, cfg.optim.weight_decay)
    )
    rows_per_worker = loop_config["num_train_rows"] // world  # streaming_split(equal=True) gives each this many
    steps_per_epoch = math.ceil(rows_per_worker / cfg.train.batch_size)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    updates_per_epoch = math.ceil(steps_per_epoch / cfg.train.grad_accum_steps)
    total_updates = updates_per_epoch * cfg.train.epochs
    scheduler = get_scheduler(cfg.optim.scheduler, optimizer, int(cfg.optim.warmup_ratio * total_updates), total_updates)
    if restored:
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))

    # With a feature cache the frozen prefix already ran once for every row: each step looks its outputs
    # up by the row's raw input and runs only the unfrozen top. Same rows, order and random draws as without.
    store = FeatureStore(loop_config["feature_cache"]) if loop_config.get("feature_cache") else None
    net = _CachedSuffix(adapter, model, depth) if store else model
    if rank == 0 and store:
        print(f"[ptm_ray] training the top {len(blocks) - depth} block(s) and head on cached features "
              f"({loop_config['feature_cache_bytes'] / 1e6:.1f} MB at {loop_config['feature_cache']})")

    # moves to device; DDP when world > 1 (told about layers a family may skip in a step, e.g. LayerDrop)
    ddp_kwargs = {"find_unused_parameters": getattr(adapter, "ddp_find_unused_parameters", False)}
    net = ray.train.torch.prepare_model(net, parallel_strategy_kwargs=ddp_kwargs)
    unwrapped_net = getattr(net, "module", net)
    unwrapped = unwrapped_net.model if store else unwrapped_net

    task_ctx = WorkerContext(adapter, preprocessor, labels, cfg, device, store)

    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # Custom metrics for the dashboard's Metrics view (Prometheus/Grafana): throughput and validation score
    gauges = {key: Gauge(f"ptm_ray_train_{key}", description, tag_keys=("run",)) for key, description in (
        ("samples_per_s", "training samples per second, all workers"), ("val_score", f"validation {cfg.train.metric}"))}
    run_tag = {"run": ctx.get_experiment_name()}
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")

    resumed_from = state["epoch"]  # 0 for a fresh run; the restored epoch after a restart
    for epoch in range(state["epoch"], cfg.train.epochs):
        # --- train one epoch on this worker's shard ----------------------------------------------
        set_train_mode(net, frozen)
        optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        sums = torch.zeros(len(task.stat_names), dtype=torch.float64, device=device)
        examples = 0
        for step, batch in enumerate(_batches(train_shard, cfg, shuffle_seed=cfg.train.seed * 100_003 + epoch)):
            if step >= steps_per_epoch:
                break
            sync = (step + 1) % cfg.train.grad_accum_steps == 0 or step + 1 == steps_per_epoch
            no_sync = net.no_sync if (not sync and hasattr(net, "no_sync")) else contextlib.nullcontext
            with no_sync():
                with autocast():
                    loss, stats = task.train_step(task_ctx, net, batch)
                (loss / cfg.train.grad_accum_steps).backward()
            if sync:
                if cfg.optim.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(unwrapped.parameters(), cfg.optim.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            sums += stats
            examples += len(next(iter(batch.values())))
        train_time = time.perf_counter() - started
        all_reduce(sums)
        examples = int(all_reduce(torch.tensor(examples, device=device)).item())

        # --- validate across all workers, then decide on early stopping ----------------------------
        unwrapped_net.eval()
        val_batches = (b for i, b in enumerate(_batches(val_shard, cfg)) if i % world == rank)
        val = task.evaluate(task_ctx, unwrapped_net, val_batches, autocast)
        train_metrics = task.train_metrics(sums)
        value = val[cfg.train.metric] if cfg.train.metric in val else None
        if value is None:
            raise ValueError(f"train.metric={cfg.train.metric!r} is not a validation metric of model.task="
                             f"{cfg.model.task}; use one of {sorted(val)}")
        if _is_better(value, state["best"], cfg.train.mode):
            improved = _is_better(value, state["best"], cfg.train.mode, cfg.train.early_stopping_min_delta)
            state.update(best=value, best_epoch=epoch + 1, bad_epochs=0 if improved else state["bad_epochs"] + 1)
        else:
            state["bad_epochs"] += 1
        patience = cfg.train.early_stopping_patience
        stop_early = patience > 0 and state["bad_epochs"] >= patience
        metrics = {
            "epoch": epoch + 1,
            **train_metrics,
            **val,
            **_gaps(train_metrics, val),  # overfitting monitor: grows as the model memorises
            f"best_{cfg.train.metric}": state["best"],
            "best_epoch": state["best_epoch"],
            "samples_per_s": examples / max(train_time, 1e-9),  # all workers together
            "epoch_time_s": train_time,
            "trainable_params": trainable,
            "total_params": total,
            "frozen_blocks": depth,
            "feature_cache_bytes": loop_config.get("feature_cache_bytes", 0),  # 0: trained without the cache
            "num_blocks": len(blocks),
            "resumed_from_epoch": resumed_from,
            "stop_reason": "early_stopping" if stop_early else ("max_epochs" if epoch + 1 == cfg.train.epochs else ""),
        }
        state["history"].append(metrics)
        if rank == 0:
            gauges["samples_per_s"].set(metrics["samples_per_s"], tags=run_tag)
            gauges["val_score"].set(value, tags=run_tag)
        state["epoch"] = epoch + 1
        if rank == 0:
            shown = " ".join(f"{k}={v:.4f}" for k, v in (train_metrics | val).items())
            print(f"[ptm_ray] epoch {epoch + 1}/{cfg.train.epochs} {shown} gap_loss={metrics['gap_loss']:+.4f} "
                  f"{metrics['samples_per_s']:.1f} samples/s" + (" (early stop)" if stop_early else ""))

        # --- checkpoint: rank 0 writes it, every rank reports (report is a barrier) -----------------
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                train_state = {k: v for k, v in state.items() if k != "history"}
                train_state |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                save_checkpoint(Path(tmp), adapter=adapter, model=unwrapped, preprocessor=preprocessor, cfg=cfg,
                                labels=labels, metrics=metrics, history=state["history"], train_state=train_state)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop_early:
            break
