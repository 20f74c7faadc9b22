"""Data that streams from storage every epoch instead of being read into the object store once
(``data.materialize``): the same rows as the materialized path, no hang when the workers hold every CPU, and
every validation row evaluated exactly once across workers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from ray.data.dataset import MaterializedDataset

from ptm_ray import data
from ptm_ray.config import load_config
from ptm_ray.data import materialize_decision
from ptm_ray.tasks import task_for
from ptm_ray.train import fit

from conftest import TRAIN_CSV, VAL_CSV, tiny_overrides


def _texts(path: str) -> list[str]:
    with open(path, newline="") as f:
        return [row["text"] for row in csv.DictReader(f)]


@pytest.mark.parametrize("mode", ["never", "always"])
def test_streamed_and_materialized_data_hold_out_the_same_rows(ray_cluster, tmp_path, mode):
    cfg = load_config(None, [f"data.train={TRAIN_CSV}", "data.validation=null", "data.val_fraction=0.25",
                             f"data.materialize={mode}", "model.name=hf:unused"])
    task = task_for(cfg.model.task)
    summary = task.inspect(cfg, "text")
    datasets = task.datasets(summary, cfg)
    assert isinstance(datasets["train"], MaterializedDataset) == (mode == "always")
    train = [row["input"] for row in datasets["train"].iter_rows()]
    val = [row["input"] for row in datasets["validation"].iter_rows()]
    # the driver's counts are what the workers read; no row is lost, duplicated or on both sides
    assert (len(train), len(val)) == (summary.num_train_rows, summary.num_val_rows) == (246, 74)
    assert sorted(train + val) == sorted(_texts(TRAIN_CSV)) and not set(train) & set(val)


def test_a_small_table_read_on_the_driver_holds_the_rows_ray_data_tasks_read(ray_cluster, monkeypatch):
    cfg = load_config(None, [f"data.train={TRAIN_CSV}", "data.validation=null", "data.val_fraction=0.25",
                             "model.name=hf:unused"])
    task = task_for(cfg.model.task)
    summary = task.inspect(cfg, "text")
    on_driver = task.datasets(summary, cfg)
    monkeypatch.setattr(data, "DRIVER_READ_BYTES", -1)  # every size: read tasks
    by_tasks = task.datasets(summary, cfg)
    for side in ("train", "validation"):
        assert on_driver[side].schema() == by_tasks[side].schema()
        assert on_driver[side].take_all() == by_tasks[side].take_all()  # the same rows in the same order


def test_small_local_media_read_on_the_driver_hold_the_rows_ray_data_tasks_read(ray_cluster, digits_dir, monkeypatch):
    import dataclasses

    cfg = load_config(None, [f"data.train={digits_dir}", "data.validation=null", "data.val_fraction=0.2",
                             "model.name=timm:test_resnet"])
    task = task_for(cfg.model.task)
    summary = task.inspect(cfg, "image")
    # values that are lists (multi-label sets) stay with the read tasks: the same types as before
    sets = dataclasses.replace(summary, train_files=[(f, [label, "x"] if i % 2 else []) for i, (f, label)
                                                      in enumerate(summary.train_files)])
    read, reads_here, read_bytes = {}, [], data.read_bytes
    monkeypatch.setattr(data, "read_bytes", lambda path: reads_here.append(path) or read_bytes(path))
    for where, limit in (("driver", data.DRIVER_READ_BYTES), ("tasks", -1)):  # -1: every size goes to read tasks
        monkeypatch.setattr(data, "DRIVER_READ_BYTES", limit)
        reads_here.clear()
        read[where] = [task.datasets(summary, cfg), data.media_datasets(sets, cfg)]
        # the driver read every file of the string-valued data itself, or none
        files = [file for file, _ in summary.train_files + summary.val_files]
        assert reads_here == (files if where == "driver" else [])
    for on_driver, by_tasks in zip(read["driver"], read["tasks"]):
        for side in ("train", "validation"):
            assert isinstance(on_driver[side], MaterializedDataset)
            assert on_driver[side].schema() == by_tasks[side].schema()
            rows = [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in row.items()}
                    for row in on_driver[side].iter_rows()]
            assert rows == [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in row.items()}
                            for row in by_tasks[side].iter_rows()]  # the same rows in the same order
            assert len(rows) == (summary.num_train_rows if side == "train" else summary.num_val_rows)


def test_auto_streams_only_data_too_large_to_read_once(tmp_path):
    cfg = load_config(None, [f"data.train={TRAIN_CSV}", f"data.validation={VAL_CSV}", "model.name=hf:unused"])
    summary = task_for("classification").inspect(cfg, "text")
    once, why = materialize_decision(summary, cfg.data)
    assert once and why.startswith("data.materialize=auto: 0.0 MB of files, up to 256 MB")
    big = tmp_path / "big.csv"
    with open(big, "w") as f:  # a sparse file: 300 MB on paper, nothing on disk
        f.truncate(300 * 2**20)
    cfg.data.train = str(big)
    assert materialize_decision(summary, cfg.data) == (False, "data.materialize=auto: 300.0 MB of files, over 256 MB")


def test_two_workers_stream_on_a_two_cpu_node_and_validate_every_row_once(ray_cluster, tiny_text, tmp_path, capsys):
    val = tmp_path / "val33.csv"  # odd: an equal split between 2 workers would drop one row
    lines = open(VAL_CSV, newline="").read().splitlines()
    val.write_text("\n".join(lines[:34]) + "\n")
    cfg = load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "stream", data__validation=str(val),
                                           data__materialize="never", train__epochs=2, train__max_steps_per_epoch=4))
    # the session cluster has 2 CPUs and the two workers ask 1 each: the reads must still run
    result = fit(cfg)
    assert "each of the 2 workers reserves 0.75 CPU instead of 1" in capsys.readouterr().out
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert [h["validation_rows"] for h in result.history] == [33, 33]
    assert all(0.0 <= h["data_wait_share"] < 1.0 for h in result.history)


def test_two_workers_stream_image_files_from_a_manifest_on_a_two_cpu_node(ray_cluster, digits_dir, tmp_path):
    # the file list is read with Ray Data's Parquet reader, whose newer version lists files in a 1-CPU task
    # that two 0.75-CPU workers on this 2-CPU cluster left no room for: the run waited forever
    cfg = load_config(None, [f"data.train={digits_dir}", "data.validation=null", "data.val_fraction=0.1",
                             "data.materialize=never", "model.name=timm:test_resnet", "model.weights=none",
                             "data.image_size=32", "scaling.num_workers=2", "scaling.resources_per_worker={CPU: 1}",
                             "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=8",
                             "tracking.mlflow=off", f"storage.path={tmp_path / 'runs'}", "storage.name=images"])
    result = fit(cfg)
    assert list((tmp_path / "runs" / "manifests").glob("*.parquet"))
    assert result.history[-1]["validation_rows"] == task_for("classification").inspect(cfg, "image").num_val_rows


def test_two_concurrent_trials_stream_on_a_two_cpu_node(ray_cluster, tiny_text, tmp_path, capsys):
    from ptm_ray.tune import run_search

    overrides = tiny_overrides(tiny_text["bert"], tmp_path, "unused", data__validation=VAL_CSV,
                               data__materialize="never", train__epochs=1, train__max_steps_per_epoch=3,
                               scaling__num_workers=1)
    overrides += ["search.space={optim.lr: {grid: [1.0e-3, 3.0e-4]}}", "search.name=stream", "search.scheduler=fifo",
                  "search.max_concurrent_trials=2", f"search.registry={tmp_path / 'registry'}",
                  "search.registry_name=intents", "search.top_k=1"]
    # each trial trains itself and asks 1 CPU: two at once would hold both, and their reads would wait forever
    result = run_search(load_config(None, overrides))
    assert "each of the 2 concurrent trials reserves 0.75 CPU instead of 1" in capsys.readouterr().out
    assert sorted(row.lr for row in result.leaderboard) == [3.0e-4, 1.0e-3]
    assert all(row.epochs_run == 1 and row.best_score is not None for row in result.leaderboard)


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_media_checks_in_ray_data_tasks_find_what_the_driver_finds(ray_cluster, tmp_path, monkeypatch, policy):
    from PIL import Image

    import ptm_ray.data
    from ptm_ray.config import DataConfig
    from ptm_ray.data import check_media_files

    rows = []
    for i in range(150):
        path = tmp_path / f"{i}.png"
        if i in (37, 120):  # truncated: a header and nothing else
            path.write_bytes(b"\x89PNG\r\n\x1a\n")
        else:
            Image.new("RGB", (8, 8), (i, 0, 0)).save(path)
        rows.append((str(path), str(i % 3)))
    cfg = DataConfig(train=str(tmp_path), on_bad_file=policy)
    outcomes = []
    monkeypatch.setattr(ptm_ray.data, "CHECK_ON_DRIVER_S", 0.0)  # default: the driver checks one file, Ray Data the rest
    for parallel in (False, True, None):
        try:
            outcomes.append(check_media_files(rows, cfg, "data.train", "image", parallel=parallel))
        except ValueError as e:
            outcomes.append(str(e))
    assert outcomes[0] == outcomes[1] == outcomes[2]  # the same files kept and skipped, the same first error
    if policy == "fail":
        assert outcomes[1] == (f"data.train: {tmp_path / '37.png'}: not decodable as an image: cannot identify image "
                               "file (set data.on_bad_file=skip to leave such files out)")
    else:
        good, bad = outcomes[1]
        assert bad == [str(tmp_path / "37.png"), str(tmp_path / "120.png")] and len(good) == 148


def test_streamed_media_rows_come_from_a_manifest_on_storage_equal_to_the_materialized_rows(ray_cluster, digits_dir,
                                                                                           tmp_path):
    """Streamed image files are listed in a Parquet manifest under storage.path (the object store then holds a
    window of the list, not the list): the same rows as the materialized path, the manifest written once."""
    import pyarrow.parquet

    from ptm_ray.data import media_dataset

    rows, summaries, cfgs = {}, {}, {}
    for mode in ("never", "always"):
        cfgs[mode] = cfg = load_config(None, [f"data.train={digits_dir}", "data.validation=null", "data.val_fraction=0.2",
                                 f"data.materialize={mode}", "model.name=timm:test_resnet",
                                 f"storage.path={tmp_path / 'runs'}"])
        task = task_for(cfg.model.task)
        summaries[mode] = summary = task.inspect(cfg, "image")
        datasets = task.datasets(summary, cfg)
        rows[mode] = {split: sorted((r["input"], r["label"]) for r in ds.iter_rows()) for split, ds in datasets.items()}
    assert rows["never"] == rows["always"] and len(rows["never"]["validation"]) == summaries["never"].num_val_rows
    manifests = sorted((tmp_path / "runs" / "manifests").iterdir())
    assert len(manifests) == 2 and all(p.suffix == ".parquet" for p in manifests)  # train and validation, no partial
    listed = [list(zip(*pyarrow.parquet.read_table(p).to_pydict().values())) for p in manifests]
    assert sorted(map(len, listed)) == sorted([summaries["never"].num_train_rows, summaries["never"].num_val_rows])
    assert sorted(summaries["never"].train_files) in [sorted(rows) for rows in listed]
    written = [p.stat().st_mtime_ns for p in manifests]
    task.datasets(summaries["never"], cfgs["never"])
    assert [p.stat().st_mtime_ns for p in manifests] == written  # the same list is not written again

    # values that are lists (multi-label sets) read back from a manifest as from the object store
    files = [(str(p), labels) for p, labels in zip(sorted(Path(digits_dir).rglob("*.png"))[:5],
                                                   [["a"], ["a", "b"], [], ["c"], ["b", "c"]])]
    by_items = [(r["label"].tolist(), r["input"]) for r in media_dataset(files).iter_rows()]
    by_manifest = [(r["label"].tolist(), r["input"]) for r in media_dataset(files, manifests=str(tmp_path / "m")).iter_rows()]
    assert by_manifest == by_items and [labels for labels, _ in by_items] == [labels for _, labels in files]


def test_an_epoch_cut_short_reads_only_the_rows_it_trains_on(ray_cluster, digits_dir, tmp_path):
    """With train.max_steps_per_epoch, streamed training data stops at the rows the epoch trains on (the first
    ones, in order), so Ray Data does not read ahead into rows no step takes; data in the object store and
    validation are left whole."""
    from ptm_ray.train import truncated_epochs

    datasets = {}
    for mode in ("never", "always"):
        cfg = load_config(None, [f"data.train={digits_dir}", "data.validation=null", "data.val_fraction=0.2",
                                 f"data.materialize={mode}", "model.name=timm:test_resnet", "train.batch_size=8",
                                 "train.max_steps_per_epoch=3", "scaling.num_workers=2",
                                 f"storage.path={tmp_path / 'runs'}"])
        task = task_for(cfg.model.task)
        datasets[mode] = task.datasets(task.inspect(cfg, "image"), cfg)
        cut = truncated_epochs(cfg, datasets[mode])
        assert cut["validation"] is datasets[mode]["validation"]
    assert cut["train"] is datasets["always"]["train"]  # already in the object store: nothing read ahead
    streamed = datasets["never"]["train"]
    cut = truncated_epochs(cfg, datasets["never"])["train"]
    assert [r["input"] for r in cut.iter_rows()] == [r["input"] for r in streamed.take(3 * 8 * 2)]
    everything = truncated_epochs(load_config(None, [f"data.train={digits_dir}", "model.name=timm:test_resnet"]),
                                  datasets["never"])  # no cap on the steps: every row
    assert everything["train"] is streamed


def test_data_in_the_object_store_is_cut_at_its_blocks_without_a_coordinator(ray_cluster):
    import pyarrow as pa
    import ray.data

    from ptm_ray.train import _cut_at_blocks

    spans = [(0, 5), (5, 6), (6, 20), (20, 21)]
    dataset = ray.data.from_blocks([pa.table({"x": list(range(a, b))}) for a, b in spans])
    shards = _cut_at_blocks(dataset, 3, equal=False)  # validation: every row once, balanced by whole blocks
    rows = [[row["x"] for row in shard.iter_rows()] for shard in shards]
    assert rows == [list(range(0, 6)), list(range(6, 20)), [20]]
    one_block = _cut_at_blocks(ray.data.from_blocks([pa.table({"x": [1, 2, 3]})]), 2, equal=False)
    assert [[row["x"] for row in shard.iter_rows()] for shard in one_block] == [[1, 2, 3], []]
    assert _cut_at_blocks(dataset, 1, equal=True) == [dataset]  # one worker reads it whole
    # equal shards (training) need cuts inside blocks: Ray Data's streaming split does those
    assert _cut_at_blocks(dataset, 2, equal=True) is None
    assert _cut_at_blocks(dataset.map_batches(lambda b: b), 1, equal=True) is None  # not in the store yet
