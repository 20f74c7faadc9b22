"""The model store: versions are claimed, never overwritten, and a checkpoint is registered once per name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptm_ray.model_store import ModelStore


def _checkpoint(root: Path, name: str) -> str:
    path = root / name
    path.mkdir(parents=True)
    (path / "ptm_ray.json").write_text(json.dumps({"task": "classification"}))
    (path / "weights.bin").write_bytes(name.encode())
    return str(path)


def test_promoting_the_same_checkpoint_twice_returns_its_version(tmp_path):
    store = ModelStore(str(tmp_path / "registry"))
    first, second = _checkpoint(tmp_path, "a"), _checkpoint(tmp_path, "b")
    assert store.promote(first, "intents", {"rank": 1}).version == 1
    assert store.promote(second, "intents", {"rank": 2}).version == 2
    again = store.promote(first, "intents", {"rank": 9})  # a finished search run a second time
    assert (again.version, again.lineage["rank"]) == (1, 1)
    assert [v.version for v in store.versions("intents")] == [1, 2]
    # under another name it is a new entry
    assert store.promote(first, "intents-copy", {}).version == 1
    assert (Path(store.get("intents", 2).path) / "weights.bin").read_bytes() == b"b"


def test_promoting_something_that_is_not_a_checkpoint_is_refused(tmp_path):
    store = ModelStore(str(tmp_path / "registry"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is not a ptm_ray checkpoint \(no ptm_ray.json\)"):
        store.promote(str(tmp_path / "empty"), "intents", {})
    with pytest.raises(ValueError, match="registry name 'no spaces'"):
        store.promote(_checkpoint(tmp_path, "c"), "no spaces", {})
    assert store.names() == []


def test_ray_paths_on_object_storage_get_their_scheme_back_and_local_paths_stay():
    from ptm_ray.checkpoint import as_uri

    # bug guarded: Ray reports s3 checkpoints as "bucket/runs/..." and the driver read that as a local folder
    assert as_uri("bars/runs/r/checkpoint_000001", "s3://bars/runs") == "s3://bars/runs/r/checkpoint_000001"
    assert as_uri("/bars/runs/r", "gs://bars/runs") == "gs://bars/runs/r"
    assert as_uri("s3://bars/runs/r", "s3://bars/runs") == "s3://bars/runs/r"
    assert as_uri("/home/u/runs/r/checkpoint_000001", "/home/u/runs") == "/home/u/runs/r/checkpoint_000001"


def test_read_meta_reads_uris_and_names_what_is_missing(tmp_path):
    from ptm_ray.checkpoint import read_meta

    _checkpoint(tmp_path, "ck")
    assert read_meta(f"file://{tmp_path / 'ck'}") == {"task": "classification"}  # through pyarrow, as for s3://
    with pytest.raises(ValueError, match=r"file://.*/nothing is not a ptm_ray checkpoint: ptm_ray.json is missing"):
        read_meta(f"file://{tmp_path / 'nothing'}")


@pytest.mark.parametrize("uri", [False, True])
def test_a_version_without_lineage_is_not_listed_and_its_number_not_reused(tmp_path, uri):
    # a promotion cut short (copy interrupted) or still copying: its folder has no lineage.json yet
    root = tmp_path / "registry"
    store = ModelStore(root.as_uri() if uri else str(root))  # file://: the pyarrow path object stores take
    assert store.promote(_checkpoint(tmp_path, "a"), "intents", {}).version == 1
    half = root / "intents" / "v2"
    (half / "model").mkdir(parents=True)
    (half / "ptm_ray.json").write_text("{}")
    assert [v.version for v in store.versions("intents")] == [1]
    assert store.get("intents").version == 1  # bug guarded: the half-copied v2 served as latest
    with pytest.raises(ValueError, match=r"has no version 2; versions: \[1\]"):
        store.get("intents", 2)
    third = store.promote(_checkpoint(tmp_path, "b"), "intents", {})
    assert third.version == 3 and store.get("intents").version == 3  # v2's folder is never written into
    assert not (half / "lineage.json").exists()
