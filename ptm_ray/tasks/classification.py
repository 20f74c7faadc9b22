"""Classification: one label per input (text, image or audio), cross-entropy, accuracy and macro-F1.

Data: ``data.text_column`` (or media files) and ``data.label_column``. Predictions:
``{label, probability, top_k: [{label, probability}, ...]}``; served requests of many clients share
forward passes, and ``top_k`` (a top-level request field, or in ``parameters``) picks how many labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ptm_ray.models.base import Classifier
from ptm_ray.tasks.base import Task, all_reduce, parse_options
from ptm_ray.tasks.registry import register_task

if TYPE_CHECKING:
    from ptm_ray.checkpoint import Artifact

__all__ = ["ClassificationTask", "classification_metrics", "format_prediction"]


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 from a (true, predicted) confusion matrix.

    Macro-F1 averages over the classes that occur as a true or a predicted label.
    """
    tp = confusion.diag().double()
    support = confusion.sum(1).double()
    predicted = confusion.sum(0).double()
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    total = confusion.sum().item()
    return {
        "accuracy": (tp.sum() / max(total, 1)).item(),
        "macro_f1": f1[present].mean().item() if present.any() else 0.0,
    }


def format_prediction(probabilities: list[float], labels: list[str], top_k: int) -> dict[str, Any]:
    """``{label, probability, top_k: [{label, probability}, ...]}`` from one input's class probabilities."""
    ranked = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[: min(top_k, len(labels))]
    top = [{"label": labels[i], "probability": probabilities[i]} for i in ranked]
    return {"label": top[0]["label"], "probability": top[0]["probability"], "top_k": top}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(default=3, ge=1, le=1000)


@register_task
class ClassificationTask(Task):
    """Rows ``input`` (text or file bytes) and ``label``; the head scores every label."""

    name = "classification"
    metric, mode = "val_accuracy", "max"
    head = "classifier"
    requires = (Classifier,)
    stat_names = ("loss_sum", "examples", "correct")
    trains_on_logits = True
    batched = True
    request_fields = ("top_k",)

    def __init__(self) -> None:
        self._confusion: torch.Tensor | None = None  # set by evaluate

    def inspect(self, cfg, modality):
        from ptm_ray.data import inspect_data

        return inspect_data(cfg.data, modality)

    def datasets(self, summary, cfg):
        from ptm_ray.data import ray_datasets

        return ray_datasets(summary, cfg)

    @staticmethod
    def _logits_and_targets(ctx, net, batch, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        index = {label: i for i, label in enumerate(ctx.labels)}
        targets = torch.tensor([index[str(v)] for v in batch["label"]], device=ctx.device)
        return ctx.logits(net, batch["input"], train).float(), targets

    def train_step(self, ctx, net, batch):
        logits, targets = self._logits_and_targets(ctx, net, batch, train=True)
        loss = F.cross_entropy(logits, targets)
        stats = [loss.item() * len(targets), len(targets), (logits.argmax(-1) == targets).sum().item()]
        return loss, torch.tensor(stats, dtype=torch.float64, device=ctx.device)

    def train_metrics(self, stats):
        loss_sum, examples, correct = stats.tolist()
        return {"train_loss": loss_sum / max(examples, 1), "train_accuracy": correct / max(examples, 1)}

    def evaluate(self, ctx, model, batches, autocast):
        n = len(ctx.labels)
        confusion = torch.zeros(n, n, dtype=torch.long, device=ctx.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for batch in batches:
            with autocast():
                logits, targets = self._logits_and_targets(ctx, model, batch, train=False)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
            confusion += torch.bincount(targets * n + logits.argmax(-1), minlength=n * n).view(n, n)
        all_reduce(confusion)
        all_reduce(loss_sum)
        self._confusion = confusion.cpu()
        metrics = classification_metrics(self._confusion)
        return {"val_loss": (loss_sum / confusion.sum().clamp(min=1)).item()} | {f"val_{k}": v for k, v in metrics.items()}

    def details(self):
        """The latest validation's confusion matrix: ``matrix[true][predicted]`` counts, rows and columns in
        label order."""
        return {"confusion": self._confusion.tolist()} if self._confusion is not None else {}

    @torch.no_grad()
    def outputs(self, artifact: "Artifact", inputs: list[Any]) -> list[list[float]]:
        """Class probabilities per input."""
        return self.scores(artifact.family.logits(artifact.model, artifact.batch(inputs)))

    def scores(self, logits: torch.Tensor) -> list[list[float]]:
        return torch.softmax(logits.float(), dim=-1).tolist()

    def format(self, output, artifact, top_k: int = 3):
        """Its top label, that label's probability and the top-k labels."""
        return format_prediction(output, artifact.labels, top_k)

    def describe(self, prediction):
        others = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in prediction["top_k"][1:])
        return f"{prediction['label']} {prediction['probability']:.3f}" + (f"  (then: {others})" if others else "")

    def request_options(self, parameters, settings):
        return parse_options(_Options, {"top_k": settings.get("top_k", 3)} | parameters,
                             hint="classification takes top_k")
