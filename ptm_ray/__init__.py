"""ptm_ray: fine-tune pretrained models on Ray (Train for fine-tuning, Tune for search, Serve for endpoints).

The public names below import on first use (PEP 562), so ``import ptm_ray`` and ``ptm-ray --help`` stay
fast and do not load torch, Ray or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Artifact", "Config", "FitResult", "fit", "load_artifact", "load_config"]

_HOMES = {"Artifact": "ptm_ray.checkpoint", "load_artifact": "ptm_ray.checkpoint", "Config": "ptm_ray.config",
          "load_config": "ptm_ray.config", "FitResult": "ptm_ray.train", "fit": "ptm_ray.train"}

if TYPE_CHECKING:
    from ptm_ray.checkpoint import Artifact, load_artifact
    from ptm_ray.config import Config, load_config
    from ptm_ray.train import FitResult, fit


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'ptm_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
