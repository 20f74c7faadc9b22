"""Predictions from a checkpoint: the checkpoint's task turns raw inputs into its own prediction shape.

    artifact = load_artifact("<run>/checkpoint_000003")
    predict(artifact, ["where is my order?"], top_k=2)
"""

from __future__ import annotations

from typing import Any

from ptm_ray.checkpoint import Artifact
from ptm_ray.tasks import task_for

__all__ = ["predict"]


def predict(artifact: Artifact, inputs: list[Any], **options: Any) -> list[dict[str, Any]]:
    """One prediction per raw input (strings, or encoded image/audio bytes), shaped by the task:
    ``{label, probability, top_k}`` for classification (``top_k=3``), ``{labels, scores}`` for multilabel,
    boxes, a transcript or generated text for the others, with their options (``score_threshold``,
    ``max_new_tokens``, ...)."""
    return task_for(artifact.task_name).predict(artifact, list(inputs), **options)
