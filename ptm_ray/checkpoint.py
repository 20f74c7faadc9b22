"""Self-describing checkpoints: everything needed to resume, evaluate or serve sits beside the weights.

Layout of one checkpoint folder::

    model/            architecture + weights (safetensors), written by the model family, with what the model's
                      own library loads it with: ``transformers.pipeline(task, model="<ckpt>/model")`` finds
                      the tokenizer / feature extractor / CTC processor and id2label there,
                      ``timm.create_model("local-dir:<ckpt>/model", pretrained=True)`` timm's config.json
    preprocessor/     tokenizer (or image/audio transform) exactly as training used it
    config.yaml       the resolved run config
    ptm_ray.json      family, model name, task (+ what it learned, e.g. thresholds), labels, epoch, metrics,
                      per-epoch history
    train_state.pt    optimizer/scheduler/early-stopping state (resume only; tensors and numbers)
    variant/          only a run that trained adapters and head alone (LoRA, or every block frozen): those
                      tensors and their base, so a server shares the base between variants (``ptm_ray.variants``)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ptm_ray.config import Config, config_from_dict, config_to_dict
from ptm_ray.models import Family, Preprocessor, family_for

__all__ = ["Artifact", "FORMAT_VERSION", "as_uri", "load_artifact", "read_meta", "save_checkpoint", "to_device"]

FORMAT_VERSION = 1
_META = "ptm_ray.json"


def save_checkpoint(
    path: Path,
    *,
    family: Family,
    model: nn.Module,
    preprocessor: Preprocessor,
    cfg: Config,
    labels: list[str],
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    train_state: dict[str, Any] | None = None,
    task_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint folder at ``path`` and return it.

    ``task_state`` is what the task learned beside the weights that prediction needs (``Task.state``).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    family.save(model, path / "model")
    family.save_ecosystem_files(model, preprocessor, labels, path / "model")
    preprocessor.save(path / "preprocessor")
    (path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    meta = {
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "model_name": cfg.model.name,
        "task": cfg.model.task,
        "task_state": task_state or {},
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
    """The ``ptm_ray.json`` of a checkpoint folder or URI (labels, metrics, history, ...)."""
    if "://" in str(path):
        import pyarrow.fs

        fs, inner = pyarrow.fs.FileSystem.from_uri(f"{str(path).rstrip('/')}/{_META}")
        if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
            raise ValueError(f"{path} is not a ptm_ray checkpoint: {_META} is missing")
        with fs.open_input_stream(inner) as f:
            return json.loads(f.read())
    meta_file = Path(path) / _META
    if not meta_file.is_file():
        raise ValueError(f"{path} is not a ptm_ray checkpoint: {_META} is missing")
    return json.loads(meta_file.read_text())


def as_uri(path: str, storage: str) -> str:
    """``path`` as Ray reports it, made usable: Ray gives a path inside the storage's filesystem, without the
    scheme (``bucket/runs/run/checkpoint_000001``); under a URI ``storage`` (``s3://bucket/runs``) put it back."""
    if "://" in storage and "://" not in path:
        return f"{storage.split('://', 1)[0]}://{path.lstrip('/')}"
    return path


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Optimizer, scheduler and early-stopping state saved for resuming."""
    return torch.load(Path(path) / "train_state.pt", weights_only=True)


@dataclass
class Artifact:
    """A loaded checkpoint: model in eval mode, its preprocessor, labels and metadata (storage only:
    ``ptm_ray.inference.predict`` asks the checkpoint's task to predict)."""

    path: Path | str
    """The checkpoint folder, or the URI it was loaded from."""
    family: Family
    model: nn.Module
    preprocessor: Preprocessor
    labels: list[str]
    config: Config
    meta: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where ``model`` lives; ``batch`` puts the preprocessed inputs there too."""

    @property
    def task_name(self) -> str:
        """The ``model.task`` this checkpoint was fine-tuned for."""
        return self.meta.get("task", "classification")

    def batch(self, inputs: list[Any]) -> Any:
        """Raw inputs preprocessed as in training, on the model's device (what the tasks' predict paths feed it)."""
        return to_device(self.preprocessor(list(inputs)), self.device)

    def autocast(self) -> Any:
        """bf16 autocast on a GPU that supports it, as the run trained (``train.precision`` auto or bf16); else off."""
        precision = self.config.train.precision
        bf16 = (self.device.type == "cuda" and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported())
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors in ``value`` (a tensor, or dicts/lists of them) moved to ``device``; everything else as it is."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, Mapping):  # a dict, or a tokenizer's BatchEncoding
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list) and any(torch.is_tensor(v) or isinstance(v, Mapping) for v in value):
        return [to_device(v, device) for v in value]
    return value


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> Artifact:
    """Load a checkpoint folder (or a URI Ray Train can read) for evaluation or serving, its model on ``device``.

    A URI's checkpoint is copied to a temporary folder, loaded into memory and the copy removed (``path`` of
    the artifact stays the URI).
    """
    if "://" not in str(path):
        return _load_folder(Path(path), device)
    from ray.train import Checkpoint

    local = tempfile.mkdtemp(prefix="ptm_ray_ckpt_")
    try:
        artifact = _load_folder(Path(Checkpoint(str(path)).to_directory(local)), device, shown=str(path))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    artifact.path = str(path)
    return artifact


def _check_manifest(path: Path, shown: str) -> None:
    """A registry version (its ``lineage.json`` has a manifest) must hold exactly the bytes it was promoted with.

    Raises:
        ValueError: naming ``shown`` (the path or URI asked for) and each file that differs.
    """
    lineage = path / "lineage.json"
    files = json.loads(lineage.read_text()).get("files") if lineage.is_file() else None
    if not files:
        return
    import pyarrow.fs

    from ptm_ray.model_store import manifest_problems

    problems = manifest_problems(pyarrow.fs.LocalFileSystem(), str(path.resolve()), files)
    if problems:
        raise ValueError(f"{shown} is incomplete or corrupt (its files differ from the manifest written when it was "
                         f"promoted): {'; '.join(problems)}")


def _load_folder(path: Path, device: str | torch.device, shown: str | None = None) -> Artifact:
    _check_manifest(path, shown or str(path))
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}")
    cfg = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
    family = family_for(meta["family"])
    device = torch.device(device)
    model = family.load(path / "model").eval().to(device)
    preprocessor = family.load_preprocessor(path / "preprocessor")
    return Artifact(path, family, model, preprocessor, meta["labels"], cfg, meta, device)
