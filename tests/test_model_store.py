"""The model store: versions are claimed, never overwritten, and a checkpoint is registered once per name."""

from __future__ import annotations

import hashlib
import re
import json
from concurrent.futures import ThreadPoolExecutor
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


def test_each_version_carries_a_manifest_that_finds_damage(tmp_path):
    store = ModelStore(str(tmp_path / "registry"))
    source = _checkpoint(tmp_path, "a")
    found = store.promote(source, "intents", {})
    files = found.lineage["files"]
    assert files == {name: {"size": (Path(source) / name).stat().st_size,
                            "sha256": hashlib.sha256((Path(source) / name).read_bytes()).hexdigest()}
                     for name in ("ptm_ray.json", "weights.bin")}
    assert store.get("intents").lineage["files"] == files  # what readers check against
    store.verify(store.get("intents"))  # intact: no error
    weights = Path(found.path) / "weights.bin"
    weights.write_bytes(b"A")  # same size, other bytes: a flipped bit
    (Path(found.path) / "ptm_ray.json").unlink()
    with pytest.raises(ValueError) as e:
        store.verify(store.get("intents"))
    assert str(e.value).startswith(f"model 'intents' version 1 in the registry {store.root} is incomplete or corrupt: "
                                   "ptm_ray.json is missing; weights.bin does not match its sha256 in the manifest.")
    weights.write_bytes(b"abc")
    with pytest.raises(ValueError, match="weights.bin has 3 bytes, the manifest says 1"):
        store.verify(store.get("intents"))
    assert not list(Path(found.path).glob(".*partial"))  # lineage.json was written under another name, then renamed


def _promote_in_parallel(store: ModelStore, sources: list[str]) -> list[int]:
    with ThreadPoolExecutor(len(sources)) as pool:
        return list(pool.map(lambda source: store.promote(source, "intents", {}).version, sources))


def test_parallel_promotions_get_distinct_versions_on_a_local_folder(tmp_path):
    store = ModelStore(str(tmp_path / "registry"))
    sources = [_checkpoint(tmp_path, f"c{i}") for i in range(8)]
    versions = _promote_in_parallel(store, sources)
    assert sorted(versions) == list(range(1, 9))
    for source, version in zip(sources, versions):  # bug guarded: two copies written into one folder
        assert (Path(store.get("intents", version).path) / "weights.bin").read_bytes() == Path(source, "weights.bin").read_bytes()


def test_parallel_promotions_get_distinct_versions_on_s3(tmp_path, s3_server, monkeypatch):
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    store = ModelStore("s3://ptm-ray/registry-parallel")
    sources = [_checkpoint(tmp_path, f"s{i}") for i in range(6)]
    versions = _promote_in_parallel(store, sources)
    assert sorted(versions) == list(range(1, 7))  # without the conditional write two of them took one number
    for source, version in zip(sources, versions):
        found = store.get("intents", version)
        store.verify(found)
        assert found.lineage["source_checkpoint"] == source


def test_the_cli_refuses_a_damaged_registry_version_by_name(tmp_path):
    from ptm_ray.cli_checkpoints import resolve_target

    store = ModelStore(str(tmp_path / "registry"))
    found = store.promote(_checkpoint(tmp_path, "a"), "intents", {})
    assert resolve_target("intents", store.root) == (found.path, f"intents v1 ({found.path})")
    (Path(found.path) / "weights.bin").unlink()
    with pytest.raises(ValueError, match=r"^model 'intents' version 1 in the registry .* is incomplete or corrupt: "
                                         r"weights.bin is missing\."):
        resolve_target("intents:1", store.root)


def test_loading_a_version_checks_the_hashes_of_what_it_loads(tmp_path, s3_server, monkeypatch):
    """Serve checks an object-storage version by its files' sizes (no download); the replica that copies it checks
    the hashes of its copy, so a same-size change is still refused, naming the URI."""
    from ptm_ray.checkpoint import load_artifact

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    local, remote = ModelStore(str(tmp_path / "registry")), ModelStore("s3://ptm-ray/registry-load")
    for store in (local, remote):
        store.promote(_checkpoint(tmp_path, f"x-{len(store.root)}"), "intents", {})
    with open(Path(local.get("intents").path) / "weights.bin", "r+b") as f:
        f.write(b"?")  # same size, other bytes
    import boto3

    key = "registry-load/intents/v1/weights.bin"
    s3 = boto3.client("s3")
    s3.put_object(Bucket="ptm-ray", Key=key, Body=b"?" * len(s3.get_object(Bucket="ptm-ray", Key=key)["Body"].read()))
    for store in (local, remote):
        found = store.get("intents")
        store.verify(found, hashes=False)  # the sizes match
        with pytest.raises(ValueError, match=r"^" + re.escape(found.path) + r" is incomplete or corrupt \(its files "
                                             r"differ from the manifest written when it was promoted\): weights.bin "
                                             r"does not match its sha256 in the manifest$"):
            load_artifact(found.path)


def test_a_version_promoted_under_another_name_verifies(tmp_path):
    store = ModelStore(str(tmp_path / "registry"))
    first = store.promote(_checkpoint(tmp_path, "a"), "intents", {})
    again = store.promote(first.path, "intents-copy", {"from": "intents v1"})  # its lineage.json is not copied over
    assert sorted(again.lineage["files"]) == ["ptm_ray.json", "weights.bin"]
    store.verify(store.get("intents-copy"))
