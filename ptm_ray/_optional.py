"""Imports of the optional extras (``pip install 'ptm_ray[demo]'``, ``[report]``, ...), with the fix in the error.

The core of ptm_ray (config, train, tune, serve, checkpoints) never imports these; only the demo data
makers and the report do, when called.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require_extra"]

_DISTRIBUTIONS = {"sklearn": "scikit-learn", "skimage": "scikit-image"}  # import name -> what pip installs


class MissingExtraError(ImportError):
    """A package of an optional extra is not installed; the message names the extra to install."""


def require_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, a package of the extra ``extra``, for ``purpose`` (named in the error).

    Raises:
        MissingExtraError: when it cannot be imported, with the ``pip install`` line that adds it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingExtraError(
            f"{purpose} needs {_DISTRIBUTIONS.get(top, top)}, which comes with the '{extra}' extra: "
            f"pip install 'ptm_ray[{extra}]'  (in a clone: pip install -e '.[{extra}]'). Import error: {e}"
        ) from e
