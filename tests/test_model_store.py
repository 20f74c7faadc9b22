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
