"""Experiment tracking: MLflow runs and TensorBoard event files (``tracking.*``, the ``tracking`` extra).

A fine-tuning run (``fit``) is one MLflow run, written by the driver as the epochs arrive
(``ptm_ray.progress``): the resolved config as params, every epoch's metrics (step = epoch), and at the end
the best checkpoint as the artifact ``best_checkpoint/``; its TensorBoard event files go to
``<run folder>/tensorboard``. A search is a parent run (the base config and the space as params, the
leaderboard and the promoted checkpoint as artifacts) whose trials are child runs logged by Ray Tune's own
``MLflowLoggerCallback``; Tune's ``TBXLoggerCallback`` writes each trial's event files in its folder.

The default store is a folder, ``<storage.path>/mlruns``: ``mlflow ui --backend-store-uri <that folder>``
and ``tensorboard --logdir <storage.path>`` show everything (README, "Experiment tracking").
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from ptm_ray._optional import MissingExtraError, require_extra
from ptm_ray.config import Config, config_to_dict

__all__ = ["RunTracker", "SearchTracker", "mlflow_uri", "tracking_wanted"]

_BATCH = 100  # MLflow's most params per log_batch call
_REQUIRE = {"mlflow": lambda why: require_extra("mlflow", "tracking", why),  # literal names: tests/test_install.py
            "tensorboard": lambda why: require_extra("tensorboard", "tracking", why)}


def mlflow_uri(cfg: Config) -> str:
    """``tracking.uri``, or the file store ``<storage.path>/mlruns``; "" when ``storage.path`` is object storage
    (``s3://``, ``gs://``, ...) and no ``tracking.uri`` is set: MLflow's file store is a local folder."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if cfg.storage.path.startswith("file://"):
        return f"{cfg.storage.path.rstrip('/')}/mlruns"
    if "://" in cfg.storage.path:
        return ""
    return (Path(cfg.storage.path).expanduser().resolve() / "mlruns").as_uri()


def tracking_wanted(cfg: Config, tool: str) -> bool:
    """Whether ``tool`` (``mlflow`` or ``tensorboard``) tracks this run: ``auto`` when it is installed.

    Raises:
        MissingExtraError: ``tracking.<tool>=on`` without the package, naming the extra that brings it.
    """
    setting = getattr(cfg.tracking, tool)
    if setting == "off":
        return False
    try:
        _REQUIRE[tool](f"tracking.{tool}={setting}")
    except MissingExtraError:
        if setting == "on":
            raise
        return False
    if tool == "mlflow" and not mlflow_uri(cfg):  # tracking.mlflow=on was refused when the config loaded
        print(f"[ptm_ray] MLflow tracking is off: storage.path={cfg.storage.path} is object storage, where MLflow's "
              "file store cannot live; set tracking.uri to an MLflow server to track this run")
        return False
    return True


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = str(value)[:6000]  # MLflow's longest param value
    return flat


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def allow_file_store(uri: str) -> None:
    """MLflow 3 keeps the file store in maintenance mode behind this switch; it is the store that needs no server
    and no database (README: open it with `mlflow ui` and the same switch). Set it for any ``file:`` store we log
    to, Tune's restored MLflowLoggerCallback included."""
    if uri.startswith("file:"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"


class _MlflowRun:
    """One MLflow run through ``MlflowClient`` (no process-global active run: safe on a driver thread)."""

    def __init__(self, cfg: Config, name: str, tags: dict[str, str] | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = mlflow_uri(cfg)
        allow_file_store(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(cfg.tracking.experiment)
        self.experiment_id = (experiment.experiment_id if experiment is not None
                              else self.client.create_experiment(cfg.tracking.experiment))
        self.run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags or {}).info.run_id

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_folder(self, folder: str, artifact_path: str) -> None:
        if "://" in folder:  # a checkpoint on object storage: name it rather than copy it
            self.client.set_tag(self.run_id, artifact_path, folder)
        else:
            self.client.log_artifacts(self.run_id, folder, artifact_path)

    def end(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class RunTracker:
    """The trackers of one fine-tuning run, fed on the driver: ``log_epoch`` per epoch, then ``finish``."""

    def __init__(self, cfg: Config, run_name: str, run_folder: str) -> None:
        self.mlflow = self.writer = None
        if tracking_wanted(cfg, "mlflow"):
            self.mlflow = _MlflowRun(cfg, run_name, {"ptm_ray.run_folder": run_folder})
            run_groups = {k: v for k, v in config_to_dict(cfg).items() if k not in ("search", "serve")}
            self.mlflow.log_params(_flatten(run_groups))
        if tracking_wanted(cfg, "tensorboard") and "://" not in run_folder:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_folder) / "tensorboard"))

    def where(self) -> list[str]:
        """Where this run's records are, for the summary."""
        lines = [f"MLflow run {self.mlflow.run_id} in {self.mlflow.uri}"] if self.mlflow else []
        return lines + ([f"TensorBoard events in {self.writer.log_dir}"] if self.writer else [])

    def log_epoch(self, metrics: dict[str, Any], checkpoint: str | None = None) -> None:
        numbers, step = _numbers(metrics), int(metrics["epoch"])
        numbers.pop("epoch", None)
        if self.mlflow:
            self.mlflow.log_metrics(numbers, step)
        if self.writer:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def finish(self, best_checkpoint: str | None) -> None:
        """Log the best checkpoint (when the run produced one) and close the run."""
        if self.mlflow:
            if best_checkpoint:
                self.mlflow.log_folder(best_checkpoint, "best_checkpoint")
            self.mlflow.end(failed=best_checkpoint is None)
        if self.writer:
            self.writer.close()


class SearchTracker:
    """A search's parent MLflow run; ``callbacks()`` gives Tune the callback that logs each trial as a child."""

    def __init__(self, cfg: Config, experiment_name: str, experiment_path: str) -> None:
        self.cfg, self.experiment_path = cfg, experiment_path
        self.mlflow = None
        if tracking_wanted(cfg, "mlflow"):
            self.mlflow = _MlflowRun(cfg, experiment_name, {"ptm_ray.search": experiment_path})
            self.mlflow.log_params(_flatten(config_to_dict(cfg)))

    def where(self) -> list[str]:
        """Where the search's records are, for the summary."""
        lines = [f"MLflow parent run {self.mlflow.run_id} (a child run per trial) in {self.mlflow.uri}"] \
            if self.mlflow else []
        return lines + [f"TensorBoard events in each trial's folder under {self.experiment_path}"]

    def callbacks(self) -> list[Any]:
        """Ray Tune's ``MLflowLoggerCallback``, its runs tagged as children of this one (none without MLflow)."""
        if not self.mlflow:
            return []
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        return [MLflowLoggerCallback(tracking_uri=self.mlflow.uri, experiment_name=self.cfg.tracking.experiment,
                                     tags={"mlflow.parentRunId": self.mlflow.run_id})]

    def finish(self, leaderboard_csv: Path | None, best_score: float | None, best_checkpoint: str | None) -> None:
        """The leaderboard and the best trial's checkpoint as artifacts, its score as a metric; closes the run."""
        if not self.mlflow:
            return
        if leaderboard_csv is not None:
            self.mlflow.client.log_artifact(self.mlflow.run_id, str(leaderboard_csv))
        if best_score is not None:
            self.mlflow.log_metrics({f"best_{self.cfg.train.metric}": float(best_score)}, step=0)
        if best_checkpoint:
            self.mlflow.log_folder(best_checkpoint, "best_checkpoint")
        self.mlflow.end(failed=best_checkpoint is None)
