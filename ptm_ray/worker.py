"""The steps of one data-parallel training worker, each named for what it does.

``ptm_ray.train.train_loop_per_worker`` strings them together:

    worker = setup_worker(loop_config, session)       # model (fresh or restored), freezing, optimizer, data
    for epoch in worker.epochs():
        train = train_one_epoch(worker, epoch)         # this worker's shard; statistics summed across workers
        val = validate(worker)                         # every validation row once across workers
        metrics = record_epoch(worker, epoch, train, val)   # early stopping, the epoch's line, dashboard gauges
        checkpoint_and_report(worker, metrics)         # rank 0 writes the checkpoint, every rank reports
        if worker.stopper.should_stop: break

A ``Session`` is where the worker runs: ``RaySession`` inside a Ray Train worker group, ``TuneSession`` as the
only worker of a run inside a Ray Tune trial (no worker group of its own: a search's single-worker trials).
The steps never call Ray Train or Tune directly, so the same loop runs wherever a session is provided.
"""

from __future__ import annotations

import contextlib
import functools
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch

from ptm_ray.checkpoint import load_train_state, read_meta, save_checkpoint
from ptm_ray.config import Config, config_from_dict, parse_freeze_depth
from ptm_ray.console import epoch_line
from ptm_ray.feature_cache import FeatureStore
from ptm_ray.freeze import Block, freeze, frozen_modules, param_groups, parameter_counts, set_train_mode
from ptm_ray.lora import adapter_state, apply_lora, describe_lora, load_adapter_state, merged_copy
from ptm_ray.models import Classifier, Family, PrefixCache, Preprocessor, resolve_model
from ptm_ray.preprocess import PreparedInputs, load_packed, prepared_batch
from ptm_ray.tasks import Task, WorkerContext, task_for
from ptm_ray.tasks.base import all_reduce
from ptm_ray.variants import variant_tensors, write_variant

__all__ = ["EarlyStopping", "RaySession", "Session", "TuneSession", "Worker", "checkpoint_and_report", "record_epoch",
           "scores_of_raw_inputs", "setup_worker", "train_one_epoch", "validate"]


class Session(Protocol):
    """Where a worker runs: its rank among the workers, its data, and where its reports go."""

    rank: int
    world_size: int
    device: torch.device
    run_name: str

    def restored(self) -> contextlib.AbstractContextManager[Path | None]:
        """The folder of the checkpoint to resume from, or None for a fresh run."""

    def dataset(self, name: str) -> Any:
        """This worker's share of the dataset ``name`` (``train`` is split; ``validation`` is whole)."""

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        """Report an epoch's metrics (and rank 0's checkpoint folder); a barrier across workers."""

    def prepare_model(self, module: torch.nn.Module, ddp_kwargs: dict[str, Any]) -> torch.nn.Module:
        """``module`` on this worker's device, wrapped for data parallelism when there are several workers."""


class RaySession:
    """The session of a Ray Train worker (``ray.train`` context, dataset shards, checkpoints)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_name = context.get_experiment_name()

    def restored(self) -> contextlib.AbstractContextManager[Path | None]:
        import ray.train

        return _folder_of(ray.train.get_checkpoint())

    def dataset(self, name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None)

    def prepare_model(self, module: torch.nn.Module, ddp_kwargs: dict[str, Any]) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=ddp_kwargs)


@contextlib.contextmanager
def _folder_of(checkpoint: Any) -> Iterator[Path | None]:
    """The local folder of a Ray checkpoint to resume from, or None for a fresh start."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


class TuneSession:
    """The session of a run's only worker inside a Ray Tune trial: the trial process trains itself.

    No worker group starts: the datasets are the ones the search materialized once (whole: one worker takes
    every row, as a one-worker split would), epochs and checkpoints go to ``ray.tune.report`` (Tune keeps
    the best by ``train.metric``, and the latest, which a restored trial resumes from).
    """

    rank = 0
    world_size = 1

    def __init__(self, datasets: dict[str, Any], device: torch.device) -> None:
        import ray.tune

        self.datasets, self.device = datasets, device
        self.run_name = ray.tune.get_context().get_trial_id()

    def restored(self) -> contextlib.AbstractContextManager[Path | None]:
        import ray.tune

        return _folder_of(ray.tune.get_checkpoint())

    def dataset(self, name: str) -> Any:
        return self.datasets[name]

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)

    def prepare_model(self, module: torch.nn.Module, ddp_kwargs: dict[str, Any]) -> torch.nn.Module:
        return module.to(self.device)


@dataclass
class EarlyStopping:
    """Tracks the best value of the validation metric and how many epochs passed without improving it.

    An epoch counts as an improvement only when it beats the best by more than ``min_delta``; a smaller
    gain still moves ``best`` (the checkpoint ranking follows the metric itself).
    """

    mode: str
    patience: int = 0
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> None:
        """Take the metric of ``epoch`` (1-based)."""
        if self._beats(value, 0.0):
            improved = self._beats(value, self.min_delta)
            self.best, self.best_epoch = value, epoch
            self.bad_epochs = 0 if improved else self.bad_epochs + 1
        else:
            self.bad_epochs += 1

    def _beats(self, value: float, margin: float) -> bool:
        if self.best is None:
            return True
        return value > self.best + margin if self.mode == "max" else value < self.best - margin

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


class StepProgress:
    """Rank 0's steps through each epoch, for the driver's progress bar (``ptm_ray.progress.StepBar``).

    Sent on the run's report queue at most every ``every_s`` seconds and after the last step, without
    waiting for the queue: a step never waits on the driver. Other ranks, and runs with no queue (a Tune
    trial training in its own process), send nothing.
    """

    def __init__(self, queue: Any = None, rank: int = 0, every_s: float = 0.5) -> None:
        self.queue = queue if rank == 0 else None
        self.every_s, self.sent_at = every_s, float("-inf")

    def __call__(self, epoch: int, done: int, total: int) -> None:
        """``done`` of ``total`` steps of ``epoch`` (0-based) are finished."""
        now = time.monotonic()
        if self.queue is not None and (done >= total or now - self.sent_at >= self.every_s):
            self.sent_at = now
            self.queue.actor.put_nowait.remote(("steps", epoch + 1, done, total))


@dataclass
class Worker:
    """Everything one training worker holds between steps."""

    cfg: Config
    task: Task
    family: Family
    session: Session
    model: torch.nn.Module
    """The model itself, as checkpoints save it."""
    net: torch.nn.Module
    """What a step runs: the model, or its unfrozen top over cached features; DDP-wrapped when world > 1."""
    preprocessor: Preprocessor
    labels: list[str]
    blocks: list[Block]
    depth: int
    frozen: list[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    context: WorkerContext
    steps_per_epoch: int
    stopper: EarlyStopping
    first_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    extra_metrics: dict[str, Any] = field(default_factory=dict)
    """Constant per run, reported every epoch (parameter counts, depth, cache size, resumed-from epoch)."""
    gauges: dict[str, Any] = field(default_factory=dict)
    lora: Any = None
    """The ``peft.LoraModel`` wrapping ``model`` when ``model.lora.r > 0`` (checkpoints save it merged), else None."""
    progress: StepProgress = field(default_factory=StepProgress)
    prepared_splits: tuple[str, ...] = ()
    """Splits whose rows Ray Data preprocessed (``data.preprocess``): their batches are only collated here."""

    def epochs(self) -> range:
        return range(self.first_epoch, self.cfg.train.epochs)

    def autocast(self) -> contextlib.AbstractContextManager:
        precision = self.cfg.train.precision
        bf16 = precision == "bf16" or (precision == "auto" and self.session.device.type == "cuda")
        return torch.autocast(self.session.device.type, dtype=torch.bfloat16, enabled=bf16)

    def batches(self, split: str, shuffle_seed: int | None = None) -> Iterator[dict[str, Any]]:
        # a few batches prepared ahead, so that a streamed read's hiccup does not stall a step
        kwargs: dict[str, Any] = {"batch_size": self.cfg.train.batch_size, "batch_format": "numpy", "prefetch_batches": 4}
        if shuffle_seed is not None and self.cfg.train.shuffle_buffer > 0:
            kwargs |= {"local_shuffle_buffer_size": self.cfg.train.shuffle_buffer, "local_shuffle_seed": shuffle_seed}
        batches = self.session.dataset(split).iter_batches(**kwargs)
        if split in self.prepared_splits:
            return (prepared_batch(self.preprocessor, batch) for batch in batches)
        return batches


# --- setup ---------------------------------------------------------------------------------------------------


def setup_worker(loop_config: dict[str, Any], session: Session) -> Worker:
    """Build or restore the model, freeze its lower blocks, pick the forward strategy, build the optimizer."""
    cfg = config_from_dict(loop_config["cfg"])
    labels: list[str] = loop_config["labels"]
    task = task_for(cfg.model.task)
    torch.manual_seed(cfg.train.seed)
    family, ref = resolve_model(cfg.model)
    model, preprocessor, saved = _build_or_restore(cfg, family, ref, labels, task.head, session,
                                                   loop_config.get("preprocessor"))
    blocks = family.blocks(model)
    depth = parse_freeze_depth(cfg.model.freeze_depth, len(blocks))
    frozen = freeze(model, blocks, depth)
    lora = None
    if cfg.model.lora.r:  # adapters above the frozen blocks; every backbone weight frozen, the head trains
        lora = apply_lora(model, blocks, depth, cfg.model.lora)
        frozen = frozen_modules(model)
        if saved is not None:
            load_adapter_state(model, saved["lora_state"])
    net, logits = _forward_strategy(family, model, preprocessor, depth, loop_config, session)
    steps = _steps_per_epoch(cfg, loop_config["num_train_rows"], session.world_size)
    optimizer, scheduler = _optimizer(cfg, model, blocks, steps)
    stopper = EarlyStopping(cfg.train.mode, cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta)
    worker = Worker(cfg, task, family, session, model, net, preprocessor, labels, blocks, depth, frozen, optimizer,
                    scheduler, WorkerContext(family, preprocessor, labels, cfg, session.device, logits), steps, stopper,
                    lora=lora, prepared_splits=tuple(loop_config.get("prepared_splits", ())))
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        stopper.load_state_dict(saved)
        worker.first_epoch, worker.history = saved["epoch"], saved["history"]
    trainable, total = parameter_counts(model)
    worker.extra_metrics = {"trainable_params": trainable, "total_params": total, "frozen_blocks": depth,
                            "feature_cache_bytes": loop_config.get("feature_cache_bytes", 0),
                            "feature_cache_build_s": loop_config.get("feature_cache_build_s", 0.0), "num_blocks": len(blocks),
                            "resumed_from_epoch": worker.first_epoch, "world_size": session.world_size,
                            "device": session.device.type}  # where the loop ran (cpu, cuda): a record, not a metric
    worker.gauges = _gauges(cfg)
    worker.progress = StepProgress(loop_config.get("progress"), session.rank)
    _announce(worker)
    return worker


def _build_or_restore(cfg: Config, family: Family, ref: Any, labels: list[str], head: str, session: Session,
                      packed: bytes | None = None) -> tuple[torch.nn.Module, Preprocessor, dict[str, Any] | None]:
    """(model, preprocessor, saved training state or None for a fresh run).

    A fresh run whose driver made the preprocessor (``packed``: Ray Data preprocesses with it) saves that one with
    its checkpoints; otherwise the worker makes it.

    A run resumes from its checkpoint's model, except a LoRA run: its ``model/`` is merged for serving, so it
    rebuilds the pretrained backbone, and ``setup_worker`` loads the saved adapters and head into it.
    """
    with session.restored() as folder:
        if folder is None:
            model = family.build(ref, labels, cfg.model, head)
            if packed is not None:
                return model, load_packed(family.preprocessor_class, packed), None
            return model, family.preprocessor(ref, model, cfg), None
        saved = load_train_state(folder) | {"history": read_meta(folder)["history"]}
        model = family.build(ref, labels, cfg.model, head) if "lora_state" in saved else family.load(folder / "model")
        return model, family.load_preprocessor(folder / "preprocessor"), saved


def _forward_strategy(family: Family, model: torch.nn.Module, preprocessor: Preprocessor, depth: int,
                      loop_config: dict[str, Any], session: Session) -> tuple[torch.nn.Module, Callable]:
    """(the module steps run, ``logits(net, raw_inputs, train)``), chosen once.

    With a feature cache the frozen prefix already ran once for every row: each step looks its outputs up
    by the row's raw input and runs only the unfrozen top, with the same rows, order and random draws as
    without the cache. Otherwise a step preprocesses the raw inputs and runs the whole model.
    """
    device = session.device
    # moves to the device; DDP when world > 1 (told about layers a family may skip in a step, e.g. LayerDrop)
    ddp = {"find_unused_parameters": family.ddp_find_unused_parameters}
    if loop_config.get("feature_cache"):
        store = FeatureStore(loop_config["feature_cache"])
        top = session.prepare_model(_CachedSuffix(family, model, depth), ddp)
        return top, lambda net, inputs, train: net(store.lookup(inputs, device))
    net = session.prepare_model(model, ddp)
    return net, scores_of_raw_inputs(family, preprocessor, device)


def scores_of_raw_inputs(family: Family, preprocessor: Preprocessor, device: torch.device) -> Callable:
    """``logits(net, raw_inputs, train)`` that preprocesses a batch (unless Ray Data did) and runs the whole model."""
    if not isinstance(family, Classifier):
        return _no_logits

    def logits(net: torch.nn.Module, inputs: Any, train: bool) -> torch.Tensor:
        # Ray Data preprocessed the rows (data.preprocess), or the raw inputs are preprocessed here
        prepared = inputs.tensors if isinstance(inputs, PreparedInputs) else preprocessor(list(inputs), train=train)
        return family.logits(net, {k: v.to(device) for k, v in prepared.items()})

    return logits


def _no_logits(net: torch.nn.Module, inputs: Any, train: bool) -> torch.Tensor:
    raise TypeError("this model family computes no class scores (its task reads its own outputs)")


class _CachedSuffix(torch.nn.Module):
    """The model seen from cached prefix outputs: its forward runs only the unfrozen top.

    A module of its own so that DDP wraps (and synchronises gradients through) the forward actually run.
    """

    def __init__(self, family: PrefixCache, model: torch.nn.Module, depth: int) -> None:
        super().__init__()
        self.family, self.model, self.depth = family, model, depth

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.family.suffix_logits(self.model, features, self.depth)


def _steps_per_epoch(cfg: Config, num_train_rows: int, world_size: int) -> int:
    """Micro-batches per epoch on each worker: its equal share of the rows, capped by ``max_steps_per_epoch``."""
    steps = math.ceil(num_train_rows // world_size / cfg.train.batch_size)  # streaming_split(equal=True) shares
    return min(steps, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch else steps


def _optimizer(cfg: Config, model: torch.nn.Module, blocks: list[Block], steps_per_epoch: int) -> tuple[Any, Any]:
    """AdamW over the trainable parameters (head and backbone learning rates, layer decay, no weight decay on
    biases and norms) and the learning-rate schedule over every optimizer step of the run."""
    opt = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, blocks, opt.lr, opt.head_lr or opt.lr, opt.layer_decay,
                                               opt.weight_decay))
    total = math.ceil(steps_per_epoch / cfg.train.grad_accum_steps) * cfg.train.epochs
    factor = functools.partial(_SCHEDULES[opt.scheduler], warmup=int(opt.warmup_ratio * total), total=total)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# The learning-rate factor at each optimizer step, as transformers' get_scheduler computes it ("constant"
# takes no warm-up there either), without importing transformers into the workers of timm, torchvision
# and torchaudio models (2.5 s each here). A partial of a module function: LambdaLR's state (what resume loads)
# has the same keys as the schedules transformers builds.
def _linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _constant(step: int, warmup: int, total: int) -> float:
    return 1.0


_SCHEDULES = {"linear": _linear, "cosine": _cosine, "constant": _constant}


def _gauges(cfg: Config) -> dict[str, Any]:
    """Custom metrics for the dashboard's Metrics view (Prometheus/Grafana): throughput and validation score."""
    from ray.util.metrics import Gauge

    return {key: Gauge(f"ptm_ray_train_{key}", description, tag_keys=("run",)) for key, description in (
        ("samples_per_s", "training samples per second, all workers"), ("val_score", f"validation {cfg.train.metric}"))}


def _announce(worker: Worker) -> None:
    import ray

    session, extra = worker.session, worker.extra_metrics
    node = ray.get_runtime_context().get_node_id()[:8]
    print(f"[ptm_ray] rank {session.rank} on node {node} ({ray.util.get_node_ip_address()})")
    if session.rank != 0:
        return
    trainable, total = extra["trainable_params"], extra["total_params"]
    lora = f"{describe_lora(worker.model)}; " if worker.lora is not None else ""
    print(f"[ptm_ray] {worker.cfg.model.name}: froze {worker.depth}/{len(worker.blocks)} blocks; {lora}"
          f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%); "
          f"{session.world_size} worker(s) on {session.device}, {torch.get_num_threads()} torch threads each")
    if extra["feature_cache_bytes"]:
        print(f"[ptm_ray] training the top {len(worker.blocks) - worker.depth} block(s) and head on cached features "
              f"({extra['feature_cache_bytes'] / 1e6:.1f} MB)")


# --- one epoch -------------------------------------------------------------------------------------------------


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite: training on would only overwrite good weights with bad ones."""


def train_one_epoch(worker: Worker, epoch: int) -> dict[str, float]:
    """Train on this worker's shard; the task's statistics and the throughput, summed across workers."""
    cfg, device = worker.cfg, worker.session.device
    accumulate = cfg.train.grad_accum_steps
    set_train_mode(worker.net, worker.frozen)
    worker.optimizer.zero_grad(set_to_none=True)
    started = time.perf_counter()
    sums = torch.zeros(len(worker.task.stat_names), dtype=torch.float64, device=device)
    examples = 0
    waited = Waited(worker.batches("train", shuffle_seed=cfg.train.seed * 100_003 + epoch))
    for step, batch in enumerate(waited):
        if step >= worker.steps_per_epoch:
            break
        last = (step + 1) % accumulate == 0 or step + 1 == worker.steps_per_epoch
        no_sync = worker.net.no_sync if (not last and hasattr(worker.net, "no_sync")) else contextlib.nullcontext
        with no_sync():  # DDP: gradients are averaged across workers only on the step that updates
            with worker.autocast():
                loss, stats = worker.task.train_step(worker.context, worker.net, batch)
            (loss / accumulate).backward()
        if last:
            _update(worker)
        sums += stats
        examples += len(next(iter(batch.values())))
        worker.progress(epoch, step + 1, worker.steps_per_epoch)
    seconds = time.perf_counter() - started
    all_reduce(sums)
    if not torch.isfinite(sums).all():  # every worker sees the same sums, so every worker stops here
        raise NonFiniteLoss(f"epoch {epoch + 1}: the training loss is not finite "
                            f"({dict(zip(worker.task.stat_names, sums.tolist()))}); the run stops without "
                            "checkpointing this epoch, and earlier checkpoints are kept. Lower optim.lr / "
                            "optim.head_lr, set optim.max_grad_norm, or check the data for bad values")
    examples = int(all_reduce(torch.tensor(examples, device=device)).item())
    wait = all_reduce(torch.tensor([waited.seconds, seconds], dtype=torch.float64, device=device))
    return worker.task.train_metrics(sums) | {"samples_per_s": examples / max(seconds, 1e-9), "epoch_time_s": seconds,
                                              "data_wait_share": (wait[0] / wait[1].clamp(min=1e-9)).item()}


class Waited:
    """An iterator of batches that adds up the seconds spent waiting for each (``seconds``): time a step
    could not start because the data pipeline had no batch ready."""

    def __init__(self, batches: Iterable[dict[str, Any]]) -> None:
        self.batches, self.seconds = iter(batches), 0.0

    def __iter__(self) -> "Waited":
        return self

    def __next__(self) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.seconds += time.perf_counter() - started


def _update(worker: Worker) -> None:
    """One optimizer step: clip, step, advance the schedule, clear the gradients."""
    if worker.cfg.optim.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(worker.model.parameters(), worker.cfg.optim.max_grad_norm)
    worker.optimizer.step()
    worker.scheduler.step()
    worker.optimizer.zero_grad(set_to_none=True)


def validate(worker: Worker) -> dict[str, float]:
    """The task's validation metrics over every validation row: each worker evaluates its own shard (Ray
    Train splits validation without dropping rows) and the task combines the workers' sums. ``validation_rows``
    counts the rows evaluated across workers."""
    net = getattr(worker.net, "module", worker.net)
    net.eval()
    started = time.perf_counter()
    rows = [0]

    def counted(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            rows[0] += len(next(iter(batch.values())))
            yield batch

    with torch.no_grad():
        val = worker.task.evaluate(worker.context, net, counted(worker.batches("validation")), worker.autocast)
    val["validation_rows"] = int(all_reduce(torch.tensor(rows[0], device=worker.session.device)).item())
    metric = worker.cfg.train.metric
    if metric not in val:
        raise ValueError(f"train.metric={metric!r} is not a validation metric of model.task={worker.cfg.model.task}; "
                         f"use one of {sorted(val)}")
    return val | {"validation_time_s": time.perf_counter() - started}


def record_epoch(worker: Worker, epoch: int, train: dict[str, float], val: dict[str, float]) -> dict[str, Any]:
    """The epoch's metrics (with the overfitting gaps and the best so far); updates early stopping, the
    history and the dashboard gauges, and prints the epoch's line on rank 0."""
    cfg, stopper = worker.cfg, worker.stopper
    stopper.update(val[cfg.train.metric], epoch + 1)
    last = epoch + 1 == cfg.train.epochs
    metrics = {"epoch": epoch + 1, **train, **val, **_gaps(train, val), f"best_{cfg.train.metric}": stopper.best,
               "best_epoch": stopper.best_epoch, **worker.extra_metrics,
               "stop_reason": "early_stopping" if stopper.should_stop else ("max_epochs" if last else "")}
    worker.history.append(metrics)
    if worker.session.rank == 0:
        tags = {"run": worker.session.run_name}
        worker.gauges["samples_per_s"].set(metrics["samples_per_s"], tags=tags)
        worker.gauges["val_score"].set(val[cfg.train.metric], tags=tags)
        print(epoch_line(metrics, cfg.train.epochs, stopper.should_stop))  # the worker's log; the driver prints its own
    return metrics


def _gaps(train: dict[str, float], val: dict[str, float]) -> dict[str, float]:
    """Validation minus training loss (and training minus validation accuracy where both exist): the
    overfitting monitor, growing as the model memorises."""
    gaps = {"gap_loss": val["val_loss"] - train["train_loss"]}
    if "train_accuracy" in train and "val_accuracy" in val:
        gaps["gap_accuracy"] = train["train_accuracy"] - val["val_accuracy"]
    return gaps


def checkpoint_and_report(worker: Worker, metrics: dict[str, Any]) -> None:
    """Rank 0 writes a self-describing checkpoint of this epoch; every rank reports (a barrier)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = None
        if worker.session.rank == 0:
            train_state = {"epoch": metrics["epoch"], **worker.stopper.state_dict(),
                           "optimizer": worker.optimizer.state_dict(), "scheduler": worker.scheduler.state_dict()}
            model = worker.model
            if worker.lora is not None:  # serve a plain merged model; resume from the adapters themselves
                model, train_state["lora_state"] = merged_copy(worker.lora), adapter_state(worker.model)
            folder = save_checkpoint(Path(tmp), family=worker.family, model=model,
                                     preprocessor=worker.preprocessor, cfg=worker.cfg, labels=worker.labels,
                                     metrics=metrics, history=worker.history, train_state=train_state,
                                     task_state=worker.task.state())
            if worker.task.batched and (worker.lora is not None or worker.depth == len(worker.blocks)):
                # only adapters and head trained: a server can share the base with other variants of it
                write_variant(folder, worker.cfg, variant_tensors(worker.model), worker.lora)
        worker.session.report(metrics, folder)
