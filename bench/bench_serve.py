"""Serving benchmark: Serve's added latency, batching vs none, and LoRA variants multiplexed on one replica.

    .venv/bin/python bench/bench_serve.py [--model minilm-l6] [--requests 320] [--concurrency 16]

All numbers come from this one run, on one local Serve, one replica per deployment:

(a) one request at a time over HTTP (one hop: the proxy, then the replica that holds the model) vs calling
    the model in this process with the replica's thread count; reported as the difference of the medians;
(b) the same single-input requests from ``--concurrency`` client threads (each with its own keep-alive
    connection, as a client pool has) to the model deployed with ``serve.max_batch_size`` 16 and 1;
(c) 8 LoRA variants of the model (distinct adapters and heads) served from one multiplexed replica: its
    resident memory vs a replica holding the plain model, and the median latency of requests spread over the
    8 variants vs all sent to one variant, at the same concurrency.

The last line is machine-readable:
``serve: overhead_ms=<ms> batching_x=<x> multiplex_mem_x=<x> multiplex_p50_x=<x>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from _scratch import scratch_dir  # bench/_scratch.py: the run's folder, removed at exit
from ptm_ray.checkpoint import load_artifact, save_checkpoint
from ptm_ray.config import load_config
from ptm_ray.inference import predict
from ptm_ray.model_store import ModelStore
from ptm_ray.models import resolve_model

TEXTS = ["where is my order #48213", "I want my money back for the kettle", "cancel my order please",
         "the router won't turn on", "why was I charged twice", "do you have the blender in black"]
LABELS = ["billing", "cancel_order", "order_status", "refund"]
VARIANTS = 8


def make_artifact(root: Path, model: str, registry: ModelStore) -> None:
    """The plain model (a full fine-tune's layout) promoted as ``bench``."""
    cfg = load_config(None, [f"model.name={model}", "model.max_length=64", "data.train=unused"])
    family, ref = resolve_model(cfg.model)
    net = family.build(ref, LABELS, cfg.model, "classifier").eval()
    path = save_checkpoint(root / "ckpt", family=family, model=net, preprocessor=family.preprocessor(ref, net, cfg),
                           cfg=cfg, labels=LABELS, metrics={"epoch": 0}, history=[])
    registry.promote(str(path), "bench", {"note": "benchmark artifact"})


def make_variants(root: Path, model: str, registry: ModelStore) -> None:
    """``VARIANTS`` LoRA fine-tunes of the model (r=8 on every layer above the embeddings, random adapters and
    heads, label counts 2..9), written as a LoRA run writes them, promoted as ``lora0``..``lora7``."""
    from ptm_ray.tiny import make_lora_variant

    for i in range(VARIANTS):
        path = make_lora_variant(root / f"lora{i}", [f"model.name={model}", "model.max_length=64", "model.lora.r=8",
                                                      "model.freeze_depth=1"], [f"intent_{j}" for j in range(2 + i)], i)
        registry.promote(str(path), f"lora{i}", {"note": "benchmark LoRA variant"})


def load(urls: list[str], n: int, concurrency: int) -> tuple[float, list[float]]:
    """(requests per second, latencies in s) of ``n`` single-input requests, request i to ``urls[i % len]``."""
    local = threading.local()

    def one(i: int) -> float:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        started = time.perf_counter()
        r = session.post(urls[i % len(urls)], json={"inputs": [TEXTS[i % len(TEXTS)]]}, timeout=120)
        r.raise_for_status()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(n)))
    return n / (time.perf_counter() - started), latencies


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


def replica_rss(app: str, deployment: str) -> int:
    """Resident bytes of the (one) replica process of ``deployment``."""
    import psutil
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")])
    assert len(actors) == 1, f"{app}/{deployment}: {len(actors)} live replicas, expected 1"
    return psutil.Process(actors[0].pid).memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from ray import serve

    from ptm_ray.runtime import init_ray
    from ptm_ray.serve import app_args, build_app

    root = scratch_dir("ptm_ray_bench_serve_")
    registry = ModelStore(str(root / "registry"))
    make_artifact(root, args.model, registry)
    make_variants(root, args.model, registry)
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    base = f"http://127.0.0.1:{args.port}"

    def deploy(app: str, models: str, *overrides: str) -> None:
        cfg = load_config(None, [f"model.name={args.model}", "data.train=unused", f"serve.registry={registry.root}",
                                 f"serve.models={models}", "serve.min_replicas=1", "serve.max_replicas=1",
                                 "serve.num_cpus=0.4", f"serve.max_items={args.concurrency}", *overrides])
        serve.run(build_app(app_args(cfg)), name=app, route_prefix=f"/{app}")

    deploy("batched", "[{name: bench}]", "serve.max_batch_size=16")
    deploy("unbatched", "[{name: bench}]", "serve.max_batch_size=1")
    deploy("plain", "[{name: bench}]", "serve.one_hop=false")  # the model in its own deployment: its memory
    deploy("variants", "[" + ", ".join(f"{{name: lora{i}}}" for i in range(VARIANTS)) + "]")
    urls = {app: f"{base}/{app}/v1/models/bench/predict" for app in ("batched", "unbatched", "plain")}
    spread = [f"{base}/variants/v1/models/lora{i}/predict" for i in range(VARIANTS)]
    for url in [*urls.values(), *spread]:
        load([url], 8, 4)  # warm-up: every replica and every variant loaded

    # (a) one request at a time, over Serve and in this process (one thread, as a replica of num_cpus < 1 gets);
    # where the time goes: a GET that touches no model (proxy + replica), and the same model behind two hops
    _, serial = load([urls["batched"]], 60, 1)
    _, two_hops = load([urls["plain"]], 60, 1)
    session = requests.Session()
    health = []
    for _ in range(60):
        started = time.perf_counter()
        session.get(f"{base}/batched/healthz", timeout=30).raise_for_status()
        health.append(time.perf_counter() - started)
    artifact = load_artifact(registry.get("bench").path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    direct = []
    for i in range(60):
        started = time.perf_counter()
        predict(artifact, [TEXTS[i % len(TEXTS)]])
        direct.append(time.perf_counter() - started)
    torch.set_num_threads(threads)
    # (b) batching
    results = {label: load([urls[label]], args.requests, args.concurrency) for label in ("batched", "unbatched")}
    # (c) variants: memory, then latency spread over all of them vs one of them
    rss_plain, rss_shared = replica_rss("plain", "bench-v1"), replica_rss("variants", _shared_deployment())
    _, one_variant = load(spread[:1], args.requests // 2, 8)
    _, all_variants = load(spread, args.requests // 2, 8)
    _, one_serial = load(spread[:1], 48, 1)
    _, all_serial = load(spread, 48, 1)
    serve.shutdown()

    print(f"\n== Serve benchmark: {args.model}, single-input requests, one replica per deployment")
    http, local = statistics.median(serial[10:]) * 1000, statistics.median(direct[10:]) * 1000
    print(f"(a) one request at a time: over Serve {http:.1f} ms vs in-process {local:.1f} ms "
          f"(Serve adds {http - local:.1f} ms, x{http / local:.2f})")
    hop, ping = statistics.median(two_hops[10:]) * 1000, statistics.median(health[10:]) * 1000
    print(f"    where it goes: GET /healthz (proxy + replica, no model, no body) {ping:.1f} ms; predict one hop "
          f"{http:.1f} ms; two hops (ingress, then a model deployment) {hop:.1f} ms: the second hop adds {hop - http:.1f} ms")
    print(f"(b) {args.requests} requests from {args.concurrency} client threads")
    print(f"    {'':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for label, (rps, lat) in results.items():
        print(f"    {label:<10} {rps:>8.1f} {pct(lat, 50):>8.1f} {pct(lat, 99):>8.1f}")
    (b_rps, b_lat), (u_rps, u_lat) = results["batched"], results["unbatched"]
    print(f"    batching: throughput x{b_rps / u_rps:.2f}, p50 latency x{pct(b_lat, 50) / pct(u_lat, 50):.2f}")
    print(f"(c) {VARIANTS} LoRA variants on one multiplexed replica: resident {rss_shared / 2**20:.0f} MiB vs "
          f"{rss_plain / 2**20:.0f} MiB for one plain replica (x{rss_shared / rss_plain:.2f})")
    print(f"    p50 at 8 client threads: spread over {VARIANTS} variants {pct(all_variants, 50):.1f} ms vs one "
          f"variant {pct(one_variant, 50):.1f} ms (x{pct(all_variants, 50) / pct(one_variant, 50):.2f})")
    print(f"    p50 one request at a time: spread {pct(all_serial, 50):.1f} ms vs one variant {pct(one_serial, 50):.1f} ms "
          f"(x{pct(all_serial, 50) / pct(one_serial, 50):.2f})")
    print(f"serve: overhead_ms={http - local:.1f} batching_x={b_rps / u_rps:.2f} "
          f"multiplex_mem_x={rss_shared / rss_plain:.2f} multiplex_p50_x={pct(all_variants, 50) / pct(one_variant, 50):.2f}")


def _shared_deployment() -> str:
    from ray import serve

    names = [d for d in serve.status().applications["variants"].deployments if d.startswith("shared-")]
    assert len(names) == 1, names
    return names[0]


if __name__ == "__main__":
    main()
