"""What a task is: everything about fine-tuning that depends on what the model predicts.

A task (``model.task``) owns, in one file: its default metric and direction, the head it trains and the
family capabilities it needs (which decides the families and modalities it accepts), its data checks
and Ray datasets, the loss and training statistics of a batch, the validation metrics, its options
(``model.task_options`` in the config, ``parameters`` in a request) and the predictions it returns,
and whether served requests are batched together. The training loop, freezing, checkpoints, search,
model store and Serve are shared and never name a task.

A new task is a ``Task`` subclass in one module, decorated with ``@register_task``, plus one import line in
``ptm_ray/tasks/__init__.py``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.distributed as dist
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    import ray.data

    from ptm_ray.checkpoint import Artifact
    from ptm_ray.config import Config
    from ptm_ray.data import DataSummary
    from ptm_ray.models.base import Family, Preprocessor

__all__ = ["Task", "WorkerContext", "all_reduce", "gather_objects", "loss_stats", "parse_options"]


@dataclass
class WorkerContext:
    """What a task sees on a training worker."""

    family: "Family"
    preprocessor: "Preprocessor"
    labels: list[str]
    cfg: "Config"
    device: torch.device
    logits: Callable[[torch.nn.Module, Any, bool], torch.Tensor]
    """``logits(net, raw_inputs, train)``: class scores of a batch of raw inputs, picked once at setup:
    preprocess and run the whole model, or look up cached frozen-prefix outputs and run only the top."""


class Task(ABC):
    """The task-specific parts of fine-tuning, evaluation, prediction and serving."""

    name: str
    metric: str
    """Default ``train.metric``: the validation metric that ranks checkpoints and trials."""
    mode: str
    """``max`` or ``min``: which direction of ``metric`` is better."""
    head: str
    """The head a family builds for this task (``Family.heads``)."""
    requires: tuple[type, ...] = ()
    """Capability protocols (``ptm_ray.models.base``) the family must implement."""
    modalities: tuple[str, ...] = ("text", "image", "audio")
    stat_names: tuple[str, ...] = ("loss_sum", "examples")
    """Per-batch training statistics ``train_step`` returns (summed over an epoch and every worker)."""
    trains_on_logits: bool = False
    """Training needs only ``ctx.logits`` of raw inputs, so a frozen-prefix feature cache can stand in."""
    batched: bool = False
    """Served inputs of concurrent requests share forward passes (``outputs``, then ``format`` per request)."""
    options_class: type[BaseModel] | None = None
    """``model.task_options`` this task reads (a pydantic model; None: it takes none)."""
    request_fields: tuple[str, ...] = ()
    """Request options a client may also send as top-level fields beside ``inputs`` (classification's
    ``top_k``); every other option goes in ``parameters``."""

    # --- which models and config -------------------------------------------------------------------------
    def unsupported_by(self, family: "Family") -> str | None:
        """Why ``family`` cannot be fine-tuned for this task, or None."""
        if family.modality not in self.modalities:
            return f"{self.name} takes {' or '.join(self.modalities)} models; this model takes {family.modality}"
        if self.head not in family.heads or not all(isinstance(family, c) for c in self.requires):
            return f"{family.name} models build no {self.head} head"
        return None

    def task_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``model.task_options`` checked, with defaults filled in. Raises ValueError naming the option."""
        if self.options_class is None:
            if options:
                raise ValueError(f"model.task_options: model.task={self.name} takes no options, got {sorted(options)}")
            return {}
        return parse_options(self.options_class, options, prefix="model.task_options.")

    # --- data ----------------------------------------------------------------------------------------------
    @abstractmethod
    def inspect(self, cfg: "Config", modality: str) -> "DataSummary":
        """Check the data on the driver; ``labels`` of the summary size the model's head."""

    @abstractmethod
    def datasets(self, summary: "DataSummary", cfg: "Config") -> dict[str, "ray.data.Dataset"]:
        """Ray datasets ``train`` and ``validation`` with the columns ``train_step`` reads."""

    # --- training and validation ---------------------------------------------------------------------------
    @abstractmethod
    def train_step(self, ctx: WorkerContext, net: torch.nn.Module,
                   batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to back-propagate and a float64 tensor of the statistics named by ``stat_names``."""

    def train_metrics(self, stats: torch.Tensor) -> dict[str, float]:
        """From the statistics summed over an epoch and every worker (default: a mean loss)."""
        loss_sum, count = stats.tolist()[:2]
        return {"train_loss": loss_sum / max(count, 1)}

    @abstractmethod
    def evaluate(self, ctx: WorkerContext, model: torch.nn.Module, batches: Iterable[dict[str, Any]],
                 autocast: Callable[[], Any]) -> dict[str, float]:
        """Validation metrics (``val_loss`` and the task's own) over this worker's batches, combined across
        workers so that every worker returns the same numbers. Callers run it under ``torch.no_grad()``."""

    def state(self) -> dict[str, Any]:
        """What the latest ``evaluate`` learned that prediction needs (saved with the checkpoint)."""
        return {}

    def details(self) -> dict[str, Any]:
        """Tables the latest ``evaluate`` computed beside its metrics, for people (``ptm-ray evaluate``):
        classification's confusion matrix. Empty by default."""
        return {}

    # --- prediction and serving ------------------------------------------------------------------------------
    def predict(self, artifact: "Artifact", inputs: list[Any], **options: Any) -> list[dict[str, Any]]:
        """Predictions for raw inputs (strings, or encoded image/audio bytes), one JSON-ready dict per input."""
        return [self.format(output, artifact, **options) for output in self.outputs(artifact, inputs)]

    def outputs(self, artifact: "Artifact", inputs: list[Any]) -> list[Any]:
        """Batched tasks: what the model computes per input, independent of request options."""
        raise NotImplementedError(f"{self.name} predicts in one call (batched = False)")

    def scores(self, logits: "torch.Tensor") -> list[Any]:
        """Batched tasks whose ``outputs`` are a function of the logits alone: that function (variants served
        from one shared pass get their logits there)."""
        raise NotImplementedError(f"{self.name} has no outputs computed from logits alone")

    def format(self, output: Any, artifact: "Artifact", **options: Any) -> dict[str, Any]:
        """Batched tasks: one input's prediction from its ``outputs`` entry and the request's options."""
        raise NotImplementedError(f"{self.name} predicts in one call (batched = False)")

    def describe(self, prediction: dict[str, Any]) -> str:
        """One prediction as a short line for people (``ptm-ray predict``); JSON by default."""
        return json.dumps(prediction)

    def request_options(self, parameters: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        """The ``predict`` options of an HTTP request's ``parameters``, checked and bounded by the server's
        limits (``settings``: the ``serve`` config group). Raises ValueError naming the bad field."""
        if parameters:
            raise ValueError(f"{self.name} takes no parameters, got {sorted(parameters)}")
        return {}


def parse_options(options_class: type[BaseModel], values: dict[str, Any], prefix: str = "", hint: str = "") -> dict:
    """``values`` validated by a pydantic model (unknown fields refused), as a plain dict.

    Raises:
        ValueError: naming each bad field (``prefix`` + its name) and what was wrong, then ``hint``.
    """
    try:
        return options_class.model_validate(values).model_dump()
    except ValidationError as e:
        problems = "; ".join(f"{prefix}{'.'.join(str(p) for p in err['loc']) or 'parameters'}: {err['msg']}"
                             for err in e.errors(include_url=False))
        raise ValueError(problems + (f" ({hint})" if hint else "")) from None


def loss_stats(loss: torch.Tensor | float, count: int, device: torch.device) -> torch.Tensor:
    """Statistics (loss sum, count) of a batch whose loss is a mean over ``count`` items."""
    value = loss.detach().item() if isinstance(loss, torch.Tensor) else float(loss)
    return torch.tensor([value * count, count], dtype=torch.float64, device=device)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the workers in place (a no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather_objects(items: list) -> list:
    """Every worker's list, concatenated in rank order (the local list outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]
