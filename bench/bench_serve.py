"""Serving benchmark: dynamic batching vs none at the same concurrency, and Serve's added latency.

    .venv/bin/python bench/bench_serve.py [--model minilm-l6] [--requests 240] [--concurrency 16]

Deploys the same artifact twice on one local Serve (max_batch_size 16 vs 1, one replica each) and
sends the same single-input requests from ``--concurrency`` client threads; then compares one request
at a time over HTTP with calling the model in-process. All numbers come from this one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from ptm_ray.checkpoint import load_artifact, save_checkpoint
from ptm_ray.inference import predict
from ptm_ray.config import load_config
from ptm_ray.model_store import ModelStore
from ptm_ray.models import resolve_model

TEXTS = ["where is my order #48213", "I want my money back for the kettle", "cancel my order please",
         "the router won't turn on", "why was I charged twice", "do you have the blender in black"]


def make_artifact(root: Path, model: str) -> ModelStore:
    cfg = load_config(None, [f"model.name={model}", "model.max_length=64", "data.train=unused"])
    family, ref = resolve_model(cfg.model)
    labels = ["billing", "cancel_order", "order_status", "refund"]
    net = family.build(ref, labels, cfg.model, "classifier").eval()
    path = save_checkpoint(root / "ckpt", family=family, model=net, preprocessor=family.preprocessor(ref, net, cfg),
                           cfg=cfg, labels=labels, metrics={"epoch": 0}, history=[])
    registry = ModelStore(str(root / "registry"))
    registry.promote(str(path), "bench", {"note": "benchmark artifact"})
    return registry


def load(url: str, n: int, concurrency: int) -> tuple[float, list[float]]:
    def one(i: int) -> float:
        started = time.perf_counter()
        r = requests.post(url, json={"inputs": [TEXTS[i % len(TEXTS)]]}, timeout=120)
        r.raise_for_status()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(n)))
    return n / (time.perf_counter() - started), latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ray import serve

    from ptm_ray.runtime import init_ray
    from ptm_ray.serve import app_args, build_app

    root = Path(tempfile.mkdtemp(prefix="ptm_ray_bench_serve_"))
    registry = make_artifact(root, args.model)
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    urls = {}
    for label, batch in (("batched", 16), ("unbatched", 1)):
        cfg = load_config(None, ["model.name=minilm-l6", "data.train=unused", f"serve.registry={registry.root}",
                                 "serve.models=[{name: bench}]", f"serve.max_batch_size={batch}",
                                 "serve.batch_wait_timeout_s=0.005", "serve.min_replicas=1", "serve.max_replicas=1",
                                 "serve.num_cpus=0.5", f"serve.max_items={args.concurrency}"])
        serve.run(build_app(app_args(cfg)), name=label, route_prefix=f"/{label}")
        urls[label] = f"http://127.0.0.1:{args.port}/{label}/v1/models/bench/predict"
        load(urls[label], 16, 4)  # warm-up

    results = {label: load(url, args.requests, args.concurrency) for label, url in urls.items()}
    _, serial = load(urls["batched"], 40, 1)
    artifact = load_artifact(registry.get("bench").path)
    direct = []
    for i in range(40):
        started = time.perf_counter()
        predict(artifact, [TEXTS[i % len(TEXTS)]])
        direct.append(time.perf_counter() - started)
    serve.shutdown()

    print(f"\n== Serve benchmark: {args.model}, {args.requests} single-input requests, {args.concurrency} client threads")
    print(f"{'':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for label, (rps, lat) in results.items():
        print(f"{label:<10} {rps:>8.1f} {pct(lat, 50):>8.1f} {pct(lat, 99):>8.1f}")
    (b_rps, b_lat), (u_rps, u_lat) = results["batched"], results["unbatched"]
    print(f"batching: throughput x{b_rps / u_rps:.2f}, p50 latency x{pct(b_lat, 50) / pct(u_lat, 50):.2f}, "
          f"p99 latency x{pct(b_lat, 99) / pct(u_lat, 99):.2f}")
    http, local = statistics.median(serial) * 1000, statistics.median(direct) * 1000
    print(f"one request at a time: over Serve {http:.1f} ms vs direct call {local:.1f} ms "
          f"(Serve adds {http - local:.1f} ms, x{http / local:.2f})")


if __name__ == "__main__":
    main()
