"""Multi-label classification: any number of labels per input (text, image or audio).

Data: ``data.label_column`` holds each row's labels: in CSV one cell joined by ``label_separator``
(``billing|refund``; an empty cell is an input with no label), in JSONL and Parquet a list of strings.
Image and audio data come as a manifest (``data.path_column`` + the label column). Every label of the
validation data must occur in training; a bad label cell fails naming the file, row and column.

The head scores every label independently: sigmoid + binary cross-entropy. Validation reports
``val_micro_f1`` (the default metric), ``val_macro_f1`` (over the labels that occur as truth or
prediction) and ``val_loss``, with a label predicted when its score reaches its threshold. Thresholds
are ``model.task_options.threshold`` (default 0.5) for every label, or with ``threshold: tune`` chosen per
label on validation to maximise that label's F1 (so its metrics are optimistic) and saved with the
checkpoint for prediction. Metrics come from per-label score histograms (1,000 bins, summed across
workers), so thresholds are exact to 0.001.

Task options (``model.task_options``): ``label_separator`` (default ``|``), ``threshold`` (0-1 or ``tune``).
Predictions: ``{"labels": [labels at or above their threshold, best first], "scores": {label: score}}``;
a request's ``parameters.threshold`` overrides the thresholds for that request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ptm_ray.models.base import Classifier
from ptm_ray.tasks.base import Task, all_reduce, loss_stats, parse_options
from ptm_ray.tasks.registry import register_task

if TYPE_CHECKING:
    from ptm_ray.checkpoint import Artifact
    from ptm_ray.data import DataSummary

__all__ = ["MultiLabelTask", "multilabel_f1", "tuned_thresholds"]

BINS = 1000  # score histogram bins: thresholds are exact to 1 / BINS


class _TaskOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label_separator: str = Field(default="|", min_length=1)
    threshold: Union[float, Literal["tune"]] = 0.5


class _RequestOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)


def _label_set(value: Any, separator: str, where: str) -> list[str]:
    """The labels of one row: a separator-joined string or a list of strings (an empty cell: no labels)."""
    if value is None:
        return []
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):  # a CSV column of single numbers
        value = str(value)
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(separator)] if value.strip() else []
    elif isinstance(value, (list, tuple, np.ndarray)) and all(isinstance(v, str) for v in value):
        parts = [str(v).strip() for v in value]
    else:
        raise ValueError(f"{where}: expected labels joined by {separator!r} or a list of strings, got {value!r}")
    if any(not p for p in parts):
        raise ValueError(f"{where}: empty label in {value!r} (labels joined by {separator!r}, none empty)")
    return parts


def multilabel_f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> dict[str, float]:
    """Micro-F1 over every (input, label) decision and macro-F1 over the labels that occur as truth or prediction."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    micro = (2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)).item()
    present = (tp + fp + fn) > 0
    per_label = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    return {"micro_f1": micro, "macro_f1": per_label[present].mean().item() if present.any() else 0.0}


def _counts_at(positive: torch.Tensor, negative: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(tp, fp, fn) per label when label l is predicted for scores in bins >= ``bins[l]``."""
    # cumulative counts from the top bin down: above[l, k] = examples of label l scoring in bins k..BINS-1
    pos_above = positive.flip(1).cumsum(1).flip(1)
    neg_above = negative.flip(1).cumsum(1).flip(1)
    rows = torch.arange(len(bins))
    tp, fp = pos_above[rows, bins], neg_above[rows, bins]
    return tp, fp, positive.sum(1) - tp


def tuned_thresholds(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Per label, the histogram bin (threshold ``bin / BINS``) that maximises its F1; ties go to the bin
    nearest 0.5, and a label never seen positive keeps 0.5."""
    pos_above = positive.flip(1).cumsum(1).flip(1).double()[:, 1:]  # thresholds 1/BINS .. (BINS-1)/BINS
    neg_above = negative.flip(1).cumsum(1).flip(1).double()[:, 1:]
    f1 = 2 * pos_above / (pos_above + positive.sum(1, keepdim=True) + neg_above).clamp(min=1)
    candidates = torch.arange(1, positive.shape[1])
    nearness = -(candidates - positive.shape[1] // 2).abs().double() / positive.shape[1]  # tie-break, < one step
    best = (f1 + 1e-9 * nearness).argmax(1) + 1
    return torch.where(positive.sum(1) > 0, best, torch.full_like(best, positive.shape[1] // 2))


@register_task
class MultiLabelTask(Task):
    """Rows ``input`` and ``label`` (a label set); one sigmoid score per label."""

    name = "multilabel"
    metric, mode = "val_micro_f1", "max"
    head = "classifier"
    requires = (Classifier,)
    trains_on_logits = True
    batched = True
    options_class = _TaskOptions

    def __init__(self) -> None:
        self._thresholds: list[float] | None = None  # set by evaluate when thresholds are tuned

    # --- data -----------------------------------------------------------------------------------------------
    def inspect(self, cfg, modality) -> "DataSummary":
        from ptm_ray.data import DataSummary, hash_split_counts, split_counts

        data, separator = cfg.data, cfg.model.task_options["label_separator"]
        train = self._read(cfg, data.train, "data.train", modality)
        val = self._read(cfg, data.validation, "data.validation", modality) if data.validation else None
        labels = sorted({label for _, row in train for label in row})
        if len(labels) < 2:
            raise ValueError(f"data.train: {data.train} has labels {labels}; multi-label classification needs at "
                             f"least two (column {data.label_column!r}, joined by {separator!r})")
        for row, (_, value) in enumerate(val or []):
            unknown = sorted(set(value) - set(labels))
            if unknown:
                raise ValueError(f"data.validation: {data.validation} row {row + 1}, column {data.label_column!r}: "
                                 f"labels {unknown} do not occur in the training data (labels: {labels})")
        if modality == "text":
            counts = (len(train), len(val)) if val is not None else hash_split_counts([text for text, _ in train], data)
            return DataSummary(labels, *counts)
        if val is None:  # a fixed, seeded split: part of the data, not of the run
            order = np.random.default_rng(0).permutation(len(train))
            num_train, _ = split_counts(len(train), data)
            train, val = [train[i] for i in order[:num_train]], [train[i] for i in order[num_train:]]
        return DataSummary(labels, len(train), len(val), train, val)

    @staticmethod
    def _read(cfg, path: str, key: str, modality: str) -> list[tuple[Any, list[str]]]:
        """(input or file, label set) rows of one file, checked."""
        from ptm_ray.data import check_columns, check_media_files, list_media_files, read_table

        data, separator = cfg.data, cfg.model.task_options["label_separator"]
        where = lambda row: f"{key}: {path} row {row + 1}, column {data.label_column!r}"  # noqa: E731
        if modality != "text":
            rows = list_media_files(path, data, key, modality, label=lambda v, row: _label_set(v, separator, where(row)))
            return check_media_files(rows, data, key, modality)[0]
        table = read_table(path, data.format, key)
        columns = {data.text_column: "data.text_column", data.label_column: "data.label_column"}
        check_columns(table, path, key, columns, data.text_column, may_be_empty=(data.label_column,))
        values = table[data.label_column].to_pylist()
        return [(text, _label_set(v, separator, where(row)))
                for row, (text, v) in enumerate(zip(table[data.text_column].to_pylist(), values))]

    def datasets(self, summary, cfg):
        from ptm_ray.data import media_datasets, table_datasets

        data = cfg.data
        if summary.train_files is None:
            return table_datasets(data, {data.text_column: "input", data.label_column: "label"}, summary)
        return media_datasets(summary, cfg)

    # --- training and validation ---------------------------------------------------------------------------
    def _targets(self, ctx, batch) -> torch.Tensor:
        index = {label: i for i, label in enumerate(ctx.labels)}
        separator = ctx.cfg.model.task_options["label_separator"]
        targets = torch.zeros(len(batch["label"]), len(ctx.labels), device=ctx.device)
        for row, value in enumerate(batch["label"]):
            for label in _label_set(value, separator, "a training row"):
                targets[row, index[label]] = 1.0
        return targets

    def train_step(self, ctx, net, batch):
        logits = ctx.logits(net, batch["input"], True).float()
        loss = F.binary_cross_entropy_with_logits(logits, self._targets(ctx, batch))
        return loss, loss_stats(loss, len(logits), ctx.device)

    def evaluate(self, ctx, model, batches, autocast):
        n = len(ctx.labels)
        positive = torch.zeros(n, BINS, dtype=torch.long, device=ctx.device)  # score histograms per label
        negative = torch.zeros(n, BINS, dtype=torch.long, device=ctx.device)
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for batch in batches:
            with autocast():
                logits = ctx.logits(model, batch["input"], False).float()
            targets = self._targets(ctx, batch)
            sums += loss_stats(F.binary_cross_entropy_with_logits(logits, targets), len(logits), ctx.device)
            bins = (torch.sigmoid(logits) * BINS).long().clamp(max=BINS - 1)
            cells = torch.arange(n, device=ctx.device) * BINS + bins  # (batch, labels) -> flat histogram index
            positive += torch.bincount(cells[targets > 0], minlength=n * BINS).view(n, BINS)
            negative += torch.bincount(cells[targets == 0], minlength=n * BINS).view(n, BINS)
        for t in (positive, negative, sums):
            all_reduce(t)
        positive, negative = positive.cpu(), negative.cpu()
        setting = ctx.cfg.model.task_options["threshold"]
        if setting == "tune":
            thresholds = tuned_thresholds(positive, negative)
            self._thresholds = (thresholds.double() / BINS).tolist()
        else:
            thresholds = torch.full((n,), round(float(setting) * BINS), dtype=torch.long).clamp(0, BINS - 1)
        metrics = multilabel_f1(*_counts_at(positive, negative, thresholds))
        return {"val_loss": (sums[0] / sums[1].clamp(min=1)).item()} | {f"val_{k}": v for k, v in metrics.items()}

    def state(self) -> dict[str, Any]:
        return {"thresholds": self._thresholds} if self._thresholds is not None else {}

    # --- prediction and serving ------------------------------------------------------------------------------
    @torch.no_grad()
    def outputs(self, artifact: "Artifact", inputs: list[Any]) -> list[list[float]]:
        """Per input, the score of every label."""
        return self.scores(artifact.family.logits(artifact.model, artifact.batch(inputs)))

    def scores(self, logits: torch.Tensor) -> list[list[float]]:
        return torch.sigmoid(logits.float()).tolist()

    def format(self, output, artifact, threshold: float | None = None):
        """The labels at or above their threshold (best first) and every label's score."""
        if threshold is not None:
            thresholds = [threshold] * len(output)
        else:
            tuned = artifact.meta.get("task_state", {}).get("thresholds")
            setting = artifact.config.model.task_options["threshold"]
            thresholds = tuned or [0.5 if setting == "tune" else float(setting)] * len(output)
        chosen = sorted((i for i, s in enumerate(output) if s >= thresholds[i]), key=lambda i: -output[i])
        return {"labels": [artifact.labels[i] for i in chosen],
                "scores": {label: score for label, score in zip(artifact.labels, output)}}

    def describe(self, prediction):
        scores = prediction["scores"]
        best = sorted(scores, key=lambda label: -scores[label])[:5]
        chosen = ", ".join(prediction["labels"]) or "(no label)"
        return f"{chosen}  (scores: {', '.join(f'{label} {scores[label]:.3f}' for label in best)})"

    def request_options(self, parameters, settings):
        options = parse_options(_RequestOptions, parameters, hint="multilabel takes threshold in [0, 1]")
        return {k: v for k, v in options.items() if v is not None}
