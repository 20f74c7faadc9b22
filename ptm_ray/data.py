"""Reading, checking and splitting labelled data for fine-tuning: text, images and audio.

Two steps, in this order:

1. ``inspect_data(cfg.data, modality)`` runs on the driver before any Ray work. It reads each file with
   pyarrow (the same readers Ray Data uses), or lists the image/audio files and decodes each once, and
   returns the label set. Every problem is a ``ValueError`` naming the file, the column and, where there
   is one, the row. Unreadable image/audio files fail the run, or with ``data.on_bad_file=skip`` are left
   out and counted.
2. ``ray_datasets(summary, cfg)`` reads the same data with Ray Data for the training workers, who
   take their shard with ``ray.train.get_dataset_shard`` and preprocess on the fly. Every dataset has two
   columns: ``input`` (text, or the encoded file bytes) and ``label`` (a string). Small data is read into
   the object store once (files up to ``DRIVER_READ_BYTES`` by the driver itself, larger ones by Ray Data
   tasks); large data streams from storage every epoch (``data.materialize``,
   ``materialize_decision``), so neither the driver nor the object store holds the whole dataset: streamed
   image/audio files are listed in a Parquet manifest under ``<storage.path>/manifests`` that Ray Data reads
   like any table, a window of rows at a time.

Without a validation file, text rows are held out by a hash of their input text (``validation_mask``), the
same function on the driver (counts) and in Ray Data tasks (rows): no global shuffle, no materialization.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ptm_ray.config import Config, DataConfig, storage_path

if TYPE_CHECKING:
    import ray.data

__all__ = ["AUTO_MATERIALIZE_BYTES", "MEDIA_BLOCK_BYTES", "MEDIA_EXTENSIONS", "TABLE_BLOCK_BYTES", "check_columns",
           "check_media_files", "DataSummary", "finish_datasets", "hash_split_counts", "inspect_data",
           "inspect_table", "iter_table", "list_media_files", "materialize_decision", "media_dataset",
           "media_datasets", "media_decoder", "quiet_ray_data", "ray_datasets", "read_bytes", "read_table",
           "resolve_format", "resolve_path", "split_counts", "table_datasets", "validation_mask"]

_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
MEDIA_EXTENSIONS = {
    "image": (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"),
    "audio": (".wav", ".flac", ".ogg"),
}


@dataclass(frozen=True)
class DataSummary:
    """What the driver learned about the data: labels, row counts and, for media, the checked files."""

    labels: list[str]
    num_train_rows: int
    num_val_rows: int
    train_files: list[tuple[str, str]] | None = None  # (path, label) of readable files, media only
    val_files: list[tuple[str, str]] | None = None
    skipped: dict[str, list[str]] = field(default_factory=dict)  # key -> unreadable files left out


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


def _filesystem(path: str):
    import pyarrow.fs

    resolved = resolve_path(path)
    if "://" in resolved:
        return pyarrow.fs.FileSystem.from_uri(resolved)
    return pyarrow.fs.LocalFileSystem(), resolved


def read_bytes(path: str) -> bytes:
    """The whole content of a local file or URI."""
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_table(path: str, fmt: str, key: str) -> pa.Table:
    """Read a whole CSV, JSONL or Parquet file (local path or URI) as an Arrow table.

    Raises:
        ValueError: naming ``key`` and ``path`` when the file is missing, unreadable or empty.
    """
    tables = [table for _, table in iter_table(path, fmt, key)]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


_PARQUET_BATCH_ROWS = 16_384  # a block of a Parquet file's rows (CSV and JSON blocks are about a MB: pyarrow's own)


def iter_table(path: str, fmt: str, key: str) -> Iterator[tuple[int, pa.Table]]:
    """A CSV, JSONL or Parquet file (local path or URI) read one block of rows at a time (about a MB, as Ray
    Data's readers read it), each with the number of rows before it: checks that see every row and hold one
    block.

    Raises:
        ValueError: naming ``key`` and ``path`` when the file is missing, unreadable or empty.
    """
    import pyarrow.csv
    import pyarrow.fs
    import pyarrow.json
    import pyarrow.parquet

    fmt = resolve_format(path, fmt)
    try:
        fs, inner = _filesystem(path)
        info = fs.get_file_info(inner)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{key}: cannot open {path}: {e}") from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ValueError(f"{key}: file {path} does not exist")
    if info.type != pyarrow.fs.FileType.File:
        raise ValueError(f"{key}: {path} is not a file")
    if info.size == 0:
        raise ValueError(f"{key}: file {path} is empty")
    rows = 0
    try:
        with fs.open_input_file(inner) as f:
            if fmt == "csv":
                batches = pyarrow.csv.open_csv(f)
            elif fmt == "jsonl":
                batches = pyarrow.json.open_json(f)
            else:
                batches = pyarrow.parquet.ParquetFile(f).iter_batches(batch_size=_PARQUET_BATCH_ROWS)
            for batch in batches:
                if batch.num_rows:
                    yield rows, pa.Table.from_batches([batch])
                    rows += batch.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{key}: {path} is not readable as {fmt}: {e}") from None
    if rows == 0:
        raise ValueError(f"{key}: file {path} has a header but no rows")


def check_columns(table: pa.Table, path: str, key: str, columns: dict[str, str], text_column: str | None,
                  may_be_empty: tuple[str, ...] = (), first_row: int = 0) -> None:
    """Columns (name -> config key) exist, hold no null or empty value (but those in ``may_be_empty``),
    and ``text_column`` holds strings. ``table`` may be a block of the file whose first row is ``first_row``.

    Raises:
        ValueError: naming ``key``, ``path``, the row and the column.
    """
    for column, column_key in columns.items():
        if column not in table.column_names:
            raise ValueError(f"{key}: {path} has no column {column!r} ({column_key}); its columns are {table.column_names}")
    if text_column is not None:
        text = table[text_column]
        if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type) or pa.types.is_null(text.type)):
            first = next(i for i, v in enumerate(text.to_pylist()) if not isinstance(v, str))
            raise ValueError(
                f"{key}: {path} row {first_row + first + 1}, column {text_column!r}: text must be a string, "
                f"got {text[first].as_py()!r} (column type {text.type})"
            )
    for column in (c for c in columns if c not in may_be_empty):
        values = table[column]
        missing = values.is_null()
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            missing = pc.or_kleene(missing, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0))
        if pc.any(missing).as_py():
            row = pc.index(missing, True).as_py()
            raise ValueError(f"{key}: {path} row {first_row + row + 1}, column {column!r}: value is missing or empty")


def _labels_of(table: pa.Table, column: str) -> list[str]:
    return [str(v) for v in table[column].to_pylist()]


def _check_labels(train_labels: Sequence[str], val_labels: Sequence[str] | None, cfg: DataConfig) -> list[str]:
    labels = _label_set(train_labels, cfg)
    _check_known(val_labels or [], set(labels), cfg)
    return labels


def _label_set(train_labels: Iterable[str], cfg: DataConfig) -> list[str]:
    """The sorted set of training labels; at least two."""
    labels = sorted(set(train_labels))
    if len(labels) < 2:
        raise ValueError(f"data.train: {cfg.train} has a single class {labels}; classification needs at least two")
    return labels


def _check_known(val_labels: Sequence[str], known: set[str], cfg: DataConfig, first_row: int = 0) -> None:
    """Every validation label (rows from ``first_row``) occurs in the training data."""
    for row, label in enumerate(val_labels):
        if label not in known:
            raise ValueError(
                f"data.validation: {cfg.validation} row {first_row + row + 1}, column {cfg.label_column!r}: label "
                f"{label!r} does not occur in the training data (labels: {sorted(known)})"
            )


def validation_mask(texts: Sequence, fraction: float) -> np.ndarray:
    """Which rows to hold out for validation when no validation file is given: those whose input text hashes
    (BLAKE2b) into the lowest ``fraction`` of the range.

    Fixed by the data alone: the same text always lands on the same side (a duplicate cannot leak from
    training into validation), a row keeps its side when rows are added or reordered, and Ray Data tasks
    compute it batch by batch with no global shuffle. The validation share is ``fraction`` on average.
    """
    bound = int(fraction * 2**64)
    digest = lambda text: int.from_bytes(hashlib.blake2b(str(text).encode(), digest_size=8).digest(), "little")  # noqa: E731
    return np.fromiter((digest(t) < bound for t in texts), dtype=bool, count=len(texts))


def hash_split_counts(texts: Sequence, cfg: DataConfig) -> tuple[int, int]:
    """(training rows, validation rows) of ``data.train`` split by ``validation_mask``.

    Raises:
        ValueError: when either side would be empty.
    """
    return _hash_split(len(texts), int(validation_mask(texts, cfg.val_fraction).sum()), cfg)


def _hash_split(num_rows: int, num_val: int, cfg: DataConfig) -> tuple[int, int]:
    if num_val in (0, num_rows):
        side = "validation" if num_val == 0 else "training"
        raise ValueError(f"data.train: {cfg.train} has {num_rows} rows; holding out data.val_fraction="
                         f"{cfg.val_fraction} of them by text hash leaves no {side} rows: give data.validation "
                         "or change data.val_fraction")
    return num_rows - num_val, num_val


def split_counts(num_rows: int, cfg: DataConfig) -> tuple[int, int]:
    """(training rows, validation rows) of a seeded split of media files (a list known on the driver)."""
    num_val = max(1, round(num_rows * cfg.val_fraction))
    if num_rows - num_val < 1:
        raise ValueError(f"data.train: {cfg.train} has {num_rows} rows, too few to split off validation")
    return num_rows - num_val, num_val


def _inspect_text(cfg: DataConfig) -> DataSummary:
    """One streamed pass over each file (``iter_table``): the driver holds a block of rows and the label set."""
    columns = {cfg.text_column: "data.text_column", cfg.label_column: "data.label_column"}
    seen: set[str] = set()
    num_rows, held_out = _stream_checks(cfg.train, "data.train", columns, (cfg.text_column,), cfg,
                                        lambda table, _: seen.update(_labels_of(table, cfg.label_column)))
    labels = _label_set(seen, cfg)
    if cfg.validation is None:
        return DataSummary(labels, *_hash_split(num_rows, held_out, cfg))
    known = set(labels)
    num_val, _ = _stream_checks(cfg.validation, "data.validation", columns, (cfg.text_column,), cfg,
                                lambda table, first: _check_known(_labels_of(table, cfg.label_column), known, cfg, first))
    return DataSummary(labels, num_rows, num_val)


def inspect_table(cfg: DataConfig, columns: dict[str, str], text_columns: tuple[str, ...]) -> DataSummary:
    """Check the ``columns`` (name -> config key) of the training and validation files: they exist, no value
    is missing, and ``text_columns`` hold strings (the first is the input). For tasks whose target is text;
    the summary has no labels. One streamed pass over each file."""
    num_rows, held_out = _stream_checks(cfg.train, "data.train", columns, text_columns, cfg)
    if cfg.validation is None:
        return DataSummary([], *_hash_split(num_rows, held_out, cfg))
    num_val, _ = _stream_checks(cfg.validation, "data.validation", columns, text_columns, cfg)
    return DataSummary([], num_rows, num_val)


def _stream_checks(path: str, key: str, columns: dict[str, str], text_columns: tuple[str, ...], cfg: DataConfig,
                   each: Callable[[pa.Table, int], None] | None = None) -> tuple[int, int]:
    """``check_columns`` on every block of ``path``, then ``each(block, first_row)``; (rows, rows that
    ``validation_mask`` holds out: counted for ``data.train`` without ``data.validation``, else 0)."""
    held_out = key == "data.train" and cfg.validation is None
    num_rows = num_val = 0
    for first, table in iter_table(path, cfg.format, key):
        for text_column in text_columns:
            check_columns(table, path, key, columns, text_column, first_row=first)
        if each is not None:
            each(table, first)
        num_rows += table.num_rows
        if held_out:
            num_val += int(validation_mask(table[text_columns[0]].to_pylist(), cfg.val_fraction).sum())
    return num_rows, num_val


def table_datasets(cfg: DataConfig, rename: dict[str, str], summary: DataSummary) -> dict[str, "ray.data.Dataset"]:
    """Ray Data ``train`` and ``validation`` of the file columns in ``rename``, renamed (one of them to ``input``);
    validation held out of ``train`` by ``validation_mask`` when not given. Materialized or streamed as
    ``finish_datasets`` decides; files read once and no larger than ``DRIVER_READ_BYTES`` are read here."""
    quiet_ray_data()

    def read(path: str, side: str) -> "ray.data.Dataset":
        # one task per block selects, renames and holds out: Ray Data's own select/rename would be operators
        # of their own asking a whole CPU, which Train workers may hold (see leave_cpus_for_data)
        dataset = _ray_read(path, cfg.format).map_batches(_columns, batch_format="numpy", **_READ_ARGS, fn_kwargs={
            "rename": rename, "fraction": cfg.val_fraction if cfg.validation is None else None, "side": side})
        dataset.context.target_max_block_size = TABLE_BLOCK_BYTES
        return dataset

    sides = ({"train": (cfg.train, "all"), "validation": (cfg.validation, "all")} if cfg.validation is not None
             else {"train": (cfg.train, "train"), "validation": (cfg.train, "validation")})
    size = _source_bytes(summary, cfg)  # one look at the files (a request each on object storage)
    decision = materialize_decision(summary, cfg, size)
    if decision[0] and size <= DRIVER_READ_BYTES:
        return {name: _read_on_driver(path, side, rename, cfg) for name, (path, side) in sides.items()}
    return finish_datasets({name: read(path, side) for name, (path, side) in sides.items()}, summary, cfg, decision)


# Table and local media files up to this size that a run reads once are read by the driver straight into the
# object store: Ray Data's read tasks start worker processes first (about 2 s on a fresh cluster) to read what
# the driver reads in milliseconds (the bundled intents: 2.05 s -> 0.02 s).
DRIVER_READ_BYTES = 32 * 2**20


def _read_on_driver(path: str, side: str, rename: dict[str, str], cfg: DataConfig) -> "ray.data.Dataset":
    """The rows ``table_datasets``' Ray Data tasks would read (the same columns and types, the same side of
    ``validation_mask``), read here and put into the object store in blocks of about ``TABLE_BLOCK_BYTES``."""
    import ray.data

    key = "data.train" if path == cfg.train else "data.validation"
    table = pa.concat_tables(block.select(list(rename)).rename_columns(list(rename.values()))
                             for _, block in iter_table(path, cfg.format, key))
    if side != "all":
        held_out = validation_mask(table["input"].to_pylist(), cfg.val_fraction)
        table = table.filter(pa.array(held_out if side == "validation" else ~held_out))
    rows = max(1, table.num_rows * TABLE_BLOCK_BYTES // max(table.nbytes, 1))
    # from_blocks: metadata computed here (from_arrow asks a task for it, which waits for a CPU the workers may hold)
    return ray.data.from_blocks([table.slice(start, rows) for start in range(0, table.num_rows, rows)])


def _columns(batch: dict[str, np.ndarray], rename: dict[str, str], fraction: float | None,
             side: str) -> dict[str, np.ndarray]:
    """The ``rename`` columns of a batch, renamed; with a ``fraction``, only the rows of ``side``."""
    columns = {new: batch[old] for old, new in rename.items()}
    if side == "all":
        return columns
    mask = validation_mask(columns["input"], fraction)
    return {name: values[mask if side == "validation" else ~mask] for name, values in columns.items()}


# Up to this size the files are read into the object store once (no re-reading every epoch); above it they
# stream, so that memory stays flat however large the dataset.
AUTO_MATERIALIZE_BYTES = 256 * 2**20


def materialize_decision(summary: DataSummary, cfg: DataConfig, size: int | None = None) -> tuple[bool, str]:
    """Whether a run reads its data into the object store once (True) or streams it every epoch; and why.
    ``size``: the files' bytes where the caller has them (else looked up)."""
    if cfg.materialize != "auto":
        return cfg.materialize == "always", f"data.materialize={cfg.materialize}"
    size = _source_bytes(summary, cfg) if size is None else size
    limit = f"{AUTO_MATERIALIZE_BYTES / 2**20:.0f} MB"
    if size <= AUTO_MATERIALIZE_BYTES:
        return True, f"data.materialize=auto: {size / 2**20:.1f} MB of files, up to {limit} are read once"
    return False, f"data.materialize=auto: {size / 2**20:.1f} MB of files, over {limit}"


def _source_bytes(summary: DataSummary, cfg: DataConfig) -> int:
    """The size of the data's files: the media files when there are, else the table files."""
    if summary.train_files is not None:
        paths = [file for file, _ in summary.train_files + (summary.val_files or [])]
    else:
        paths = [resolve_path(p) for p in (cfg.train, cfg.validation) if p]
    total = 0
    for path in paths:
        fs, inner = _filesystem(path)
        total += max(fs.get_file_info(inner).size or 0, 0)
    return total


def finish_datasets(datasets: dict[str, "ray.data.Dataset"], summary: DataSummary, cfg: DataConfig,
                    decision: tuple[bool, str] | None = None) -> dict[str, "ray.data.Dataset"]:
    """``datasets`` read into the object store now, or left lazy to stream (said on the console), as
    ``materialize_decision`` says (or has said: ``decision``)."""
    materialize, why = decision or materialize_decision(summary, cfg)
    if materialize:
        return {name: ds.materialize() for name, ds in datasets.items()}
    print(f"[ptm_ray] data streamed from storage every epoch ({why})")
    return datasets


def quiet_ray_data() -> None:
    """Ray Data settings for fine-tuning jobs: no per-operator progress bars, rows kept in order."""
    import ray.data

    # Per-operator progress bars from every worker drown the per-epoch lines in a job's log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Rows keep their order through the parallel file reads, so a seed fixes the batches a run sees.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    # Small blocks: a streamed file is read a block at a time (a CSV file is one read task, whose output would
    # otherwise be one block of up to 128 MiB), so what sits in the object store is flat in the file's size.
    ray.data.DataContext.get_current().target_max_block_size = MEDIA_BLOCK_BYTES
    # Ray 2.60's newer Parquet reader lists files in a task of its own that asks a whole CPU: where the
    # training workers hold all but a fraction of the CPUs (``leave_cpus_for_data``), that task never starts
    # and the run waits forever for its first batch (a streamed manifest hung so). The older reader's read
    # tasks take the quarter CPU ``_READ_ARGS`` gives them.
    ray.data.DataContext.get_current().use_datasource_v2 = False


# Blocks of image/audio files (64 files a block, split where larger) and of table rows (about 2,000 rows
# of short text): ``ptm_ray.train`` lets streamed data run a few blocks ahead of the workers, so the
# block size sets what the object store holds, whatever the dataset's size.
MEDIA_BLOCK_BYTES = 2**20
TABLE_BLOCK_BYTES = 2**17


def list_media_files(path: str, cfg: DataConfig, key: str, modality: str,
                     label: Callable[[object, int], object] | None = None) -> list[tuple[str, object]]:
    """(file, label) pairs from a folder ``root/<label>/<file>`` or a manifest of path and label columns.

    ``label(value, row)`` turns a manifest's label cell into the label (default: its string).
    """
    root = Path(resolve_path(path))
    if "://" not in path and root.is_dir():
        extensions = MEDIA_EXTENSIONS[modality]
        files = sorted(p for p in root.glob("*/*") if p.suffix.lower() in extensions)
        if not files:
            raise ValueError(f"{key}: folder {path} holds no {modality} files as <label>/<file> ({', '.join(extensions)})")
        return [(str(p), p.parent.name) for p in files]
    table = read_table(path, cfg.format, key)
    columns = {cfg.path_column: "data.path_column", cfg.label_column: "data.label_column"}
    check_columns(table, path, key, columns, None, may_be_empty=(cfg.label_column,) if label else ())
    base = str(root.parent) if "://" not in path else path.rsplit("/", 1)[0]
    values = table[cfg.label_column].to_pylist()
    labels = [label(v, row) for row, v in enumerate(values)] if label else [str(v) for v in values]
    rows = []
    for file, value in zip(table[cfg.path_column].to_pylist(), labels):
        absolute = "://" in str(file) or str(file).startswith("/")
        rows.append((str(file) if absolute else f"{base}/{file}", value))
    declared = table["sample_rate"].to_pylist() if modality == "audio" and "sample_rate" in table.column_names else None
    if declared is not None:
        _check_declared_rates(rows, declared, path, key)
    return rows


def _check_declared_rates(rows: list[tuple[str, str]], declared: list, manifest: str, key: str) -> None:
    import io

    import soundfile

    for row, ((file, _), rate) in enumerate(zip(rows, declared)):
        try:
            actual = soundfile.info(io.BytesIO(read_bytes(file))).samplerate
        except (soundfile.LibsndfileError, RuntimeError, OSError):
            continue  # undecodable files are reported by the decode check
        if rate is not None and int(rate) != actual:
            raise ValueError(f"{key}: {manifest} row {row + 1}: {file} declares sample_rate {rate} "
                             f"but the file is {actual} Hz")


def media_decoder(modality: str) -> Callable[[bytes], object]:
    """Decodes one encoded image or audio file (raises ValueError or OSError when it cannot)."""
    if modality == "image":
        from ptm_ray.models.vision import decode_image

        return decode_image
    from ptm_ray.models.audio import decode_audio

    return lambda data: decode_audio(data, 16000)


def _decode_error(file: str, decode: Callable[[bytes], object]) -> str:
    """Why ``file`` cannot be decoded, or "" when it can (without the repr of the in-memory buffer Pillow names)."""
    try:
        decode(read_bytes(file))
    except (ValueError, OSError) as e:
        return re.sub(r" ?<[\w.]+ object at 0x[0-9a-f]+>", "", str(e))
    return ""


def _decode_errors(batch: dict[str, np.ndarray], modality: str) -> dict[str, np.ndarray]:
    decode = media_decoder(modality)
    return {"path": batch["path"], "error": np.array([_decode_error(f, decode) for f in batch["path"]], dtype=object)}


# The decode check runs on the driver for this long; files left after it are decoded in Ray Data tasks, in
# parallel across the cluster's CPUs. Starting those tasks costs seconds on its own (a process per task that
# imports the decoders), more than a few thousand small files take here (1,797 32-px PNGs: 0.18 s on the
# driver, 14-20 s through Ray Data on 2 cores), so only lists that are slow to check pay it.
CHECK_ON_DRIVER_S = 5.0


def _decode_errors_in_ray_data(files: list[str], modality: str) -> dict[str, str]:
    import ray.data

    from ptm_ray.runtime import init_ray

    init_ray()
    quiet_ray_data()
    checked = ray.data.from_items([{"path": file} for file in files]).map_batches(
        _decode_errors, batch_size=64, batch_format="numpy", fn_kwargs={"modality": modality}, **_READ_ARGS)
    return {row["path"]: row["error"] for row in checked.iter_rows() if row["error"]}


def check_media_files(rows: list[tuple[str, str]], cfg: DataConfig, key: str, modality: str,
                      parallel: bool | None = None) -> tuple[list, list[str]]:
    """Decode every file once; fail on the first bad one (in row order), or (``on_bad_file=skip``) leave them out.

    ``parallel=None`` (the default) decodes on the driver for ``CHECK_ON_DRIVER_S`` seconds and the files left
    after that in Ray Data tasks of a quarter CPU each (on a local Ray started here if none is running);
    ``True`` decodes every file in Ray Data tasks, ``False`` every file on the driver."""
    errors, start = {}, 0
    if not parallel:
        decode, deadline = media_decoder(modality), time.perf_counter() + CHECK_ON_DRIVER_S
        for start, (file, _) in enumerate(rows, 1):
            error = _decode_error(file, decode)
            if error:
                errors[file] = error
                if cfg.on_bad_file == "fail":
                    break  # the first bad file in row order: nothing after it can change the error
            if parallel is None and time.perf_counter() > deadline:
                break
    if start < len(rows) and not (errors and cfg.on_bad_file == "fail"):
        errors.update(_decode_errors_in_ray_data([file for file, _ in rows[start:]], modality))
    good, bad = [], []
    for file, label in rows:
        if file not in errors:
            good.append((file, label))
            continue
        if cfg.on_bad_file == "fail":
            raise ValueError(f"{key}: {file}: {errors[file]} (set data.on_bad_file=skip to leave such files out)")
        bad.append(file)
    if bad:
        print(f"[ptm_ray] {key}: skipped {len(bad)} unreadable {modality} file(s) of {len(rows)}, e.g. {bad[:3]}")
    return good, bad


def _inspect_media(cfg: DataConfig, modality: str) -> DataSummary:
    train, skipped_train = check_media_files(list_media_files(cfg.train, cfg, "data.train", modality), cfg,
                                             "data.train", modality)
    skipped = {"data.train": skipped_train} if skipped_train else {}
    if cfg.validation is None:
        _check_labels([label for _, label in train], None, cfg)
        order = np.random.default_rng(0).permutation(len(train))  # the split is part of the data, fixed
        num_train, _ = split_counts(len(train), cfg)
        val = [train[i] for i in order[num_train:]]
        train = [train[i] for i in order[:num_train]]
    else:
        val, skipped_val = check_media_files(list_media_files(cfg.validation, cfg, "data.validation", modality),
                                             cfg, "data.validation", modality)
        if skipped_val:
            skipped["data.validation"] = skipped_val
    labels = _check_labels([label for _, label in train], [label for _, label in val], cfg)
    return DataSummary(labels, len(train), len(val), train, val, skipped)


def inspect_data(cfg: DataConfig, modality: str = "text") -> DataSummary:
    """Read and check the training (and validation) data on the driver; return the label set.

    The label set is the sorted set of training labels. A validation label outside it is an error,
    and so is training data with a single class.
    """
    return _inspect_text(cfg) if modality == "text" else _inspect_media(cfg, modality)


def _ray_read(path: str, fmt: str) -> "ray.data.Dataset":
    import ray.data

    fmt = resolve_format(path, fmt)
    reader = {"csv": ray.data.read_csv, "jsonl": ray.data.read_json, "parquet": ray.data.read_parquet}[fmt]
    return reader(resolve_path(path), **_READ_ARGS)


# Reading fine-tuning data is light work: a fraction of a CPU per task lets it run beside Train workers
# and Tune trial drivers that hold the whole CPUs of a small node (with 1 CPU a task, a second concurrent
# trial's read waited for CPUs that never came free).
_READ_ARGS = {"num_cpus": 0.25}


def _load_files(batch: dict[str, np.ndarray], column: str) -> dict[str, np.ndarray]:
    return {"input": np.array([read_bytes(p) for p in batch["path"]], dtype=object), column: batch[column]}


def _load_row_groups(batch: dict[str, np.ndarray], manifest: str, column: str) -> dict[str, np.ndarray]:
    """``_load_files`` of the manifest's row groups ``batch["group"]`` (``LOAD_BATCH`` files each)."""
    import pyarrow.parquet

    fs, inner = _filesystem(manifest)
    with fs.open_input_file(inner) as f:
        listed = pyarrow.parquet.ParquetFile(f).read_row_groups([int(g) for g in batch["group"]])
    return _load_files({name: listed.column(name).to_numpy(zero_copy_only=False) for name in ("path", column)},
                       column)


def media_dataset(rows: list[tuple[str, object]], column: str = "label", manifests: str | None = None,
                  concurrency: int | None = None) -> "ray.data.Dataset":
    """(file, value) rows as a Ray dataset of ``input`` (the file's bytes, read by Ray Data tasks) and
    ``column`` (the value: a label, a transcript, a JSON target). Lazy: ``finish_datasets`` decides.

    The rows go into the object store whole (``ray.data.from_items``), or, given ``manifests`` (a folder or
    URI every node reaches), into a Parquet manifest there that Ray Data reads a window of rows at a time.
    ``concurrency``: at most this many reading tasks at once (default: as many as their quarter CPUs allow).
    """
    import ray.data

    if manifests is None or not rows:
        files = ray.data.from_items([{"path": file, column: value} for file, value in rows])
        return files.map_batches(_load_files, batch_size=LOAD_BATCH, fn_kwargs={"column": column}, **_READ_ARGS,
                                 concurrency=concurrency)
    # One block per row group of the manifest, holding only its index; the task given it reads that row
    # group's LOAD_BATCH files. The first files are read at once whatever the list's length: a Parquet read of
    # the manifest (one task for the file, cutting it into blocks) passed its first block on only when it had
    # cut them all, 3.4 s into the epoch at 32,000 files.
    manifest = write_manifest(rows, column, manifests)
    groups = -(-len(rows) // LOAD_BATCH)
    return ray.data.from_items([{"group": g} for g in range(groups)], override_num_blocks=groups).map_batches(
        _load_row_groups, batch_size=1, fn_kwargs={"manifest": manifest, "column": column}, **_READ_ARGS,
        concurrency=concurrency)


def media_datasets(summary: DataSummary, cfg: Config, column: str = "label") -> dict[str, "ray.data.Dataset"]:
    """``train`` and ``validation`` of the checked (file, value) rows of ``summary`` (``media_dataset``),
    materialized or streamed as ``materialize_decision`` says; streamed rows come from manifests under
    ``<storage.path>/manifests``, so the object store holds a window of the file list, not the list. Small
    local data read once is read by the driver (``_media_on_driver``)."""
    import ray

    quiet_ray_data()
    size = _source_bytes(summary, cfg.data)  # one look at the files (a request each on object storage)
    decision = materialize_decision(summary, cfg.data, size)
    rows = {"train": summary.train_files, "validation": summary.val_files or []}
    listed = list(itertools.chain(*rows.values()))
    if (decision[0] and size <= DRIVER_READ_BYTES and not any("://" in file for file, _ in listed)
            and all(isinstance(value, str) for _, value in listed)):
        return {name: _media_on_driver(files, column) for name, files in rows.items()}
    manifests = None if decision[0] else f"{storage_path(cfg)}/manifests"
    # Read once (materialized), files need no more than a task per CPU: the four a CPU that streaming runs
    # beside the workers each start a process (importing Ray and ptm_ray), which took longer than reading
    # small files (1,797 digits: 4.5-6.0 s at 8 tasks, 3.2-4.3 s at 1-2 on 2 CPUs).
    concurrency = max(1, int(ray.cluster_resources().get("CPU", 1))) if decision[0] and ray.is_initialized() else None
    datasets = {name: media_dataset(files, column, manifests, concurrency) for name, files in rows.items()}
    return finish_datasets(datasets, summary, cfg.data, decision)


def _media_on_driver(rows: list[tuple[str, object]], column: str) -> "ray.data.Dataset":
    """The rows ``media_dataset``'s Ray Data tasks would read (each file's bytes as ``input``, its value as
    ``column``, in order), read by the driver: local files of a run that reads them once and holds no more
    than ``DRIVER_READ_BYTES``, which the decode check has just read here too. Blocks of up to ``LOAD_BATCH``
    files, as the tasks make them. Files on object storage stay with the tasks (a request per file, in parallel
    there), and so do values that are not strings (multi-label sets: the tasks' blocks hold them as pickled
    objects, a list column here)."""
    import ray.data

    items = [{"input": read_bytes(file), column: value} for file, value in rows]
    size = sum(len(item["input"]) for item in items)
    return ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // LOAD_BATCH),
                                                              -(-size // MEDIA_BLOCK_BYTES)))


# Files read by one Ray Data task; a manifest's row groups hold as many, so that each task reads one row
# group's files into a block or two (with row groups of 1024 files, each task's 1024 files made several
# MiB at once, and more tasks ran at once the more row groups the list had: the object store's peak grew
# with the number of files).
LOAD_BATCH = 64


def write_manifest(rows: list[tuple[str, object]], column: str, folder: str) -> str:
    """A Parquet file of ``rows`` (columns ``path`` and ``column``) in ``folder``, named by a hash of its
    content: the same list is written once and shared by every run and trial that streams it. Written under
    a temporary name and moved into place, so a reader never sees part of it."""
    import pyarrow.parquet

    digest = hashlib.sha256(json.dumps([column, rows], default=str).encode()).hexdigest()[:32]
    path = f"{folder.rstrip('/')}/{column}-{digest}.parquet"
    fs, inner = _filesystem(path)
    if fs.get_file_info(inner).size:
        return path
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    partial = f"{inner}.{uuid.uuid4().hex[:8]}.partial"
    table = pa.table({"path": [file for file, _ in rows], column: [value for _, value in rows]})
    pyarrow.parquet.write_table(table, partial, filesystem=fs, row_group_size=LOAD_BATCH)
    fs.move(partial, inner)
    return path


def ray_datasets(summary: DataSummary, cfg: Config) -> dict[str, "ray.data.Dataset"]:
    """Ray Data datasets ``train`` and ``validation`` with columns ``input`` and ``label``.

    Text is read with Ray Data's CSV/JSON/Parquet readers (validation held out of ``train`` by
    ``validation_mask`` when not given); image and audio files are read by Ray Data tasks from the checked
    file list. Small data is materialized (blocks in the object store, spilled to disk if large), large data
    streams (``finish_datasets``); ``ptm_ray.train`` leaves streamed reads a share of the CPUs.
    """
    data = cfg.data
    if summary.train_files is None:
        return table_datasets(data, {data.text_column: "input", data.label_column: "label"}, summary)
    return media_datasets(summary, cfg)
