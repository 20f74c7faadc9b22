"""What a run prints: one readable stream by default, everything with ``--verbose`` or ``PTM_RAY_VERBOSE=1``.

By default the console shows ptm_ray's own lines: stage headers, one line per epoch (printed by the driver
from rank 0's report, so once), the search's progress and the summary tables. Ray's, Ray Data's and
Serve's INFO logs, the workers' output (transformers' load reports, Train's ``TrainingReport(...)`` lines),
access logs and deprecation warnings stay in Ray's session log files, whose folder the summaries name.
Verbose mode leaves every Ray and library default as it is.

Only the standard library is imported at module level: the command line imports this for ``--verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Iterator

__all__ = ["VERBOSE_ENV", "epoch_line", "logs_dir", "quiet_driver", "quiet_tune", "ray_init_options", "set_verbose",
           "verbose"]

VERBOSE_ENV = "PTM_RAY_VERBOSE"
"""Environment variable that turns verbose mode on (``1``, ``true``, ``yes``), as ``--verbose`` does."""

_EPOCH_SKIP = ("samples_per_s", "epoch_time_s")


def verbose() -> bool:
    """Whether everything is printed (``PTM_RAY_VERBOSE=1`` or ``--verbose``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool = True) -> None:
    """Turn verbose mode on or off for this process and the processes it starts."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def ray_init_options() -> dict[str, Any]:
    """Extra ``ray.init`` arguments: the workers' output reaches the console only in verbose mode (it
    always goes to the session's ``logs/worker-*.out`` files)."""
    return {"log_to_driver": verbose()}


def quiet_driver() -> None:
    """Quiet this (driver) process's Ray, Ray Data, Ray Serve and transformers logs, unless verbose.

    Console handlers are raised to ERROR; Ray's file handlers (``ray-data.log`` and the like) keep logging
    at their own levels. Ray's and Ray Data's deprecation warnings are hidden. Idempotent.
    """
    if verbose():
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed", module=r"(ray|ptm_ray)(\.|$)")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # transformers is a core dependency; a broken install fails elsewhere, louder
        pass


@contextlib.contextmanager
def quiet_tune() -> Iterator[None]:
    """Around ``Tuner.fit()``: no Tune console output unless verbose (the search prints its own lines).

    Tune's default output engine prints its "Configuration for experiment" box and "View detailed results
    here" lines even at ``verbose=0``; its legacy engine (``RAY_AIR_NEW_OUTPUT=0``) at ``verbose=0`` prints
    nothing. Verbose mode keeps the default engine and its tables.
    """
    if verbose():
        yield
        return
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def logs_dir() -> str | None:
    """The folder of this Ray session's log files (every process's full output), or None without Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        node = ray._private.worker.global_worker.node  # the public API has no accessor for it
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - a log path is a courtesy in a summary, never a reason to fail
        return None


def epoch_line(metrics: dict[str, Any], epochs: int, early_stop: bool = False) -> str:
    """One epoch as one line: its training and validation metrics, the overfitting gap, the throughput."""
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                     if k.startswith(("train_", "val_")) and k not in _EPOCH_SKIP and isinstance(v, (int, float)))
    line = f"[ptm_ray] epoch {metrics['epoch']}/{epochs} {shown} gap_loss={metrics['gap_loss']:+.4f} " \
           f"{metrics['samples_per_s']:.1f} samples/s"
    return line + (" (early stop)" if early_stop else "")
