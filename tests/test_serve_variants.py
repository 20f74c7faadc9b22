"""Serving many winners: continuous batching, variants of one base multiplexed on shared replicas, one hop.

The batcher is plain asyncio (no Ray); variants load onto a shared tiny BERT and must predict exactly as their
own merged checkpoints do, offline and over real HTTP from a real Serve, through LRU eviction.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from ptm_ray.checkpoint import load_artifact
from ptm_ray.config import load_config
from ptm_ray.inference import predict
from ptm_ray.model_store import ModelStore
from ptm_ray.serve import _Batcher, _length_buckets, app_args, build_app, deploy
from ptm_ray.tiny import make_lora_variant
from ptm_ray.variants import SharedBase, read_variant_info

from conftest import SteadyLoad, free_port, same_predictions

TEXTS = ["where is my order", "i want a refund please", "cancel it", "my card was charged twice for one order"]


# --- continuous batching ------------------------------------------------------------------------------------


class _Recorder:
    """A ``run`` that records each pass and, while ``gate`` is closed, blocks the first one (a slow forward)."""

    def __init__(self) -> None:
        self.passes: list[tuple[object, list]] = []
        self.gate = threading.Event()

    def __call__(self, key, inputs):
        self.passes.append((key, list(inputs)))
        self.gate.wait(5)
        if "boom" in inputs:
            raise RuntimeError("forward failed")
        return [f"{key}:{x}" for x in inputs]


def test_batcher_runs_a_lone_request_at_once_and_batches_what_arrives_meanwhile():
    async def scenario():
        run = _Recorder()
        batcher = _Batcher(run, max_batch_size=4)
        first = asyncio.create_task(batcher.submit(None, ["a"]))
        await asyncio.sleep(0.05)
        assert run.passes == [(None, ["a"])]  # nothing waited for company
        later = [asyncio.create_task(batcher.submit(None, [x])) for x in "bcdef"]
        await asyncio.sleep(0.05)
        run.gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *later), 5)  # a lost request: TimeoutError
        return run.passes, results

    passes, results = asyncio.run(scenario())
    assert results == [["None:a"], ["None:b"], ["None:c"], ["None:d"], ["None:e"], ["None:f"]]
    # the five that arrived during the first pass: the next pass takes max_batch_size of them, then the rest
    assert [inputs for _, inputs in passes] == [["a"], ["b", "c", "d", "e"], ["f"]]


def test_batcher_never_mixes_keys_and_an_error_reaches_only_its_pass():
    async def scenario():
        run = _Recorder()
        batcher = _Batcher(run, max_batch_size=16)
        blocker = asyncio.create_task(batcher.submit("x", ["0"]))
        await asyncio.sleep(0.05)
        # keys compare by value: a key made twice is one key (as variants' preprocessing digests are)
        x, again = "x", "".join(["x", ""])
        assert again == x and again is not x
        tasks = [asyncio.create_task(batcher.submit(key, items)) for key, items in
                 [(x, ["1", "2"]), ("y", ["boom"]), (again, ["3"]), ("y", ["4"])]]
        await asyncio.sleep(0.05)
        run.gate.set()
        await blocker
        return run.passes, await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)

    passes, results = asyncio.run(scenario())
    assert passes == [("x", ["0"]), ("x", ["1", "2", "3"]), ("y", ["4", "boom"])]
    assert results[0] == ["x:1", "x:2"] and results[2] == ["x:3"]
    assert all(isinstance(r, RuntimeError) for r in (results[1], results[3]))  # both "y" requests shared the pass


def test_texts_are_bucketed_by_length_so_a_pass_pads_to_about_its_own_length():
    texts = ["a" * 300, "b" * 5, "c" * 40, "d" * 30, "e" * 70, "f" * 100]
    # each bucket's longest <= twice its shortest (texts under 32 characters count as 32)
    assert _length_buckets(texts) == [[1, 3, 2], [4, 5], [0]]
    assert _length_buckets([b"x" * 10, b"y"]) == [[0, 1]]  # images and audio: one pass


# --- variants on a shared base --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variants(tiny_text, tmp_path_factory) -> dict[str, Path]:
    """Three variants of the tiny BERT: LoRA on both layers (3 labels), LoRA on the top layer (5 labels), and a
    head trained on the fully frozen backbone (2 labels)."""
    root = tmp_path_factory.mktemp("variants")
    base = [f"model.name=hf:{tiny_text['bert']}", "model.max_length=16"]
    return {"lora-all": make_lora_variant(root / "lora-all", [*base, "model.lora.r=4"], ["a", "b", "c"], seed=1),
            "lora-top": make_lora_variant(root / "lora-top", [*base, "model.lora.r=2", "model.freeze_depth=2"],
                                          [f"l{i}" for i in range(5)], seed=2),
            "head": make_lora_variant(root / "head", [*base, "model.freeze_depth=all"], ["yes", "no"], seed=3)}


def _logits(artifact, texts):
    with torch.no_grad():
        return artifact.family.logits(artifact.model, artifact.batch(texts))


def test_variants_on_one_shared_base_predict_as_their_own_merged_checkpoints(variants):
    first = load_artifact(variants["lora-all"])
    shared = SharedBase(first.config, torch.device("cpu"))
    pristine = {n: p.clone() for n, p in shared.model.named_parameters()}
    views = {name: shared.load(folder) for name, folder in variants.items()}
    for name, folder in variants.items():  # interleaved: each call activates its own adapter and head
        merged = load_artifact(folder)
        with torch.no_grad():
            mine = views[name](**merged.batch(TEXTS)).logits
        assert mine.shape[-1] == len(merged.labels)
        assert torch.allclose(mine, _logits(merged, TEXTS), atol=1e-5), name
    # unloading one leaves the others exact, and the base's own weights were never written
    shared.unload(views.pop("lora-all"))
    assert not any(".v0." in n for n in shared.model.state_dict())
    merged = load_artifact(variants["lora-top"])
    with torch.no_grad():
        assert torch.allclose(views["lora-top"](**merged.batch(TEXTS)).logits, _logits(merged, TEXTS), atol=1e-5)
    current = dict(shared.model.named_parameters())
    assert all(torch.equal(current[n], p) for n, p in pristine.items() if n in current)
    assert read_variant_info(str(variants["head"]))["lora"] is None


def test_one_pass_over_rows_of_several_variants_equals_each_variants_own_pass(variants):
    from ptm_ray.variants import NotMixable, _RowwiseLinear

    shared = SharedBase(load_artifact(variants["lora-all"]).config, torch.device("cpu"))
    views = [shared.load(folder) for folder in variants.values()]
    texts = TEXTS * 2  # rows interleaved across the three variants: 0,3,6 / 1,4,7 / 2,5
    rows = [[i for i in range(len(texts)) if i % 3 == k] for k in range(3)]
    merged = [load_artifact(folder) for folder in variants.values()]
    with torch.no_grad():
        mixed = shared.mixed_logits(views, merged[0].batch(texts), rows)
    for own, logits, artifact in zip(rows, mixed, merged):
        alone = _logits(artifact, [texts[i] for i in own])
        assert torch.allclose(logits[:, :len(artifact.labels)], alone, atol=1e-5), artifact.path
    # the head layers and hooks are put back: a variant alone still answers as itself
    with torch.no_grad():
        assert torch.allclose(views[1](**merged[1].batch(TEXTS)).logits, _logits(merged[1], TEXTS), atol=1e-5)
    assert all(type(m).__name__ != "_RowwiseLinear" for m in shared.model.modules())
    with pytest.raises(NotMixable, match="3 rows, the batch 4"):
        _RowwiseLinear([(torch.tensor([0]), torch.zeros(2, 5), None)], 4)(torch.zeros(3, 5))


def test_a_variant_of_another_base_is_refused_naming_the_tensors(variants, tiny_text, tmp_path):
    other = make_lora_variant(tmp_path / "gpt2", [f"model.name=hf:{tiny_text['gpt2']}", "model.lora.r=2"], ["a", "b"])
    shared = SharedBase(load_artifact(variants["head"]).config, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"gpt2 is a classification variant of hf:.*gpt2; this base is hf:.*bert"):
        shared.load(other)


# --- over HTTP --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(variants, tiny_text, tmp_path_factory) -> ModelStore:
    reg = ModelStore(str(tmp_path_factory.mktemp("registry")))
    for name, folder in variants.items():
        reg.promote(str(folder), name, {})
    full = make_lora_variant(tmp_path_factory.mktemp("full") / "full", [f"model.name=hf:{tiny_text['bert']}",
                                                                          "model.max_length=16"], ["p", "q"], seed=4)
    import shutil

    shutil.rmtree(full / "variant")  # as a full fine-tune writes it: no variant/
    reg.promote(str(full), "full", {})
    return reg


@pytest.fixture(scope="module")
def serve_port(ray_cluster):
    """Serve's HTTP proxy on a free loopback port for this module's applications, shut down after them."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def _overrides(reg: ModelStore, port: int, models: str, **extra: object) -> list[str]:
    values = {"serve.registry": reg.root, "serve.port": port, "serve.models": models, "serve.num_cpus": 0.1,
              "serve.max_replicas": 1, "serve.max_items": 8, "model.name": "minilm-l6"}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return ["data.train=unused"] + [f"{k}={v}" for k, v in values.items()]


def _offline(reg: ModelStore, name: str) -> list[dict]:
    return predict(load_artifact(reg.get(name).path), TEXTS, top_k=2)


def test_where_each_version_runs(registry):
    from ptm_ray.serve import _placements

    def places(models: str, **extra: object) -> dict[str, str]:
        return _placements(app_args(load_config(None, _overrides(registry, 8000, models, **extra))))

    assert places("[{name: lora-all}]") == {"lora-all:1": "local"}  # a lone variant: nothing to share a base with
    assert places("[{name: lora-all}]", serve__one_hop=False) == {"lora-all:1": "own"}
    assert places("[{name: lora-all}, {name: head}, {name: full}]") == {
        "lora-all:1": "shared", "head:1": "shared", "full:1": "own"}
    assert places("[{name: lora-all}, {name: head}]", serve__max_variants_per_replica=0) == {
        "lora-all:1": "own", "head:1": "own"}
    canary = "[{name: full, versions: [{version: 1, weight: 90}, {version: 1, weight: 10}]}]"
    assert set(places(canary).values()) == {"own"}


def test_variants_share_one_deployment_and_answer_as_offline_through_eviction(serve_port, registry):
    from ray import serve

    port = serve_port
    models = "[{name: lora-all}, {name: lora-top}, {name: head}, {name: full}]"
    cfg = load_config(None, _overrides(registry, port, models, serve__max_variants_per_replica=2))
    serve.run(build_app(app_args(cfg)), name="variants", route_prefix="/variants")
    try:
        deployments = set(serve.status().applications["variants"].deployments)
        shared = [d for d in deployments if d.startswith("shared-")]
        assert len(shared) == 1 and deployments == {"Ingress", "full-v1", *shared}  # 3 variants, one deployment
        offline = {name: _offline(registry, name) for name in ("lora-all", "lora-top", "head", "full")}
        base = f"http://127.0.0.1:{port}/variants/v1/models"
        # round-robin over three variants on a replica that holds two: every request after the first two evicts
        for name in ["lora-all", "lora-top", "head"] * 2 + ["full"]:
            r = requests.post(f"{base}/{name}/predict", json={"inputs": TEXTS, "top_k": 2}, timeout=60)
            assert r.status_code == 200, r.text
            same_predictions(r.json()["predictions"], offline[name])
        versioned = requests.post(f"{base}/lora-top/versions/1/predict", json={"inputs": TEXTS[:1]}, timeout=60)
        assert versioned.json()["predictions"][0]["label"] == offline["lora-top"][0]["label"]
        # concurrent requests to all three at once: each still gets its own adapter and head
        from concurrent.futures import ThreadPoolExecutor

        def ask(name: str) -> tuple[str, list[dict]]:
            r = requests.post(f"{base}/{name}/predict", json={"inputs": TEXTS, "top_k": 2}, timeout=60)
            return name, r.json()["predictions"]

        with ThreadPoolExecutor(6) as pool:
            for name, served in pool.map(ask, ["lora-all", "lora-top", "head"] * 4):
                same_predictions(served, offline[name])
    finally:
        serve.delete("variants")


def test_one_model_is_one_hop_and_changing_hops_under_load_fails_no_request(serve_port, registry, tmp_path):
    from ray import serve

    app = ["serve.app_name=onehop", "serve.route_prefix=/onehop", f"serve.config_out={tmp_path / 'serve.yaml'}"]

    def config(one_hop: bool):
        return load_config(None, _overrides(registry, serve_port, "[{name: full}]", serve__one_hop=one_hop) + app)

    url, _ = deploy(config(True))
    try:
        assert set(serve.status().applications["onehop"].deployments) == {"Ingress"}  # no model deployment behind
        r = requests.post(f"{url}/v1/models/full/predict", json={"inputs": TEXTS, "top_k": 2}, timeout=60)
        same_predictions(r.json()["predictions"], _offline(registry, "full"))
        bad = requests.post(f"{url}/v1/models/full/predict", json={"inputs": []}, timeout=30)
        assert bad.status_code == 422 and "inputs" in bad.json()["error"]
        assert requests.get(f"{url}/readyz", timeout=30).json()["models"] == ["full:1"]

        with SteadyLoad(f"{url}/v1/models/full/predict") as load:
            time.sleep(1)
            deploy(config(False))  # one hop -> two: the old ingress serves its requests itself while it drains
            assert set(serve.status().applications["onehop"].deployments) == {"Ingress", "full-v1"}
            before = len(load.answers)
            deploy(config(True))  # two hops -> one: full-v1 stays until the old ingress drained, then goes
            assert set(serve.status().applications["onehop"].deployments) == {"Ingress"}
            time.sleep(2)
        assert not load.failures, load.failures[:5]
        assert before > 5 and len(load.answers) > before + 5
    finally:
        serve.delete("onehop")


def test_retiring_a_variant_under_load_answers_it_until_the_new_ingress_takes_over(serve_port, registry, tmp_path):
    """A variant dropped from a shared deployment during a roll-out: requests for it are answered until the new
    ingress takes over and are a 404 naming it after; the variants kept, and the shared deployment they stay on,
    fail no request meanwhile."""
    from ray import serve

    app = ["serve.app_name=retire", "serve.route_prefix=/retire", f"serve.config_out={tmp_path / 'serve.yaml'}"]

    def config(models: str):
        return load_config(None, _overrides(registry, serve_port, models) + app)

    url, _ = deploy(config("[{name: lora-all}, {name: lora-top}, {name: head}]"))
    try:
        with SteadyLoad(f"{url}/v1/models/lora-top/predict") as retired, \
                SteadyLoad(f"{url}/v1/models/lora-all/predict") as kept:
            time.sleep(1)
            deploy(config("[{name: lora-all}, {name: head}]"))
            time.sleep(2)
        assert not kept.failures, kept.failures[:5]
        assert retired.answers and set(retired.failures) <= {404}, (len(retired.answers), retired.failures[:5])
        gone = requests.post(f"{url}/v1/models/lora-top/predict", json={"inputs": TEXTS}, timeout=30)
        assert gone.status_code == 404 and "lora-top" in gone.json()["error"]
        r = requests.post(f"{url}/v1/models/lora-all/predict", json={"inputs": TEXTS, "top_k": 2}, timeout=60)
        same_predictions(r.json()["predictions"], _offline(registry, "lora-all"))
    finally:
        serve.delete("retire")


def test_a_version_whose_replicas_cannot_start_fails_the_deploy_and_the_previous_one_keeps_serving(
        serve_port, registry, tmp_path):
    """A registry version that passes the deploy's checks but cannot load in a replica (here its weights were cut
    short before it was promoted, so its manifest agrees; on object storage, any same-size change): the deploy
    fails naming the version and the loader's error, no request fails meanwhile, and the application serves what
    it served before. Two hops: the new ingress would otherwise route to a model deployment that never started
    (before this, every request answered 503 until the next deploy); one hop, Serve keeps the old ingress itself."""
    import shutil

    from ray import serve

    store = ModelStore(str(tmp_path / "registry"))
    store.promote(registry.get("full").path, "m", {})
    broken = Path(shutil.copytree(registry.get("full").path, tmp_path / "broken"))
    weights = next((broken / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    (broken / "lineage.json").unlink()
    store.promote(str(broken), "m", {})
    app = ["serve.app_name=rollback", "serve.route_prefix=/rollback", f"serve.config_out={tmp_path / 'serve.yaml'}"]

    def config(models: str):
        return load_config(None, _overrides(store, serve_port, models, serve__one_hop=False) + app)

    url, _ = deploy(config("[{name: m, versions: [{version: 1}]}]"))
    try:
        with SteadyLoad(f"{url}/v1/models/m/predict") as load:
            time.sleep(1)
            with pytest.raises(ValueError, match=r"the new application did not start: deployment m-v2: "
                                                 r"[\w.]+Error: (?!Traceback).*The application serves what it served before the "
                                                 r"deploy \(m:1\)"):
                deploy(config("[{name: m}]"))
        assert not load.failures, load.failures[:5]
        assert len(load.answers) > 5 and {a["version"] for a in load.answers} == {1}
        assert serve.status().applications["rollback"].status == "RUNNING"
        assert requests.get(f"{url}/readyz", timeout=30).json()["models"] == ["m:1"]
    finally:
        serve.delete("rollback")


def test_the_removed_batch_wait_key_says_why():
    with pytest.raises(ValueError, match=r"serve.batch_wait_timeout_s was removed: batching no longer waits"):
        load_config(None, ["data.train=unused", "serve.batch_wait_timeout_s=0.01"])
