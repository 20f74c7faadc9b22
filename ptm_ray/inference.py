"""Predictions and evaluations from a checkpoint: the checkpoint's task does the work.

    artifact = load_artifact("<run>/checkpoint_000003")
    predict(artifact, ["where is my order?"], top_k=2)
    evaluate(artifact, "test.csv")        # the task's metrics (and classification's confusion matrix)
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any

from ptm_ray.checkpoint import Artifact
from ptm_ray.config import with_overrides
from ptm_ray.tasks import WorkerContext, task_for

__all__ = ["Evaluation", "evaluate", "predict", "serving_device"]


def predict(artifact: Artifact, inputs: list[Any], **options: Any) -> list[dict[str, Any]]:
    """One prediction per raw input (strings, or encoded image/audio bytes), shaped by the task:
    ``{label, probability, top_k}`` for classification (``top_k=3``), ``{labels, scores}`` for multilabel,
    boxes, a transcript or generated text for the others, with their options (``score_threshold``,
    ``max_new_tokens``, ...)."""
    with artifact.autocast():
        return task_for(artifact.task_name).predict(artifact, list(inputs), **options)


def serving_device(gpu_ids: list[Any]) -> str:
    """``cuda`` when Ray gave this process a GPU (``ray.get_gpu_ids()``) and torch can use it, else ``cpu``."""
    import torch

    return "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"


@dataclass
class Evaluation:
    """A checkpoint's metrics on one data file, as its task computes them during validation."""

    metrics: dict[str, float]
    """The task's validation metrics without their ``val_`` prefix: ``loss``, ``accuracy``, ``wer``, ..."""
    num_rows: int
    labels: list[str]
    details: dict[str, Any] = field(default_factory=dict)
    """The task's tables (``Task.details``): ``confusion`` for classification, ``matrix[true][predicted]``."""


def evaluate(artifact: Artifact, data: str, data_overrides: dict[str, Any] | None = None,
             key: str = "data") -> Evaluation:
    """Evaluate ``artifact`` on the labelled file (or media folder/manifest) ``data``, read and checked as
    training reads its validation file (the checkpoint's ``data`` settings plus ``data_overrides``, e.g.
    ``{"data.text_column": "sentence"}``), with the task's own validation code.

    Runs Ray Data (joins the cluster of ``RAY_ADDRESS``, or starts a local Ray without a dashboard). As in
    validation, a multilabel checkpoint with ``threshold: tune`` tunes its thresholds on this file, so its F1
    here is an optimistic estimate.

    Raises:
        ValueError: naming ``key`` and the file, with the row and column where there is one; a label the
            checkpoint does not know.
    """
    import torch

    from ptm_ray.runtime import init_ray
    from ptm_ray.worker import scores_of_raw_inputs

    cfg = with_overrides(artifact.config, {**(data_overrides or {}), "data.train": data, "data.validation": data})
    task = task_for(artifact.task_name)
    try:
        summary = task.inspect(cfg, artifact.family.modality)
    except ValueError as e:  # the checks name the config key they read, here the evaluated file
        raise ValueError(re.sub(r"\bdata\.(train|validation)\b(?!_)", key, str(e))) from None
    unknown = sorted(set(summary.labels) - set(artifact.labels))
    if unknown:
        raise ValueError(f"{key}: {data} holds labels the checkpoint was not trained on: {unknown} "
                         f"(its labels: {artifact.labels})")
    init_ray(dashboard=False)
    batches = task.datasets(summary, cfg)["validation"].iter_batches(batch_size=cfg.train.batch_size,
                                                                      batch_format="numpy")
    device = next(artifact.model.parameters()).device
    ctx = WorkerContext(artifact.family, artifact.preprocessor, artifact.labels, cfg, device,
                        scores_of_raw_inputs(artifact.family, artifact.preprocessor, device))
    with torch.no_grad():
        metrics = task.evaluate(ctx, artifact.model.eval(), batches, contextlib.nullcontext)
    return Evaluation({k.removeprefix("val_"): v for k, v in metrics.items()}, summary.num_val_rows,
                      artifact.labels, task.details())
