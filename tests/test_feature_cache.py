"""Frozen-prefix feature cache: same validation metrics as without it, per family; keys; reuse; fallback."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ptm_ray.config import load_config
from ptm_ray.feature_cache import cache_key
from ptm_ray.models import resolve_model
from ptm_ray.train import fit, plan_run

from conftest import TRAIN_CSV, tiny_overrides

# One worker: Ray Data hands it the whole (materialized) training set in a fixed order, so the same seed
# gives the same batches with and without the cache and any metric difference would be the cache's.
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


ONE_WORKER = {"scaling__num_workers": 1, "scaling__resources_per_worker": "{CPU: 1}", "train__epochs": 2}
MEDIA = ["data.validation=null", "data.val_fraction=0.2", "optim.scheduler=constant", "optim.warmup_ratio=0.0",
         "scaling.num_workers=1", "scaling.resources_per_worker={CPU: 1}", "train.epochs=2"]


def _pair(make_cfg) -> tuple:
    """The same run without and with the cache."""
    off = fit(make_cfg("uncached", "off"))
    on = fit(make_cfg("cached", "on"))
    return off, on


def _assert_same_metrics(off, on) -> None:
    assert off.history[-1]["feature_cache_bytes"] == 0
    assert on.history[-1]["feature_cache_bytes"] > 0
    for a, b in zip(off.history, on.history, strict=True):
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1e-6), (off.history, on.history)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3, abs=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("depth", [2, "all"])
def test_text_cached_run_matches_uncached(ray_cluster, tiny_text, tmp_path, depth):
    def make(name, setting):
        return load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, f"{name}", model__freeze_depth=depth,
                                                train__feature_cache=setting, **ONE_WORKER))

    off, on = _pair(make)
    _assert_same_metrics(off, on)
    # the cache sits under storage.path, sized as reported
    caches = [p for p in (tmp_path / "runs" / "feature_cache").iterdir() if not p.name.startswith(".")]
    assert len(caches) == 1
    meta = json.loads((caches[0] / "meta.json").read_text())
    assert meta["size_bytes"] == sum(p.stat().st_size for p in caches[0].glob("*.npy"))
    assert meta["size_bytes"] == on.history[-1]["feature_cache_bytes"]


def test_vision_cached_run_matches_uncached(ray_cluster, digits_dir, tmp_path):
    def make(name, setting):
        return load_config(None, ["model.name=timm:test_efficientnet", "model.weights=none", f"data.train={digits_dir}",
                                  "data.image_size=32", "train.batch_size=32", "model.freeze_depth=4", "optim.lr=3e-3",
                                  "train.max_steps_per_epoch=10", f"train.feature_cache={setting}",
                                  f"storage.path={tmp_path / 'runs'}", f"storage.name={name}", *MEDIA])

    _assert_same_metrics(*_pair(make))


def test_speech_cached_run_matches_uncached(ray_cluster, speech_dir, tiny_audio, tmp_path):
    def make(name, setting):
        return load_config(None, [f"model.name=hf:{tiny_audio['wav2vec2']}", f"data.train={speech_dir}",
                                  "data.max_seconds=1.0", "train.batch_size=8", "model.freeze_depth=all",
                                  "optim.lr=2e-3", f"train.feature_cache={setting}",
                                  f"storage.path={tmp_path / 'runs'}", f"storage.name={name}", *MEDIA])

    _assert_same_metrics(*_pair(make))


def test_second_run_with_same_key_reuses_the_cache(ray_cluster, tiny_text, tmp_path, monkeypatch):
    # Judged from each run's own record (the build seconds it reports, the cache folders on disk), not from the
    # console: a capsys check of the "feature cache built/reused" line failed once in a full random-order run and
    # never alone.
    def make(name, **extra):
        return load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, name, model__freeze_depth="all",
                                                **(ONE_WORKER | {"train__epochs": 1} | extra)))

    def build_s(result) -> float:
        return result.history[-1]["feature_cache_build_s"]

    cache_root = tmp_path / "runs" / "feature_cache"
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # the build's progress bar is drawn on a terminal only
    first = fit(make("first"))
    monkeypatch.undo()
    assert build_s(first) > 0
    bar = re.compile(r"\[ptm_ray\] feature cache: 3 frozen block\(s\): +(\d+)%\|.*\| (\d+)/(\d+) ")
    drawn = [m.groups() for line in re.split(r"[\r\n]", terminal.getvalue()) if (m := bar.search(line))]
    assert drawn and drawn[-1][0] == "100" and drawn[-1][1] == drawn[-1][2]  # every row, training and validation
    assert int(drawn[-1][2]) > first.history[-1]["validation_rows"]
    [cache] = [p for p in cache_root.iterdir() if not p.name.startswith(".")]
    meta_mtime = (cache / "meta.json").stat().st_mtime_ns
    second = fit(make("second", optim__lr=1e-2))  # a different learning rate: same prefix, same cache
    assert build_s(second) == 0.0 and second.history[-1]["feature_cache_bytes"] == first.history[-1]["feature_cache_bytes"]
    assert (cache / "meta.json").stat().st_mtime_ns == meta_mtime  # read, not rewritten
    # different preprocessing: a new cache, as fit prepares it (a third Ray Train run would add only its start-up)
    third = _prepare(make("third", model__max_length=16), str(cache_root))
    assert third.built and Path(third.path).parent == cache_root and Path(third.path) != cache
    caches = list(cache_root.iterdir())
    assert len(caches) == 2 and not any(p.name.startswith(".building") for p in caches)


def _prepare(cfg, root: str, in_process: bool = False):
    """``prepare_cache`` as ``fit`` calls it (or a trial that trains itself: ``in_process``), for ``cfg``'s own
    plan and data."""
    from ptm_ray.feature_cache import prepare_cache
    from ptm_ray.tasks import task_for

    model_family, ref = resolve_model(cfg.model)
    plan = plan_run(cfg)
    datasets = task_for(cfg.model.task).datasets(plan.data, cfg)
    return prepare_cache(cfg, model_family, ref, plan.labels, plan.freeze_blocks, plan.num_blocks, plan.data, datasets,
                         root, in_process)


def test_a_cache_built_in_the_trial_process_equals_the_one_ray_data_actors_build(ray_cluster, tiny_text, tmp_path):
    """A search's single-worker trial computes the prefix itself (no actor to start): same rows, same features."""
    import numpy as np

    cfg = load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "inproc", model__freeze_depth=2,
                                           **ONE_WORKER))
    by_actors = _prepare(cfg, str(tmp_path / "actors"))
    in_process = _prepare(cfg, str(tmp_path / "in_process"), in_process=True)
    assert by_actors.built and in_process.built and by_actors.key == in_process.key
    names = sorted(p.name for p in Path(by_actors.path).glob("*.npy"))
    assert names == sorted(p.name for p in Path(in_process.path).glob("*.npy")) and "hidden.npy" in names
    arrays = [{name: np.load(Path(cache.path) / name) for name in names} for cache in (by_actors, in_process)]
    mask = arrays[0]["attention_mask.npy"].astype(bool)
    assert np.array_equal(mask, arrays[1]["attention_mask.npy"])
    for name in names:
        a, b = arrays[0][name], arrays[1][name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name == "hidden.npy":  # at padding the states depend on the batch's padded length; the top masks them
            a, b = a[mask], b[mask]
        assert np.allclose(a, b, atol=1e-5), name  # the actor runs 1 torch thread, this process may run more


def _race(cfg, root: str) -> list:
    """Two threads of this process ask for the same cache at once, as two trials of a search do."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: _prepare(cfg, root), range(2)))


def test_racing_builders_build_once_on_a_folder_and_on_s3(ray_cluster, tiny_text, tmp_path, s3_server, monkeypatch):
    """One build per key however many trials ask at once (they used to build side by side and keep the first
    rename); on object storage the cache goes to the bucket, meta.json last, and a reader memory-maps its node's
    own copy, downloaded once: the same features as the cache built on a folder."""
    import pyarrow.fs

    from ptm_ray.feature_cache import FeatureStore

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PTM_RAY_CACHE_DIR", str(tmp_path / "node"))
    cfg = load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "race", model__freeze_depth="all",
                                           **ONE_WORKER))
    local = _race(cfg, str(tmp_path / "caches"))
    assert sorted(info.built for info in local) == [False, True] and local[0].path == local[1].path
    assert [p.name for p in (tmp_path / "caches").iterdir()] == [local[0].key]

    bucket = f"s3://ptm-ray/{tmp_path.name}/feature_cache"
    remote = _race(cfg, bucket)
    assert sorted(info.built for info in remote) == [False, True]
    assert remote[0].path == f"{bucket}/{local[0].key}" and remote[0].size_bytes == local[0].size_bytes
    s3, inner = pyarrow.fs.FileSystem.from_uri(remote[0].path)
    on_bucket = sorted(i.base_name for i in s3.get_file_info(pyarrow.fs.FileSelector(inner)))
    assert on_bucket == sorted(p.name for p in Path(local[0].path).iterdir())  # every array and meta.json
    # the builder's node copy is what readers on its node map; a node without one downloads it
    assert [p.name for p in (tmp_path / "node").iterdir()] == [local[0].key]
    shutil.rmtree(tmp_path / "node")
    with open(TRAIN_CSV, newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)][:5]
    from_folder, from_bucket = FeatureStore(local[0].path), FeatureStore(remote[0].path)
    assert (tmp_path / "node" / local[0].key / "meta.json").is_file()
    for name, array in from_folder.lookup(texts, torch.device("cpu")).items():
        assert torch.equal(array, from_bucket.lookup(texts, torch.device("cpu"))[name])


def _key(overrides: list[str]) -> str:
    cfg = load_config(None, overrides)
    model_family, ref = resolve_model(cfg.model)
    plan = plan_run(cfg)
    return cache_key(cfg, model_family, ref, plan.freeze_blocks, plan.num_blocks, plan.data)


def test_key_changes_with_model_depth_preprocessing_and_data(tiny_text, tmp_path):
    base = tiny_overrides(tiny_text["bert"], tmp_path, "k", model__freeze_depth=1)
    key = _key(base)
    assert _key(base + ["optim.lr=0.5", "storage.name=other", "train.epochs=1"]) == key  # not part of the prefix
    other_data = tmp_path / "train.csv"
    other_data.write_text(Path(base[2].split("=", 1)[1]).read_text() + "refund my order please,refund\n")
    changed = [["model.freeze_depth=2"], ["model.max_length=16"], [f"model.name=hf:{tiny_text['roberta']}"],
               [f"data.train={other_data}"]]
    keys = {_key(base + c) for c in changed}
    assert key not in keys and len(keys) == len(changed)


def test_key_changes_when_a_file_is_rewritten_in_place_or_the_weights_change(tiny_text, tmp_path):
    import os
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    # the training file rewritten in place, same name and same size (one row's text edited), as an editor or a
    # re-export would: a cache of the old rows must not be reused
    data = tmp_path / "train.csv"
    shutil.copy(TRAIN_CSV, data)
    weights = tmp_path / "bert"
    shutil.copytree(tiny_text["bert"], weights)
    base = tiny_overrides(str(weights), tmp_path, "k", model__freeze_depth=1, data__train=data)
    key = _key(base)
    text = data.read_bytes()
    rewritten = text.replace(b"please refund me asap", b"please refund me ASAP", 1)
    assert rewritten != text and len(rewritten) == len(text)
    data.write_bytes(rewritten)
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a later write, even on a coarse clock
    after_rewrite = _key(base)
    assert after_rewrite != key

    # the same folder with other weights (fine-tuned further and saved over): a new key
    model = AutoModelForSequenceClassification.from_pretrained(weights)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.add_(0.01)
    model.save_pretrained(weights)
    assert _key(base) not in (key, after_rewrite)


def test_key_changes_with_image_size_and_audio_length(digits_dir, speech_dir, tiny_audio, tmp_path):
    vision = ["model.name=timm:test_efficientnet", "model.weights=none", f"data.train={digits_dir}",
              "model.freeze_depth=2", f"storage.path={tmp_path}"]
    assert _key(vision + ["data.image_size=32"]) != _key(vision + ["data.image_size=48"])
    speech = [f"model.name=hf:{tiny_audio['wav2vec2']}", f"data.train={speech_dir}", "model.freeze_depth=all",
              f"storage.path={tmp_path}"]
    assert _key(speech + ["data.max_seconds=1.0"]) != _key(speech + ["data.max_seconds=0.5"])


def test_auto_falls_back_and_on_refuses_where_the_cache_is_invalid(tiny_text, digits_dir, tmp_path):
    gpt2 = tiny_overrides(tiny_text["gpt2"], tmp_path, "g", model__freeze_depth=1)
    plan = plan_run(load_config(None, gpt2))
    assert not plan.feature_cache and "cache not supported for hf-text 'gpt2'" in plan.feature_cache_reason
    assert not plan_run(load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "z"))).feature_cache  # depth 0
    bert = tiny_overrides(tiny_text["bert"], tmp_path, "b", model__freeze_depth=1)
    assert plan_run(load_config(None, bert)).feature_cache
    augmented = ["model.name=timm:test_efficientnet", "model.weights=none", f"data.train={digits_dir}",
                 "model.freeze_depth=2", "data.augment=light", "train.feature_cache=on"]
    with pytest.raises(ValueError, match="train.feature_cache=on but .*data.augment=light"):
        plan_run(load_config(None, augmented))
    with pytest.raises(ValueError, match="train.feature_cache"):
        load_config(None, gpt2 + ["train.feature_cache=sometimes"])
