"""Reliability benchmark: hostile requests and dying processes against a real local Ray Serve.

    .venv/bin/python bench/chaos.py [--seconds 40] [--threads 8] [--with-training]

Deploys three small models (a text classifier: MiniLM-L6, an image classifier: timm's test_resnet, an
audio classifier: a tiny wav2vec 2.0) with the availability settings of the shipped serve config (two
ingress replicas, two replicas per model), then measures:

  R3  steady load from ``--threads`` clients while one model replica and then one ingress replica are
      SIGKILLed: the share of requests answered 200.
  R5  bombs: a 20,000 x 20,000 PNG of a few dozen bytes, a 12,000 x 9,000 PNG, a one-sample WAV declaring
      44,099 Hz, a 9 MB string, a 300 MB chunked body, 2,000 multipart parts; each must be answered (4xx, or
      200 for the WAV, which is valid audio) within 1 s, and the replicas' RSS must grow by < 100 MB.
  R6  security defaults read from the shipped configs and the code paths: loopback bind, Ray token auth,
      a key required beyond loopback, no pickle loads of artifacts, no remote code by default.

  R1  (--with-training) a two-worker fine-tune of a tiny BERT on the bundled intents, once undisturbed and once with a Train
      worker SIGKILLed after the first checkpoint (scaling.max_failures=1): it must finish every epoch with a
      best score within 1 point of the undisturbed run.
  R2  (--with-training) a search driver (jobs/search.py, three one-worker trials one at a time) SIGKILLed once a trial has
      finished, then run again: it must restore and leave the finished trials untouched.

  R4  schemathesis over the live OpenAPI schema (every check, at least ``--cases`` generated cases): the
      number of cases answered 5xx and of statuses the schema does not document must both be 0; what the
      other checks found is printed beside them.

The last line: ``chaos: R1=... R2=... R3=<pct> R4=... R5=<worst seconds> R6=<ok|fail>``.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import requests
import soundfile

from ptm_ray.checkpoint import save_checkpoint
from ptm_ray.config import load_config
from ptm_ray.model_store import ModelStore
from ptm_ray.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]


def _artifact(root: Path, store: ModelStore, name: str, overrides: list[str], labels: list[str]) -> None:
    cfg = load_config(None, ["data.train=unused", *overrides])
    family, ref = resolve_model(cfg.model)
    model = family.build(ref, labels, cfg.model, "classifier").eval()
    path = save_checkpoint(root / name, family=family, model=model, preprocessor=family.preprocessor(ref, model, cfg),
                           cfg=cfg, labels=labels, metrics={"epoch": 0}, history=[])
    store.promote(str(path), name, {"note": "chaos benchmark"})


MODELS = ("intents", "digits", "commands")


def _deploy(root: Path) -> str:
    from ptm_ray.serve import deploy
    from ptm_ray.tiny import make_tiny_audio_model

    store = ModelStore(str(root / "registry"))
    _artifact(root, store, "intents", ["model.name=minilm-l6", "model.max_length=64"], ["billing", "refund"])
    _artifact(root, store, "digits", ["model.name=timm:test_resnet", "model.weights=none", "data.image_size=32"],
              [str(i) for i in range(10)])
    audio = make_tiny_audio_model("wav2vec2", root / "wav2vec2")
    _artifact(root, store, "commands", [f"model.name=hf:{audio}", "data.max_seconds=0.5"], ["go", "stop"])
    cfg = load_config(ROOT / "ptm_ray" / "configs" / "serve.yaml", [
        f"serve.registry={store.root}", "serve.models=[{name: intents}, {name: digits}, {name: commands}]",
        "serve.num_cpus=0.1", f"serve.config_out={root / 'serve_config.yaml'}", "serve.upscale_delay_s=600"])
    url, _ = deploy(cfg)
    return url


def _replica_pids(deployment: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in actors if a.class_name == f"ServeReplica:ptm_ray:{deployment}"]


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def r3_kills(url: str, seconds: float, threads: int) -> tuple[int, int, list]:
    """(answered, sent, failures) under steady load while a model replica, then an ingress replica, is killed."""
    stop, lock = time.time() + seconds, threading.Lock()
    sent, answered, failures = [0], [0], []

    def client() -> None:
        while time.time() < stop:
            try:
                status = requests.post(f"{url}/v1/models/intents/predict", json={"inputs": ["refund me"]},
                                       timeout=30).status_code
            except requests.RequestException as e:
                status = type(e).__name__
            with lock:
                sent[0] += 1
                answered[0] += status == 200
                if status != 200:
                    failures.append((status, round(time.time() - (stop - seconds), 1)))

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    for deployment, at in (("intents-v1", seconds / 3), ("Ingress", 2 * seconds / 3)):
        time.sleep(max(0.0, stop - seconds + at - time.time()))
        pids = _replica_pids(deployment)
        os.kill(pids[0], signal.SIGKILL)  # one replica of this benchmark's own Serve app
        print(f"  t={time.time() - (stop - seconds):.1f} s: killed a {deployment} replica (pid {pids[0]}; "
              f"{len(pids)} were running)")
    for w in workers:
        w.join()
    return answered[0], sent[0], failures


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b""))


def _bombs() -> dict[str, tuple[str, dict]]:
    wav = io.BytesIO()
    soundfile.write(wav, np.zeros(1, dtype="float32"), 44_099, format="WAV")
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    return {
        "png 20000x20000": ("digits", {"json": {"inputs": [b64(_png_header(20_000, 20_000))]}}),
        "png 12000x9000": ("digits", {"json": {"inputs": [b64(_png_header(12_000, 9_000))]}}),
        "wav 1 sample at 44099 Hz": ("commands", {"json": {"inputs": [b64(wav.getvalue())]}}),
        "9 MB string": ("intents", {"json": {"inputs": ["x" * 9_000_000]}}),
        "300 MB chunked body": ("intents", {"data": (b"x" * 1_000_000 for _ in range(300)),
                                            "headers": {"Content-Type": "application/json"}}),
        "2000 multipart parts": ("digits", {"files": [("files", (f"{i}.png", b"x")) for i in range(2_000)]}),
    }


def r5_bombs(url: str) -> float:
    deployments = ("intents-v1", "digits-v1", "commands-v1", "Ingress")
    pids = {d: _replica_pids(d) for d in deployments}
    before = {d: _rss_mb(p) for d, p in pids.items()}
    worst = 0.0
    for name, (model, kwargs) in _bombs().items():
        started = time.perf_counter()
        try:
            response = requests.post(f"{url}/v1/models/{model}/predict", timeout=120, **kwargs)
            outcome = f"{response.status_code} {response.json().get('error', 'ok')[:90]}"
        except requests.RequestException as e:  # the server may close a 300 MB upload early: that is a refusal too
            outcome = f"connection closed by the server ({type(e).__name__})"
        seconds = time.perf_counter() - started
        worst = max(worst, seconds)
        print(f"  {name:26s} {seconds:6.2f} s  {outcome}")
    growth = {d: _rss_mb(p) - before[d] for d, p in pids.items()}
    print("  RSS growth per deployment (all its replicas): " + ", ".join(f"{d} {g:+.0f} MB" for d, g in growth.items()))
    return worst if max(growth.values()) < 100 else float("inf")


def r4_schemathesis(url: str, cases: int, out: Path, models: tuple[str, ...]) -> int:
    """Cases answered 5xx (or errored) by schemathesis over the live schema with every check; prints every
    check's findings and the count of statuses the schema does not document.

    Model names and versions in paths are drawn mostly from what is deployed (``models``, each at version 1;
    a random name only ever reaches the 404), so the fuzzed bodies reach the tokenizer, the image decoder and
    the audio decoder."""
    import json
    import subprocess
    import sys

    report, config = out / "schemathesis.json", out / "schemathesis.toml"
    config.write_text(f"[dictionaries.models]\nvalues = {json.dumps(list(models))}\n\n"
                      "[dictionaries.versions]\nvalues = [1]\n\n[parameters]\n"
                      '"path.name" = { dictionary = "models", probability = 0.9 }\n'
                      '"path.version" = { dictionary = "versions", probability = 0.9 }\n')
    schemathesis = Path(sys.executable).with_name("schemathesis")
    generated = 0
    examples = max(25, cases // 8)  # per operation and phase; raised until the run generated enough cases
    while generated < cases:
        command = [str(schemathesis), "--config-file", str(config), "run", f"{url}/openapi.json", "--checks", "all",
                   "--max-examples", str(examples), "--seed", "0", "--workers", "1", "--request-timeout", "30",
                   "--continue-on-failure", "--suppress-health-check", "all", "--report", "json",
                   "--report-json-path", str(report)]
        subprocess.run(command, cwd=out, capture_output=True, text=True, timeout=1800, check=False)  # 1: a check failed
        doc = json.loads(report.read_text())
        generated = doc["test_cases"]["generated"]
        examples *= 2
    counts = {f["type"]: f["count"] for f in doc["failures"]}
    for f in doc["failures"]:
        print(f"  {f['type']:30s} {f['count']:4d} case(s)  {f['title']}  ({', '.join(f['operations'][:3])})")
    for e in doc["errors"]:
        print(f"  error: {e['title']} ({e['count']})")
    server_errors, undocumented = counts.get("not_a_server_error", 0), counts.get("status_code_conformance", 0)
    print(f"  {generated} cases over {doc['operations']['tested']} operations, {len(doc['errors'])} error group(s): "
          f"{server_errors} answered 5xx, {undocumented} with a status the schema does not document")
    return server_errors + len(doc["errors"])


def r6_defaults() -> bool:
    from ptm_ray.config import load_config as load

    checks = {}
    serve_cfg = load(ROOT / "ptm_ray" / "configs" / "serve.yaml", [])
    checks["serve binds loopback by default"] = serve_cfg.serve.host == "127.0.0.1"
    try:
        load(None, ["data.train=x", "model.name=minilm-l6", "serve.host=0.0.0.0"])
        checks["a key is required beyond loopback"] = False
    except ValueError:
        checks["a key is required beyond loopback"] = True
    checks["no remote code by default"] = load(None, ["data.train=x", "model.name=minilm-l6"]).model.trust_remote_code is False
    lines = [line for p in (ROOT / "ptm_ray").rglob("*.py") for line in p.read_text().splitlines()]
    loads = [line for line in lines if "torch.load(" in line]
    checks["no pickle loads of artifacts"] = (not any("pickle.load" in line for line in lines)
                                              and all("weights_only=True" in line for line in loads))
    checks["Ray token auth in the cluster configs"] = "mode: token" in (ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text()
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    return all(checks.values())


def _tiny_run(root: Path, name: str, **extra: str) -> list[str]:
    from ptm_ray.datasets import bundled_path

    return [f"model.name=hf:{root / 'bert'}", "model.max_length=32", f"data.train={bundled_path('support_intents_train.csv')}",
            "data.validation=null", "data.val_fraction=0.3", "optim.lr=1e-3", "optim.scheduler=constant",
            "optim.warmup_ratio=0", "train.epochs=6", "train.batch_size=4", "train.seed=0",
            "scaling.resources_per_worker={CPU: 1}", f"storage.path={root / 'runs'}", f"storage.name={name}",
            *(f"{k}={v}" for k, v in extra.items())]


def _kill_a_train_worker(run_dir: Path, killed: list[int]) -> None:
    from ray.util.state import list_actors

    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoint_manager_snapshot.json").exists():
        time.sleep(0.2)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    if workers:
        os.kill(workers[0].pid, signal.SIGKILL)  # a worker of this benchmark's own run
        killed.append(workers[0].pid)


def r1_train_worker_kill(root: Path) -> bool:
    import csv

    from ptm_ray.datasets import bundled_path
    from ptm_ray.tiny import make_tiny_text_model
    from ptm_ray.train import fit

    with open(bundled_path("support_intents_train.csv")) as f:
        make_tiny_text_model("bert", root / "bert", [row["text"] for row in csv.DictReader(f)])
    calm = fit(load_config(None, _tiny_run(root, "calm", **{"scaling.num_workers": "2"})))
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_train_worker, args=(root / "runs" / "killed", killed))
    killer.start()
    hit = fit(load_config(None, _tiny_run(root, "killed", **{"scaling.num_workers": "2", "scaling.max_failures": "1"})))
    killer.join()
    calm_best, hit_best = calm.best_metrics["val_accuracy"], hit.best_metrics["val_accuracy"]
    epochs = [h["epoch"] for h in hit.history]
    print(f"  undisturbed best val_accuracy {calm_best:.4f}; with worker pid {killed} killed: {hit_best:.4f}, "
          f"epochs {epochs}, resumed from {max(h['resumed_from_epoch'] for h in hit.history)}")
    return bool(killed) and epochs == list(range(1, 7)) and abs(calm_best - hit_best) <= 0.01


def r2_search_driver_kill(root: Path) -> bool:
    import subprocess
    import sys

    import ray

    space = "search.space={optim.lr: {grid: [1.0e-3, 3.0e-4, 1.0e-4]}}"
    command = [sys.executable, "jobs/search.py", "--config", "jobs/configs/text_search.yaml",
               *_tiny_run(root, "unused", **{"scaling.num_workers": "1", "train.epochs": "2"}), space,
               "search.name=driver-kill", "search.scheduler=fifo", "search.max_concurrent_trials=1",
               f"search.registry={root / 'registry'}", "search.num_samples=1"]
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, RAY_AUTH_MODE="token")
    experiment = root / "runs" / "driver-kill"
    started = time.time()
    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.time() < started + 600 and driver.poll() is None and not any(
            p.read_text().count("\n") >= 2 for p in experiment.glob("*/result.json")):
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)  # our own subprocess
    driver.wait()
    finished = {p.parent.name: p.read_text() for p in experiment.glob("*/result.json") if p.read_text().count("\n") >= 2}
    restored = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    untouched = all((experiment / d / "result.json").read_text() == before for d, before in finished.items())
    print(f"  killed after {time.time() - started:.0f} s with {len(finished)} trial(s) finished; restore exit "
          f"{restored.returncode}, 'restoring search' printed: {'restoring search' in restored.stdout}, "
          f"finished trials untouched: {untouched}")
    return bool(finished) and restored.returncode == 0 and "restoring search" in restored.stdout and untouched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="length of the steady load in R3")
    parser.add_argument("--threads", type=int, default=8, help="client threads in R3")
    parser.add_argument("--cases", type=int, default=1000, help="schemathesis test cases in R4 (at least)")
    parser.add_argument("--with-training", action="store_true",
                        help="also R1 and R2 (two fine-tunes and a killed search: several more minutes)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ray import serve

    with tempfile.TemporaryDirectory() as tmp:
        url = _deploy(Path(tmp))
        try:
            print("R5 bombs:")
            r5 = r5_bombs(url)
            print(f"R4 schemathesis over {url}/openapi.json, every check:")
            r4_5xx = r4_schemathesis(url, args.cases, Path(tmp), MODELS)
            print(f"R3 {args.threads} clients for {args.seconds:g} s, one model and one ingress replica killed:")
            answered, sent, failures = r3_kills(url, args.seconds, args.threads)
            r3 = 100.0 * answered / max(sent, 1)
            print(f"  answered {answered} of {sent} ({r3:.2f} %); failures (status, t): {failures[:10]}")
        finally:
            serve.shutdown()
    r1 = r2 = None
    if args.with_training:
        with tempfile.TemporaryDirectory() as tmp:
            print("R1 a Train worker killed mid-run:")
            r1 = r1_train_worker_kill(Path(tmp))
            print("R2 a search driver killed mid-search:")
            r2 = r2_search_driver_kill(Path(tmp))
    print("R6 security defaults:")
    r6 = r6_defaults()
    ok = {True: "ok", False: "fail", None: "not-run"}
    print(f"chaos: R1={ok[r1]} R2={ok[r2]} R3={r3:.2f} R4={r4_5xx} R5={r5:.2f} R6={ok[r6]}")


if __name__ == "__main__":
    main()
