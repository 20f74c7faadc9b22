"""Ray Serve over real HTTP: predictions equal offline ones, bad input is a 4xx, canary, auth, autoscaling, roll-out."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile
from PIL import Image

from ptm_ray.checkpoint import load_artifact, save_checkpoint
from ptm_ray.config import load_config
from ptm_ray.inference import predict
from ptm_ray.model_store import ModelStore
from ptm_ray.models import resolve_model
from ptm_ray.serve import app_args, build_app, deploy

from conftest import SteadyLoad, free_port, png_header, same_predictions

INTENTS = ["billing", "cancel_order", "refund"]


def _artifact(root: Path, name: str, overrides: list[str], labels: list[str], seed: int) -> str:
    import torch

    cfg = load_config(None, ["data.train=unused", *overrides])
    family, ref = resolve_model(cfg.model)
    torch.manual_seed(seed)
    model = family.build(ref, labels, cfg.model, "classifier").eval()
    path = root / f"{name}-{seed}"
    save_checkpoint(path, family=family, model=model, preprocessor=family.preprocessor(ref, model, cfg), cfg=cfg,
                    labels=labels, metrics={"epoch": 1, "val_accuracy": 0.5 + seed / 100}, history=[])
    return str(path)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_text, tiny_audio) -> ModelStore:
    """Registry with intents v1 and v2 (tiny BERT), digits v1 (tiny ResNet) and commands v1 (tiny wav2vec 2.0)."""
    root = tmp_path_factory.mktemp("artifacts")
    reg = ModelStore(str(root / "registry"))
    text = [f"model.name=hf:{tiny_text['bert']}", "model.max_length=16"]
    for seed in (1, 2):
        reg.promote(_artifact(root, "intents", text, INTENTS, seed), "intents", {"note": f"seed {seed}"})
    image = ["model.name=timm:test_resnet", "model.weights=none", "data.image_size=32"]
    reg.promote(_artifact(root, "digits", image, [str(i) for i in range(10)], 1), "digits", {})
    audio = [f"model.name=hf:{tiny_audio['wav2vec2']}", "data.max_seconds=0.5"]
    reg.promote(_artifact(root, "commands", audio, ["go", "stop"], 1), "commands", {})
    return reg


def _serve_overrides(reg, port, models, **extra):
    values = {"serve.registry": reg.root, "serve.port": port, "serve.models": models, "serve.num_cpus": 0.1,
              "serve.max_items": 8, "serve.max_body_bytes": 200_000, "serve.upscale_delay_s": 1,
              "serve.downscale_delay_s": 4, "serve.look_back_period_s": 5, "serve.target_ongoing_requests": 1,
              "serve.max_replicas": 2, "model.name": "minilm-l6"}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return ["data.train=unused"] + [f"{k}={v}" for k, v in values.items()]


MODELS = ("[{name: intents, versions: [{version: 1, weight: 50}, {version: 2, weight: 50}]}, "
          "{name: digits}, {name: commands}]")


@pytest.fixture(scope="module")
def api(ray_cluster, registry, tmp_path_factory):
    from ray import serve

    port = free_port()
    out = tmp_path_factory.mktemp("serve") / "serve_config.yaml"
    cfg = load_config(None, _serve_overrides(registry, port, MODELS, serve__config_out=str(out)))
    url, config_path = deploy(cfg)
    yield url, config_path, cfg
    serve.shutdown()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _wav(seconds: float, rate: int = 22050) -> bytes:
    buffer = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(buffer, np.sin(2 * np.pi * 300 * t).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_listing_health_and_openapi(api):
    url, config_path, _ = api
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    models = {m["name"]: m for m in requests.get(f"{url}/v1/models", timeout=10).json()["models"]}
    assert set(models) == {"intents", "digits", "commands"}
    assert [v["version"] for v in models["intents"]["versions"]] == [1, 2]
    assert models["intents"]["versions"][0]["labels"] == INTENTS
    assert models["digits"]["versions"][0]["modality"] == "image"
    detail = requests.get(f"{url}/v1/models/intents", timeout=10).json()
    assert detail["versions"][1]["metrics"]["val_accuracy"] == pytest.approx(0.52)
    assert detail["versions"][1]["lineage"]["note"] == "seed 2"
    assert "files" not in detail["versions"][1]["lineage"]  # the registry's manifest of hashes stays internal
    paths = requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    assert "/v1/models/{name}/predict" in paths and "/v1/models/{name}/versions/{version}/predict" in paths
    text = Path(config_path).read_text()
    assert "import_path: ptm_ray.serve:build_app" in text and "intents" in text


# the content types a browser accepts for each asset (Python's mimetypes says application/javascript before 3.12)
_ASSET_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",), ".png": ("image/png",),
                ".json": ("application/json",)}


def _page_references(html: str) -> list[str]:
    """Every URL an HTML page loads: src/href attributes, Swagger UI's spec url, ReDoc's spec-url."""
    return re.findall(r'(?:src|href|spec-url)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_load_only_assets_the_app_serves(api, page):
    url = api[0]
    response = requests.get(f"{url}{page}", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    references = _page_references(response.text)
    assert "/openapi.json" in references and len(references) >= 3, references  # the spec, a script, an icon
    assert "://" not in response.text and all(r.startswith("/") and not r.startswith("//") for r in references)
    for ref in references:
        asset = requests.get(f"{url}{ref}", timeout=10)
        assert asset.status_code == 200, ref
        suffix = Path(ref).suffix
        assert asset.headers["content-type"].split(";")[0] in _ASSET_TYPES[suffix], (ref, asset.headers["content-type"])
        assert len(asset.content) > (100_000 if suffix == ".js" else 500), ref  # the real bundle, not a stub


def _chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium that can reach 127.0.0.1 only: every other host name fails to resolve (no internet)."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if browser is None:
        pytest.skip("Chromium is not installed: it renders /docs as a browser would. Install the Debian package "
                    "chromium (`sudo apt-get install chromium`)")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--virtual-time-budget=20000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def test_docs_page_renders_the_api_in_headless_chromium_without_internet(api, tmp_path):
    url = api[0]
    dom = _chromium("--dump-dom", f"{url}/docs").stdout
    shown = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    assert {"/v1/models", "/v1/models/{name}/predict", "/v1/models/{name}/versions/{version}/predict"} <= shown, dom[-2000:]
    assert "Failed to load API definition" not in dom
    shot = tmp_path / "docs.png"
    _chromium("--window-size=1280,1000", f"--screenshot={shot}", f"{url}/docs")
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1000, 1280)
    assert (pixels < 200).mean() > 0.02  # text and coloured operation bars, not a blank page


def test_served_predictions_equal_offline(api, registry, digits_dir, speech_dir):
    url, _, _ = api
    texts = ["refund my blender please", "cancel order #12345", "why was I charged twice"]
    served = requests.post(f"{url}/v1/models/intents/versions/2/predict", json={"inputs": texts, "top_k": 2}, timeout=30)
    assert served.status_code == 200 and served.json()["version"] == 2
    same_predictions(served.json()["predictions"], predict(load_artifact(registry.get("intents", 2).path), texts, top_k=2))

    images = [next(Path(digits_dir, d).glob("*.png")).read_bytes() for d in ("3", "8")]
    offline = predict(load_artifact(registry.get("digits").path), images, top_k=3)
    as_json = requests.post(f"{url}/v1/models/digits/predict", json={"inputs": [_b64(b) for b in images]}, timeout=30)
    assert as_json.status_code == 200
    same_predictions(as_json.json()["predictions"], offline)
    multipart = requests.post(f"{url}/v1/models/digits/predict", files=[("files", ("a.png", images[0])),
                                                                         ("files", ("b.png", images[1]))], timeout=30)
    assert multipart.status_code == 200
    same_predictions(multipart.json()["predictions"], offline)

    clips = [next(Path(speech_dir, w).glob("*.wav")).read_bytes() for w in ("go", "stop")]
    served = requests.post(f"{url}/v1/models/commands/predict", json={"inputs": [_b64(c) for c in clips]}, timeout=30)
    assert served.status_code == 200
    same_predictions(served.json()["predictions"], predict(load_artifact(registry.get("commands").path), clips, top_k=3))


@pytest.mark.parametrize("path, kwargs, status, message", [
    ("intents/predict", {"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400, "invalid request body"),
    ("intents/predict", {"json": {"texts": ["hi"]}}, 422, "inputs: Field required"),
    ("intents/predict", {"json": {"inputs": [1, 2]}}, 422, "inputs.0: Input should be a valid string"),
    ("intents/predict", {"json": {"inputs": "hello"}}, 422, "inputs: Input should be a valid array"),
    ("intents/predict", {"json": {"inputs": []}}, 422, "inputs: List should have at least 1 item"),
    ("intents/predict", {"json": {"inputs": ["hi"] * 9}}, 413, "9 inputs exceed the limit of 8"),
    ("intents/predict", {"json": {"inputs": ["x" * 300_000]}}, 413, "exceeds the limit of 200000"),
    ("intents/predict", {"json": {"inputs": ["hi"], "top_k": 0}}, 422, "top_k"),
    ("digits/predict", {"json": {"inputs": [base64.b64encode(b"not an image").decode()]}}, 422,
     "inputs[0]: not decodable as an image"),
    ("digits/predict", {"json": {"inputs": ["%%%not base64"]}}, 422, "inputs[0] is not valid base64"),
    ("digits/predict", {"files": [("other", ("a.png", b"x"))]}, 422, "parts named 'files'"),
    ("commands/predict", {"json": {"inputs": [base64.b64encode(b"RIFFjunkWAVE").decode()]}}, 422,
     "inputs[0]: not decodable as audio"),
    ("digits/predict", {"json": {"inputs": [base64.b64encode(png_header(20_000, 20_000)).decode()]}}, 413,
     "inputs[0]: image exceeds the limit of 25000000 pixels"),
    ("digits/predict", {"files": [("files", ("bomb.png", png_header(12_000, 9_000)))]}, 413,
     "inputs[0]: image of 12000x9000 = 108000000 pixels exceeds the limit"),
    ("digits/predict", {"files": [("files", (f"{i}.png", b"x")) for i in range(1_000)]}, 413, "Too many files"),
    ("digits/predict", {"data": (b"x" * 10_000 for _ in range(30)), "headers": {"Content-Type": "application/json"}},
     413, "request body exceeds the limit of 200000 bytes"),
    ("nope/predict", {"json": {"inputs": ["hi"]}}, 404, "unknown model 'nope'"),
    ("intents/versions/7/predict", {"json": {"inputs": ["hi"]}}, 404, "has no deployed version '7'"),
])
def test_bad_input_is_a_4xx_json_error_and_the_replica_survives(api, path, kwargs, status, message):
    url, _, _ = api
    response = requests.post(f"{url}/v1/models/{path}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    route = "/v1/models/{name}/versions/{version}/predict" if "/versions/" in path else "/v1/models/{name}/predict"
    documented = requests.get(f"{url}/openapi.json", timeout=10).json()["paths"][route]["post"]["responses"]
    assert documented[str(status)]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    ok = requests.post(f"{url}/v1/models/intents/predict", json={"inputs": ["refund please"]}, timeout=30)
    assert ok.status_code == 200


def test_long_text_is_truncated_and_says_so(api):
    url, _, _ = api
    long = " ".join(["refund"] * 100)
    body = requests.post(f"{url}/v1/models/intents/predict", json={"inputs": [long, "refund"]}, timeout=30).json()
    first, second = body["predictions"]
    assert first["truncated"] is True and "truncated" in first["warning"]
    assert "truncated" not in second


def test_readiness_names_every_model_and_a_second_bind_is_refused(api, registry):
    url, _, cfg = api
    ready = requests.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 200
    models = ["commands:1", "digits:1", "intents:1", "intents:2"]
    # each version says the device its replica runs it on (serve.num_gpus=0 here: the CPU)
    assert ready.json() == {"status": "ready", "models": models, "devices": {key: "cpu" for key in models}}
    elsewhere = load_config(None, _serve_overrides(registry, free_port(), MODELS))
    with pytest.raises(ValueError, match=rf"already running with its HTTP proxy on 127.0.0.1:{cfg.serve.port}, but "
                                         rf"serve.host/serve.port ask for 127.0.0.1:{elsewhere.serve.port}"):
        deploy(elsewhere)
    assert requests.post(f"{url}/v1/models/intents/predict", json={"inputs": ["hi"]}, timeout=30).status_code == 200


def test_a_damaged_version_is_refused_and_the_deployed_ones_keep_serving(api, tiny_text, tmp_path):
    url, _, cfg = api
    damaged = ModelStore(str(tmp_path / "registry"))
    text = [f"model.name=hf:{tiny_text['bert']}", "model.max_length=16"]
    found = damaged.promote(_artifact(tmp_path, "intents", text, INTENTS, 3), "intents", {})
    weights = next(Path(found.path, "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights: the file still loads, with a wrong number in it
    weights.write_bytes(bytes(data))
    ready = requests.get(f"{url}/readyz", timeout=30).json()
    with pytest.raises(ValueError, match=rf"model 'intents' version 1 in the registry {re.escape(damaged.root)} is "
                                         rf"incomplete or corrupt: model/{weights.name} does not match its sha256"):
        deploy(load_config(None, _serve_overrides(damaged, cfg.serve.port, "[{name: intents}]")))
    assert requests.get(f"{url}/readyz", timeout=30).json() == ready  # nothing deployed changed
    assert requests.post(f"{url}/v1/models/intents/predict", json={"inputs": ["refund"]}, timeout=30).status_code == 200


def test_huge_text_is_cut_by_characters_before_tokenizing(api):
    url, _, _ = api
    body = requests.post(f"{url}/v1/models/intents/predict", json={"inputs": ["refund " * 25_000]}, timeout=30)
    assert body.status_code == 200, body.text
    (prediction,) = body.json()["predictions"]
    assert prediction["truncated"] is True
    assert "input of 175000 characters was cut to the first 20000" in prediction["warning"]


def test_audio_declaring_an_odd_sample_rate_is_answered_not_resampled_for_minutes(api):
    url, _, _ = api
    clip = io.BytesIO()
    soundfile.write(clip, np.zeros(1, dtype="float32"), 44_099, format="WAV")  # 46 bytes, one sample
    # before: torchaudio built a 44,099 x 16,000 resampling kernel and the request took ~2 minutes
    response = requests.post(f"{url}/v1/models/commands/predict", json={"inputs": [_b64(clip.getvalue())]}, timeout=30)
    assert response.status_code == 200, response.text
    assert {p["label"] for p in response.json()["predictions"][0]["top_k"]} == {"go", "stop"}


def test_canary_split_is_visible_in_the_version_field(api):
    url, _, _ = api
    versions = [requests.post(f"{url}/v1/models/intents/predict", json={"inputs": ["hi"]}, timeout=30).json()["version"]
                for _ in range(40)]
    assert set(versions) == {1, 2}  # 50/50 weights: both serve traffic
    assert 5 <= versions.count(2) <= 35


def test_api_key_guards_every_route_but_health(api, registry, tmp_path):
    from ray import serve

    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    _, _, cfg = api
    # and a 90/10 canary (the module's shared app splits 50/50): the split must follow the weights
    canary = "[{name: intents, versions: [{version: 1, weight: 90}, {version: 2, weight: 10}]}]"
    guarded = load_config(None, _serve_overrides(registry, cfg.serve.port, canary,
                                                 serve__api_key_file=str(key_file), serve__app_name="guarded",
                                                 serve__route_prefix="/guarded"))
    serve.run(build_app(app_args(guarded)), name="guarded", route_prefix="/guarded")
    try:
        base = f"http://127.0.0.1:{cfg.serve.port}/guarded"
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
        assert requests.get(f"{base}/v1/models", timeout=10).status_code == 401
        # bug guarded: a route added without the check (readiness names the deployed models)
        for route in ("/readyz", "/v1/models/intents"):
            assert requests.get(f"{base}{route}", timeout=10).status_code == 401, route
        assert requests.post(f"{base}/v1/models/intents/versions/1/predict", json={"inputs": ["hi"]},
                             timeout=10).status_code == 401
        assert requests.get(f"{base}/readyz", headers={"Authorization": "Bearer s3cret"}, timeout=30).status_code == 200
        wrong = requests.post(f"{base}/v1/models/intents/predict", json={"inputs": ["hi"]},
                              headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
        right = requests.post(f"{base}/v1/models/intents/predict", json={"inputs": ["hi"]},
                              headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert right.status_code == 200
        # 100 requests at 10 %: v2 answers 1..25 of them with probability > 0.9999 (binomial); an ingress that
        # ignores the weights (uniform choice: about 50) or sends everything to one version fails
        versions = [requests.post(f"{base}/v1/models/intents/predict", json={"inputs": ["hi"]}, timeout=30,
                                  headers={"Authorization": "Bearer s3cret"}).json()["version"] for _ in range(100)]
        assert 1 <= versions.count(2) <= 25 and versions.count(1) + versions.count(2) == 100, versions
        # the docs pages are open (as health) and, under a route prefix, load their assets through it
        references = _page_references(requests.get(f"{base}/docs", timeout=10).text)
        assert references and all(r.startswith("/guarded/") for r in references), references
        assert all(requests.get(f"http://127.0.0.1:{cfg.serve.port}{r}", timeout=10).status_code == 200 for r in references)
    finally:
        serve.delete("guarded")


def _replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return sum(status.replica_states.values()) if status.replica_states else 0


def test_burst_scales_up_then_back_down(api):
    url, _, cfg = api
    assert _replicas(cfg.serve.app_name, "digits-v1") == 1
    image = _b64(_png((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)))
    stop = time.time() + 60
    peak = 1

    def hammer():
        while time.time() < stop:
            requests.post(f"{url}/v1/models/digits/predict", json={"inputs": [image] * 8}, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(hammer) for _ in range(8)]
        while time.time() < stop and peak < 2:
            peak = max(peak, _replicas(cfg.serve.app_name, "digits-v1"))
            time.sleep(0.5)
        stop = time.time()
        for f in futures:
            f.result()
    assert peak == 2, "a burst of concurrent requests did not add a replica"
    deadline = time.time() + 90
    while time.time() < deadline and _replicas(cfg.serve.app_name, "digits-v1") > 1:
        time.sleep(1)
    assert _replicas(cfg.serve.app_name, "digits-v1") == 1, "the replica count did not come back down"


def _replica_ids(app: str, deployment: str) -> set[str]:
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"),
                                                     ("state", "=", "ALIVE")])}


def test_rolling_out_a_new_version_fails_no_request(api, registry, tmp_path):
    from ray import serve

    url, _, cfg = api
    only_v2 = "[{name: intents, versions: [{version: 2, weight: 100}]}, {name: digits}, {name: commands}]"
    unchanged = {name: _replica_ids(cfg.serve.app_name, name) for name in ("digits-v1", "commands-v1", "intents-v2")}
    assert all(unchanged.values()), unchanged
    try:
        with SteadyLoad(f"{url}/v1/models/intents/predict") as load:
            time.sleep(2)
            deploy(load_config(None, _serve_overrides(registry, cfg.serve.port, only_v2,
                                                      serve__config_out=str(tmp_path / "serve_config.yaml"))))
            time.sleep(3)
        assert not load.failures, load.failures[:5]
        assert len(load.answers) > 10
        last = requests.post(f"{url}/v1/models/intents/predict", json={"inputs": ["refund"]}, timeout=30).json()
        assert last["version"] == 2
        assert {d for d in serve.status().applications[cfg.serve.app_name].deployments} >= {"intents-v2"}
        assert "intents-v1" not in serve.status().applications[cfg.serve.app_name].deployments  # retired
        # the versions the roll-out did not change kept their replicas: nothing reloaded them (a restart replaces
        # every replica; autoscaling may have added or, down to one, removed some meanwhile)
        for name, before in unchanged.items():
            assert before & _replica_ids(cfg.serve.app_name, name), name
    finally:
        deploy(cfg)  # the module's other tests expect the 50/50 canary, whatever order they run in
