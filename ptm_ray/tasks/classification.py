"""Classification: one label per input (text, image or audio), cross-entropy, accuracy and macro-F1."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn.functional as F

from ptm_ray.tasks import WorkerContext, all_reduce

if TYPE_CHECKING:
    from ptm_ray.checkpoint import Artifact

__all__ = ["ClassificationTask", "classification_metrics"]


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


class ClassificationTask:
    """Rows ``input`` (text or file bytes) and ``label``; the head scores every label."""

    name = "classification"
    stat_names = ("loss_sum", "correct", "examples")

    def inspect(self, cfg, modality):
        from ptm_ray.data import inspect_data

        return inspect_data(cfg, modality)

    def datasets(self, summary, cfg, seed):
        from ptm_ray.data import ray_datasets

        return ray_datasets(summary, cfg, seed)

    @staticmethod
    def logits_and_targets(ctx: WorkerContext, net: torch.nn.Module, batch: dict[str, Any],
                           train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets of a batch: the whole model on preprocessed inputs, or its top on cached features."""
        index = {label: i for i, label in enumerate(ctx.labels)}
        targets = torch.tensor([index[str(v)] for v in batch["label"]], device=ctx.device)
        if ctx.store is not None:
            return net(ctx.store.lookup(batch["input"], ctx.device)).float(), targets
        inputs = {k: v.to(ctx.device) for k, v in ctx.preprocessor(list(batch["input"]), train=train).items()}
        return ctx.adapter.logits(net, inputs).float(), targets

    def train_step(self, ctx, net, batch):
        logits, targets = self.logits_and_targets(ctx, net, batch, train=True)
        loss = F.cross_entropy(logits, targets)
        stats = [loss.item() * len(targets), (logits.argmax(-1) == targets).sum().item(), len(targets)]
        return loss, torch.tensor(stats, dtype=torch.float64, device=ctx.device)

    def train_metrics(self, stats):
        loss_sum, correct, examples = stats.tolist()
        return {"train_loss": loss_sum / max(examples, 1), "train_accuracy": correct / max(examples, 1)}

    @torch.no_grad()
    def evaluate(self, ctx: WorkerContext, model: torch.nn.Module, batches: Iterable[dict[str, Any]],
                 autocast: Callable[[], Any]) -> dict[str, float]:
        n = len(ctx.labels)
        confusion = torch.zeros(n, n, dtype=torch.long, device=ctx.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for batch in batches:
            with autocast():
                logits, targets = self.logits_and_targets(ctx, model, batch, train=False)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
            confusion += torch.bincount(targets * n + logits.argmax(-1), minlength=n * n).view(n, n)
        all_reduce(confusion)
        all_reduce(loss_sum)
        metrics = classification_metrics(confusion.cpu())
        return {"val_loss": (loss_sum / confusion.sum().clamp(min=1)).item()} | {f"val_{k}": v for k, v in metrics.items()}

    @torch.no_grad()
    def probabilities(self, artifact: "Artifact", inputs: list[Any]) -> torch.Tensor:
        """Class probabilities (len(inputs), num_labels) for raw inputs."""
        batch = artifact.preprocessor(inputs)
        return torch.softmax(artifact.adapter.logits(artifact.model, batch).float(), dim=-1)

    def predict(self, artifact, inputs, top_k: int = 3):
        """For each input: its top label, that label's probability and the top-k labels."""
        return [format_prediction(row.tolist(), artifact.labels, top_k) for row in self.probabilities(artifact, inputs)]


def format_prediction(probabilities: list[float], labels: list[str], top_k: int) -> dict[str, Any]:
    """``{label, probability, top_k: [{label, probability}, ...]}`` from one input's class probabilities."""
    ranked = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[: min(top_k, len(labels))]
    top = [{"label": labels[i], "probability": probabilities[i]} for i in ranked]
    return {"label": top[0]["label"], "probability": top[0]["probability"], "top_k": top}
