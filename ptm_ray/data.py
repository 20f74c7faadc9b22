"""Reading, checking and splitting labelled data for fine-tuning.

Two steps, in this order:

1. ``inspect_data(cfg.data)`` runs on the driver before any Ray work. It reads each file with pyarrow
   (the same readers Ray Data uses), checks it and returns the label set. Every problem is a
   ``ValueError`` naming the file, the column and, where there is one, the row.
2. ``ray_datasets(cfg.data, ...)`` reads the same files with Ray Data for the training workers, who
   take their shard with ``ray.train.get_dataset_shard`` and preprocess on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from ptm_ray.config import DataConfig

if TYPE_CHECKING:
    import ray.data

__all__ = ["DataSummary", "inspect_data", "ray_datasets", "read_table", "resolve_format", "resolve_path"]

_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class DataSummary:
    """What the driver learned about the data: the label set and row counts."""

    labels: list[str]
    num_train_rows: int
    num_val_rows: int


def resolve_format(path: str, fmt: str, key: str = "data.format") -> str:
    """The file format: ``fmt`` unless it is ``auto``, then from the extension of ``path``."""
    if fmt != "auto":
        return fmt
    suffix = Path(path.split("?")[0]).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(
            f"cannot tell the format of {path} from its extension; set {key} to csv, jsonl or parquet"
        )
    return _EXTENSIONS[suffix]


def resolve_path(path: str) -> str:
    """A URI as given; ``bundled:<file>`` as the bundled dataset; a local path made absolute.

    Absolute because Train workers ``chdir`` into their run folder.
    """
    if path.startswith("bundled:"):
        from ptm_ray.datasets import bundled_path

        return str(bundled_path(path.removeprefix("bundled:")))
    return path if "://" in path else str(Path(path).expanduser().resolve())


def read_table(path: str, fmt: str, key: str) -> pa.Table:
    """Read a whole CSV, JSONL or Parquet file (local path or URI) as an Arrow table.

    Raises:
        ValueError: naming ``key`` and ``path`` when the file is missing, unreadable or empty.
    """
    import pyarrow.csv
    import pyarrow.fs
    import pyarrow.json
    import pyarrow.parquet

    fmt = resolve_format(path, fmt)
    try:
        resolved = resolve_path(path)
        fs, inner = pyarrow.fs.FileSystem.from_uri(resolved) if "://" in resolved else (pyarrow.fs.LocalFileSystem(), resolved)
        info = fs.get_file_info(inner)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{key}: cannot open {path}: {e}") from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ValueError(f"{key}: file {path} does not exist")
    if info.type != pyarrow.fs.FileType.File:
        raise ValueError(f"{key}: {path} is not a file")
    if info.size == 0:
        raise ValueError(f"{key}: file {path} is empty")
    try:
        with fs.open_input_file(inner) as f:
            if fmt == "csv":
                table = pyarrow.csv.read_csv(f)
            elif fmt == "jsonl":
                table = pyarrow.json.read_json(f)
            else:
                table = pyarrow.parquet.read_table(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{key}: {path} is not readable as {fmt}: {e}") from None
    if table.num_rows == 0:
        raise ValueError(f"{key}: file {path} has a header but no rows")
    return table


def _check_columns(table: pa.Table, path: str, key: str, text_column: str, label_column: str) -> None:
    for column, column_key in ((text_column, "data.text_column"), (label_column, "data.label_column")):
        if column not in table.column_names:
            raise ValueError(
                f"{key}: {path} has no column {column!r} ({column_key}); its columns are {table.column_names}"
            )
    text = table[text_column]
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type) or pa.types.is_null(text.type)):
        first = next(i for i, v in enumerate(text.to_pylist()) if not isinstance(v, str))
        raise ValueError(
            f"{key}: {path} row {first + 1}, column {text_column!r}: text must be a string, "
            f"got {text[first].as_py()!r} (column type {text.type})"
        )
    for column in (text_column, label_column):
        values = table[column]
        missing = values.is_null()
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            missing = pc.or_kleene(missing, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0))
        if pc.any(missing).as_py():
            row = pc.index(missing, True).as_py()
            raise ValueError(f"{key}: {path} row {row + 1}, column {column!r}: value is missing or empty")


def _labels_of(table: pa.Table, column: str) -> list[str]:
    return [str(v) for v in table[column].to_pylist()]


def inspect_data(cfg: DataConfig) -> DataSummary:
    """Read and check the training (and validation) data on the driver; return the label set.

    The label set is the sorted set of training labels. A validation label outside it is an error,
    and so is training data with a single class.
    """
    train = read_table(cfg.train, cfg.format, "data.train")
    _check_columns(train, cfg.train, "data.train", cfg.text_column, cfg.label_column)
    labels = sorted(set(_labels_of(train, cfg.label_column)))
    if len(labels) < 2:
        raise ValueError(
            f"data.train: {cfg.train} column {cfg.label_column!r} has a single class {labels}; "
            "classification needs at least two"
        )
    if cfg.validation is None:
        num_val = max(1, round(train.num_rows * cfg.val_fraction))
        if train.num_rows - num_val < 1:
            raise ValueError(f"data.train: {cfg.train} has {train.num_rows} rows, too few to split off validation")
        return DataSummary(labels, train.num_rows - num_val, num_val)
    val = read_table(cfg.validation, cfg.format, "data.validation")
    _check_columns(val, cfg.validation, "data.validation", cfg.text_column, cfg.label_column)
    known = set(labels)
    for row, label in enumerate(_labels_of(val, cfg.label_column)):
        if label not in known:
            raise ValueError(
                f"data.validation: {cfg.validation} row {row + 1}, column {cfg.label_column!r}: label {label!r} "
                f"does not occur in the training data (labels: {labels})"
            )
    return DataSummary(labels, train.num_rows, val.num_rows)


def _ray_read(path: str, fmt: str) -> "ray.data.Dataset":
    import ray.data

    fmt = resolve_format(path, fmt)
    path = resolve_path(path)
    reader = {"csv": ray.data.read_csv, "jsonl": ray.data.read_json, "parquet": ray.data.read_parquet}[fmt]
    return reader(path)


def ray_datasets(cfg: DataConfig, seed: int) -> dict[str, "ray.data.Dataset"]:
    """Ray Data datasets ``train`` and ``validation`` (the latter split off ``train`` when not given).

    The split is seeded, so a resumed run validates on the same rows. Both are materialized.
    """
    import ray.data

    # Per-operator progress bars from every worker drown the per-epoch lines in a job's log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    columns = [cfg.text_column, cfg.label_column]
    train = _ray_read(cfg.train, cfg.format).select_columns(columns)
    if cfg.validation is not None:
        val = _ray_read(cfg.validation, cfg.format).select_columns(columns)
    else:
        train, val = train.train_test_split(test_size=cfg.val_fraction, shuffle=True, seed=seed)
    # Materialize before training: the Train workers hold the CPUs, and on a small node a lazy read
    # would wait forever for a CPU to run on. Blocks live in the object store (spilled to disk if large).
    return {"train": train.materialize(), "validation": val.materialize()}
