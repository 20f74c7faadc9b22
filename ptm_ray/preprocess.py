"""Preprocessing in Ray Data beside the trainers (``data.preprocess``): tokenize, or decode + resize + normalise,
in Ray Data tasks on the cluster's CPUs, so that a training worker only pads a batch and runs the model.

The preprocessing is the run's own preprocessor: made once on the driver (``family.preprocessor``), handed to
the Ray Data tasks as the files its ``save`` writes (loaded there with ``load``, as a Serve replica loads it
from a checkpoint), and handed to the workers the same way, who save it with every checkpoint. Training and
serving cannot skew, and the two paths give the same batches: ``collate(rows(inputs))`` equals
``preprocessor(inputs)`` (``Preprocessor.rows``/``collate``).

A preprocessed dataset has the columns ``input.<name>`` (the model inputs of ``rows``: token ids without
padding, or float images) and the raw dataset's other columns (``label``). ``Worker.batches`` collates the
``input.*`` columns into a ``PreparedInputs``, which ``ptm_ray.worker.scores_of_raw_inputs`` feeds the model
as it is.

Which splits: validation always (no randomness); training too unless the preprocessor draws random numbers in
training (``data.augment``): augmentation stays in the worker, whose random state the run's seed fixes.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ptm_ray.config import Config

if TYPE_CHECKING:
    import ray.data

    from ptm_ray.models import Preprocessor

__all__ = ["AUTO_SPARE_CPUS", "PreparedInputs", "load_packed", "pack_preprocessor", "prepared_batch",
           "preprocess_datasets", "preprocess_splits"]

# data.preprocess=auto moves preprocessing into Ray Data when the cluster has at least this many CPUs the
# training workers do not hold: fewer, and the Ray Data tasks would only take turns with the workers' own
# threads on the same cores (bench/bench_data_scale.py on 2 CPUs).
AUTO_SPARE_CPUS = 2.0

PREFIX = "input."
"""Column prefix of the model inputs in a preprocessed dataset."""


class PreparedInputs:
    """A batch's model inputs, made by Ray Data and collated in the worker: stands where a batch's raw ``input``
    column would, so a task's step is the same on both paths."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))


def preprocess_splits(cfg: Config, task: Any, family: Any, make_preprocessor: Callable[[], "Preprocessor"],
                      feature_cache: bool, spare_cpus: float,
                      in_search: bool) -> tuple[list[str], str, "Preprocessor | None"]:
    """(the splits Ray Data preprocesses, [] for none; why; the run's preprocessor for them, made by
    ``make_preprocessor`` only when some split goes to Ray Data), from ``data.preprocess``.

    Raises:
        ValueError: for ``data.preprocess=ray_data`` where this run cannot preprocess in Ray Data, naming why.
    """
    from ptm_ray.models import Classifier

    setting = cfg.data.preprocess
    if setting == "workers":
        return [], "data.preprocess=workers", None
    cannot, hint = None, ""  # the hint goes with a refusal of ray_data only, not with auto's line on every run
    if not (task.trains_on_logits and isinstance(family, Classifier)):
        cannot = f"model.task={cfg.model.task} preprocesses in its own steps"
    elif not family.preprocessor_class.prepares_rows:
        cannot = f"the {family.name} family's preprocessor does not split into rows"
    elif feature_cache:
        cannot, hint = "the feature cache looks its rows up by their raw input", " (train.feature_cache=off turns it off)"
    elif in_search:
        cannot = "a search's trials share the CPUs the Ray Data tasks would need"
    if cannot and setting == "ray_data":
        raise ValueError(f"data.preprocess=ray_data is not available for this run: {cannot}{hint}; "
                         "set data.preprocess=auto or workers")
    if cannot:
        return [], f"data.preprocess=auto: {cannot}", None
    if setting == "auto" and family.modality != "text":
        # measured (bench_data_scale.py): 2k files of 96 px held 185 MiB of the object store, 36x their encoded
        # bytes, against a 4 MiB ingest budget that Ray Data treats as soft; it would grow with the dataset
        return [], ("data.preprocess=auto: decoded images would fill the object store ahead of the workers; "
                    "data.preprocess=ray_data moves them anyway"), None
    if setting == "auto" and spare_cpus < AUTO_SPARE_CPUS:
        return [], (f"data.preprocess=auto: {spare_cpus:g} CPU(s) beside the workers, under {AUTO_SPARE_CPUS:g}: "
                    "the Ray Data tasks would take turns with the workers on the same cores"), None
    preprocessor = make_preprocessor()
    splits = ["validation"] if preprocessor.random_in_training() else ["train", "validation"]
    why = f"data.preprocess={setting}" + (f": {spare_cpus:g} CPU(s) beside the workers" if setting == "auto" else "")
    if splits == ["validation"]:
        why += f"; training images stay in the workers (data.augment={cfg.data.augment} draws per-epoch, seeded)"
    return splits, why, preprocessor


def pack_preprocessor(preprocessor: "Preprocessor") -> bytes:
    """The folder ``preprocessor.save`` writes, as a tar archive in memory: what Ray Data tasks and workers on
    any node load it from (``load_packed``)."""
    with tempfile.TemporaryDirectory() as tmp:
        preprocessor.save(Path(tmp) / "preprocessor")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(Path(tmp) / "preprocessor", arcname="preprocessor")
        return buffer.getvalue()


_LOADED: dict[str, "Preprocessor"] = {}  # per process: a Ray worker process reused by many tasks loads once


def load_packed(preprocessor_class: type, packed: bytes) -> "Preprocessor":
    """The preprocessor ``pack_preprocessor`` packed, loaded with its class's own ``load``."""
    key = hashlib.sha256(packed).hexdigest()
    if key not in _LOADED:
        with tempfile.TemporaryDirectory() as tmp:
            with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
                tar.extractall(tmp, filter="data")
            _LOADED[key] = preprocessor_class.load(Path(tmp) / "preprocessor")
    return _LOADED[key]


def _preprocess(batch: dict[str, np.ndarray], preprocessor_class: type, packed: bytes,
                train: bool) -> dict[str, Any]:
    """A Ray Data batch of raw rows -> the preprocessor's per-row model inputs (``input.<name>``) and the
    batch's other columns."""
    preprocessor = load_packed(preprocessor_class, packed)
    out: dict[str, Any] = {name: values for name, values in batch.items() if name != "input"}
    for name, values in preprocessor.rows(list(batch["input"]), train=train).items():
        if isinstance(values, list):  # rows of different lengths: an object array of arrays (ragged tensors)
            column = np.empty(len(values), dtype=object)
            column[:] = values
            values = column
        out[PREFIX + name] = values
    return out


# Rows per preprocessing task: enough to amortise a task's start, few enough that decoded images stay small.
_BATCH_ROWS = {"text": 1024, "image": 32}


def preprocess_datasets(datasets: dict[str, "ray.data.Dataset"], splits: list[str], family: Any,
                        packed: bytes) -> dict[str, "ray.data.Dataset"]:
    """``datasets`` with the ``splits`` preprocessed lazily by Ray Data tasks (a quarter CPU each, as for reads:
    they run beside workers that hold the rest, see ``leave_cpus_for_data``)."""
    out = dict(datasets)
    for split in splits:
        out[split] = datasets[split].map_batches(
            _preprocess, batch_size=_BATCH_ROWS.get(family.modality, 32), batch_format="numpy", num_cpus=0.25,
            fn_kwargs={"preprocessor_class": family.preprocessor_class, "packed": packed, "train": split == "train"})
    return out


def prepared_batch(preprocessor: "Preprocessor", batch: dict[str, Any]) -> dict[str, Any]:
    """A preprocessed Ray Data batch as a task's step reads it: ``input`` the collated model inputs (padded to
    the batch's longest row), the other columns as they are."""
    rows = {name[len(PREFIX):]: values for name, values in batch.items() if name.startswith(PREFIX)}
    rest = {name: values for name, values in batch.items() if not name.startswith(PREFIX)}
    return {"input": PreparedInputs(preprocessor.collate(rows)), **rest}
