"""Self-describing checkpoints: everything needed to resume, evaluate or serve sits beside the weights.

Layout of one checkpoint folder::

    model/            architecture + weights (safetensors), written by the family adapter
    preprocessor/     tokenizer (or image/audio transform) exactly as training used it
    config.yaml       the resolved run config
    ptm_ray.json      source prefix, model name, task, labels, epoch, metrics, per-epoch history
    train_state.pt    optimizer/scheduler/early-stopping state (resume only; tensors and numbers)
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ptm_ray.config import Config, config_from_dict, config_to_dict
from ptm_ray.models import adapter_for_family
from ptm_ray.models.registry import Adapter

__all__ = ["Artifact", "FORMAT_VERSION", "load_artifact", "read_meta", "save_checkpoint"]

FORMAT_VERSION = 1
_META = "ptm_ray.json"


def save_checkpoint(
    path: Path,
    *,
    adapter: Adapter,
    model: nn.Module,
    preprocessor: Any,
    cfg: Config,
    labels: list[str],
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint folder at ``path`` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    adapter.save(model, path / "model")
    preprocessor.save(path / "preprocessor")
    (path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    meta = {
        "format_version": FORMAT_VERSION,
        "family": adapter.family,
        "model_name": cfg.model.name,
        "task": cfg.model.task,
        "labels": labels,
        "epoch": metrics.get("epoch"),
        "metrics": metrics,
        "history": history,
    }
    (path / _META).write_text(json.dumps(meta, indent=2))
    if train_state is not None:
        torch.save(train_state, path / "train_state.pt")
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``ptm_ray.json`` of a checkpoint folder (labels, metrics, history, ...)."""
    meta_file = Path(path) / _META
    if not meta_file.is_file():
        raise ValueError(f"{path} is not a ptm_ray checkpoint: {_META} is missing")
    return json.loads(meta_file.read_text())


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Optimizer, scheduler and early-stopping state saved for resuming."""
    return torch.load(Path(path) / "train_state.pt", weights_only=True)


@dataclass
class Artifact:
    """A loaded checkpoint: model in eval mode, its preprocessor, labels and metadata."""

    path: Path
    adapter: Adapter
    model: nn.Module
    preprocessor: Any
    labels: list[str]
    config: Config
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> Any:
        """The ``ptm_ray.tasks`` task this checkpoint was fine-tuned for."""
        from ptm_ray.tasks import task_for

        return task_for(self.meta.get("task", "classification"))

    def predict_proba(self, inputs: list[Any]) -> torch.Tensor:
        """Class probabilities (len(inputs), num_labels) for raw inputs (classification checkpoints)."""
        return self.task.probabilities(self, inputs)

    def predict(self, inputs: list[Any], **options: Any) -> list[dict[str, Any]]:
        """One prediction per raw input (strings, or encoded image/audio bytes), shaped by the task:
        ``{label, probability, top_k}`` for classification (``top_k=3``); boxes, a transcript or generated
        text for the others, with their options (``score_threshold``, ``max_new_tokens``, ...)."""
        return self.task.predict(self, inputs, **options)


def load_artifact(path: str | Path) -> Artifact:
    """Load a checkpoint folder (or a URI Ray Train can read) for evaluation or serving."""
    if "://" in str(path):
        from ray.train import Checkpoint

        path = Checkpoint(str(path)).to_directory(tempfile.mkdtemp(prefix="ptm_ray_ckpt_"))
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}")
    cfg = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
    adapter = adapter_for_family(meta["family"])
    model = adapter.load(path / "model").eval()
    preprocessor = adapter.load_preprocessor(path / "preprocessor")
    return Artifact(path, adapter, model, preprocessor, meta["labels"], cfg, meta)
