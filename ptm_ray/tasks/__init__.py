"""Tasks: what a model is fine-tuned to predict, and everything that depends on it.

The training loop, freezing, checkpoints, search, registry and serving are shared by every model. A task
brings the parts that are not: how the data is checked and read (its target column), the loss of a batch,
the validation metrics, and the predictions returned offline and over HTTP. ``model.task`` picks one:

==================== ==================================== ================= =========================
task                 families                             target            default ``train.metric``
==================== ==================================== ================= =========================
classification       every family but the detectors       a class label     val_accuracy (max)
detection            torchvision Faster R-CNN, YOLO       boxes + classes   val_map (max)
speech_recognition   wav2vec 2.0, HuBERT, DeepSpeech      a transcript      val_wer (min)
text2text            T5                                   a target text     val_chrf (max)
text_generation      GPT-2                                the text itself   val_perplexity (min)
==================== ==================================== ================= =========================

A task is a class with the methods of ``Task``; ``register_task`` makes it known to ``task_for``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    import ray.data

    from ptm_ray.checkpoint import Artifact
    from ptm_ray.config import Config, DataConfig
    from ptm_ray.data import DataSummary

__all__ = ["Task", "WorkerContext", "all_reduce", "register_task", "task_for"]


@dataclass
class WorkerContext:
    """What a task sees on a training worker."""

    adapter: Any
    preprocessor: Any
    labels: list[str]
    cfg: "Config"
    device: torch.device
    store: Any = None  # a FeatureStore when training on cached frozen-prefix outputs (classification only)


class Task(Protocol):
    """The task-specific parts of fine-tuning, evaluation and prediction."""

    name: str
    stat_names: tuple[str, ...]
    """Names of the per-batch training statistics ``train_step`` returns (summed over an epoch and workers)."""

    def inspect(self, cfg: "DataConfig", modality: str) -> "DataSummary":
        """Check the data on the driver; ``labels`` of the summary size the model's head (classes, vocabulary)."""

    def datasets(self, summary: "DataSummary", cfg: "DataConfig", seed: int) -> dict[str, "ray.data.Dataset"]:
        """Materialized Ray datasets ``train`` and ``validation`` with the columns ``train_step`` reads."""

    def train_step(self, ctx: WorkerContext, net: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to back-propagate and a float64 tensor of statistics named by ``stat_names``."""

    def train_metrics(self, stats: torch.Tensor) -> dict[str, float]:
        """``train_loss`` (and the like) from the statistics summed over an epoch and every worker."""

    def evaluate(self, ctx: WorkerContext, model: torch.nn.Module, batches: Iterable[dict[str, Any]],
                 autocast: Callable[[], Any]) -> dict[str, float]:
        """Validation metrics (``val_loss`` and the task's own) over this worker's batches, combined across
        workers so that every worker returns the same numbers."""

    def predict(self, artifact: "Artifact", inputs: list[Any], **options: Any) -> list[dict[str, Any]]:
        """Predictions for raw inputs (strings, or encoded image/audio bytes), one JSON-ready dict per input."""

    def request_options(self, parameters: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        """The ``predict`` options of an HTTP request's ``parameters``, checked and bounded by the server's
        limits (``settings``: the ``serve`` config group). Raises ValueError naming the bad field."""


_TASKS: dict[str, Callable[[], Task]] = {}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    """Make ``model.task=<name>`` build its task with ``factory()``."""
    _TASKS[name] = factory


def task_for(name: str) -> Task:
    """The task called ``name`` (``model.task``, also stored in every checkpoint)."""
    _register_builtin()
    if name not in _TASKS:
        raise ValueError(f"model.task={name!r} is not a known task; known: {sorted(_TASKS)}")
    return _TASKS[name]()


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the workers in place (a no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _register_builtin() -> None:
    from ptm_ray.tasks.classification import ClassificationTask
    from ptm_ray.tasks.detection import DetectionTask
    from ptm_ray.tasks.generation import Text2TextTask, TextGenerationTask
    from ptm_ray.tasks.speech import SpeechRecognitionTask

    builtin = {"classification": ClassificationTask, "detection": DetectionTask, "speech_recognition": SpeechRecognitionTask,
               "text2text": Text2TextTask, "text_generation": TextGenerationTask}
    for name, factory in builtin.items():
        _TASKS.setdefault(name, factory)
