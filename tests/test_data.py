"""Bad data fails on the driver, before training, naming the file, row and column."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from ptm_ray.config import DataConfig
from ptm_ray.data import inspect_data, validation_mask

from conftest import TRAIN_CSV, VAL_CSV


def _csv(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_bundled_data_labels_and_counts():
    summary = inspect_data(DataConfig(train=TRAIN_CSV, validation=VAL_CSV))
    assert len(summary.labels) == 8 and summary.labels == sorted(summary.labels)
    assert (summary.num_train_rows, summary.num_val_rows) == (320, 96)
    split = inspect_data(DataConfig(train=TRAIN_CSV, val_fraction=0.25))
    assert (split.num_train_rows, split.num_val_rows) == (246, 74)  # held out by text hash: 23 % for 25 %


def test_held_out_rows_are_fixed_by_their_text():
    texts = [f"order {i} has not arrived" for i in range(2000)]
    mask = validation_mask(texts, 0.2)
    assert 0.17 < mask.mean() < 0.23  # the share asked for, on average
    assert (validation_mask(texts, 0.2) == mask).all()  # no seed, no state: the same answer every time
    # rows keep their side when others are added or the file is reordered; a duplicate goes with its original
    grown = texts[::-1] + [f"new row {i}" for i in range(500)] + texts[:10]
    sides = dict(zip(grown, validation_mask(grown, 0.2)))
    assert [sides[t] for t in texts] == mask.tolist()
    assert validation_mask(texts, 0.4).sum() > mask.sum() and (validation_mask(texts, 0.4) | ~mask).all()


def test_a_split_that_leaves_a_side_empty_is_refused(tmp_path):
    path = _csv(tmp_path, "d.csv", "text,label\n" + "words 0,a\n" * 5 + "words 1,b\n" * 5)
    # two distinct texts: at 0.2 both stay in training, at 0.99 both are held out
    for fraction, side in ((0.2, "validation"), (0.99, "training")):
        with pytest.raises(ValueError, match=rf"data.train: .*d.csv has 10 rows; holding out data.val_fraction="
                                             rf"{fraction} of them by text hash leaves no {side} rows"):
            inspect_data(DataConfig(train=path, val_fraction=fraction))


def test_jsonl_and_parquet_read_like_csv(tmp_path):
    rows = [{"text": f"refund please {i}", "label": "refund"} for i in range(5)] + \
           [{"text": f"where is parcel {i}", "label": "status"} for i in range(5)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        assert inspect_data(DataConfig(train=str(path))).labels == ["refund", "status"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("text,label\n", "has a header but no rows"),
        ("body,label\nhello,a\nbye,b\n", "has no column 'text' (data.text_column); its columns are ['body', 'label']"),
        ("text,intent\nhello,a\nbye,b\n", "has no column 'label' (data.label_column)"),
        ("text,label\nhello,a\n,b\n", "row 2, column 'text': value is missing or empty"),
        ("text,label\nhello,a\nbye,\n", "row 2, column 'label': value is missing or empty"),
        ('{"text": "hi", "label": "a"}\n{"text": null, "label": "b"}\n', "row 2, column 'text': value is missing"),
        ("text,label\nhello,a\nbye,a\n", "has a single class ['a']; classification needs at least two"),
        ("text,label\n1,a\n2,b\n", "row 1, column 'text': text must be a string, got 1"),
        ("text,label\nhello,a\n\"  \",b\n", "row 2, column 'text': value is missing or empty"),
    ],
)
def test_bad_training_file(tmp_path, content, message):
    path = _csv(tmp_path, "train.jsonl" if content.startswith("{") else "train.csv", content)
    with pytest.raises(ValueError) as e:
        inspect_data(DataConfig(train=path))
    assert str(e.value).startswith("data.train: ") and path in str(e.value)
    assert message in str(e.value)


def test_unknown_validation_label_is_named(tmp_path):
    train = _csv(tmp_path, "train.csv", "text,label\nhello,a\nbye,b\n")
    val = _csv(tmp_path, "val.csv", "text,label\nhi,a\nyo,c\n")
    with pytest.raises(ValueError, match=r"data.validation: .*val.csv row 2, column 'label': label 'c' does not occur"):
        inspect_data(DataConfig(train=train, validation=val))


def test_missing_file_unreadable_file_and_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"data.train: file .*missing.csv does not exist"):
        inspect_data(DataConfig(train=str(tmp_path / "missing.csv")))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"data.train: .*garbage.parquet is not readable as parquet"):
        inspect_data(DataConfig(train=str(garbage)))
    with pytest.raises(ValueError, match="cannot tell the format of .*data.txt from its extension; set data.format"):
        inspect_data(DataConfig(train=_csv(tmp_path, "data.txt", "text,label\n")))
    with pytest.raises(ValueError, match="no bundled dataset 'nope.csv'"):
        inspect_data(DataConfig(train="bundled:nope.csv"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_checks_stream_the_file_block_by_block_and_name_rows_past_the_first_block(tmp_path, fmt):
    """The driver checks a file one block of rows at a time (as Ray Data reads it), so it never holds the whole
    file; a problem past the first block is still named by its row in the file, and the counts are every row's."""
    from ptm_ray.data import iter_table

    rows = 60_000  # about 2.4 MB: several of the readers' blocks
    texts = [f"order {i} never arrived, please help" for i in range(rows)]
    labels = ["late" if i % 2 else "refund" for i in range(rows)]

    def write(name: str, texts: list, labels: list) -> str:
        table = pa.table({"text": texts, "label": labels})
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "csv":
            pyarrow.csv.write_csv(table, path)
        elif fmt == "jsonl":
            path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in zip(texts, labels)))
        else:
            pq.write_table(table, path, row_group_size=10_000)
        return str(path)

    good = write("train", texts, labels)
    blocks = list(iter_table(good, fmt, "data.train"))
    assert len(blocks) > 1 and [first for first, _ in blocks][:2] == [0, blocks[0][1].num_rows]
    assert sum(t.num_rows for _, t in blocks) == rows
    summary = inspect_data(DataConfig(train=good, val_fraction=0.1))
    assert summary.labels == ["late", "refund"] and summary.num_train_rows + summary.num_val_rows == rows
    assert summary.num_val_rows == int(validation_mask(texts, 0.1).sum())

    late = rows - 7
    with pytest.raises(ValueError, match=rf"data.train: .*train_empty.{fmt} row {late + 1}, column 'text': "
                                         "value is missing or empty"):
        inspect_data(DataConfig(train=write("train_empty", texts[:late] + [" "] + texts[late + 1:], labels),
                                val_fraction=0.1))
    with pytest.raises(ValueError, match=rf"data.validation: .*val.{fmt} row {late + 1}, column 'label': label "
                                         r"'lost' does not occur in the training data \(labels: \['late', 'refund'\]\)"):
        inspect_data(DataConfig(train=good, validation=write("val", texts, labels[:late] + ["lost"] + labels[late + 1:])))
