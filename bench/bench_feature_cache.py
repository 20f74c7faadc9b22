"""Frozen-prefix feature cache: the same runs without and with the cache, measured side by side in one run.

(a) Feature extraction (every block frozen): EfficientNet-Lite0 (ImageNet weights) on the digits, 224 px.
    Train time per epoch once the cache exists, and the whole ``fit`` including building the cache.
(b) A search over 2 candidates x 3 freezing depths x 2 learning rates (12 trials, one at a time):
    MiniLM-L6 and its first 3 layers (``minilm-l3``: real pretrained weights), total wall time and the best
    validation score of each search.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_feature_cache.py [--part a|b|both] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from _scratch import scratch_dir  # bench/_scratch.py: the run's folder, removed at exit
from ptm_ray.config import load_config
from ptm_ray.runtime import init_ray
from ptm_ray.train import fit
from ptm_ray.tune import run_search

ONE_WORKER = ["scaling.num_workers=1", "scaling.resources_per_worker={CPU: 1}", "optim.scheduler=constant",
              "optim.warmup_ratio=0.0"]


def _fit(overrides: list[str], cache: str, root: Path) -> tuple[float, list[dict]]:
    cfg = load_config(None, overrides + [f"train.feature_cache={cache}", f"storage.path={root / cache}",
                                         "storage.name=bench"])
    started = time.perf_counter()
    result = fit(cfg)
    return time.perf_counter() - started, result.history


def part_a(root: Path, epochs: int) -> None:
    from ptm_ray.datasets.digits import make_digits_folder

    digits = make_digits_folder(root / "digits", size=32)
    overrides = ["model.name=efficientnet-lite0", f"data.train={digits}", "data.validation=null",
                 "data.val_fraction=0.2", "model.freeze_depth=all", f"train.epochs={epochs}", "train.batch_size=32",
                 "optim.lr=1e-3", *ONE_WORKER]
    off_s, off = _fit(overrides, "off", root)
    on_s, on = _fit(overrides, "on", root)
    off_epoch = statistics.mean(h["epoch_time_s"] for h in off)
    on_epoch = statistics.mean(h["epoch_time_s"] for h in on)
    print(f"(a) feature extraction: efficientnet-lite0 (k=all) on digits, {epochs} epochs, 1 worker")
    print(f"    train time per epoch: uncached {off_epoch:.2f} s, cached {on_epoch:.3f} s "
          f"-> {off_epoch / on_epoch:.1f}x")
    print(f"    whole fit (cached: including building the cache): uncached {off_s:.1f} s, cached {on_s:.1f} s "
          f"-> {off_s / on_s:.2f}x")
    print(f"    best val_accuracy: uncached {max(h['val_accuracy'] for h in off):.4f}, "
          f"cached {max(h['val_accuracy'] for h in on):.4f}; cache size {on[-1]['feature_cache_bytes'] / 1e6:.1f} MB")


def _search(overrides: list[str], cache: str, root: Path) -> tuple[float, float]:
    cfg = load_config(None, overrides + [f"train.feature_cache={cache}", f"storage.path={root / cache}",
                                         f"search.name=search-{cache}", f"search.registry={root / cache / 'registry'}"])
    started = time.perf_counter()
    result = run_search(cfg)
    scores = [r.best_score for r in result.leaderboard if r.best_score is not None]
    return time.perf_counter() - started, max(scores)


def part_b(root: Path, epochs: int) -> None:
    space = ("{model.name: {grid: [minilm-l6, minilm-l3]}, model.freeze_depth: {grid: [all, 0.75, 0.5]}, "
             "optim.lr: {grid: [1.0e-3, 3.0e-4]}}")
    overrides = ["model.name=minilm-l6", "model.max_length=64", "data.train=bundled:support_intents_train.csv",
                 "data.validation=bundled:support_intents_val.csv", f"train.epochs={epochs}", "train.batch_size=16",
                 f"search.space={space}", "search.scheduler=fifo", "search.max_concurrent_trials=1",
                 "search.trial_cpus=0.5", *ONE_WORKER]
    off_s, off_best = _search(overrides, "off", root)
    on_s, on_best = _search(overrides, "auto", root)
    print(f"(b) search: 2 candidates (minilm-l6, its first 3 layers) x 3 depths (all, 0.75, 0.5) x 2 lrs, "
          f"{epochs} epochs, 1 trial at a time")
    print(f"    wall time: uncached {off_s:.1f} s, cached {on_s:.1f} s -> {off_s / on_s:.2f}x")
    print(f"    best val_accuracy: uncached {off_best:.4f}, cached {on_best:.4f} "
          f"(difference {100 * abs(off_best - on_best):.2f} points)")
    caches = [p for p in (root / "auto").glob("search-auto/trials/feature_cache/*") if not p.name.startswith(".")]
    print(f"    caches built for the 12 trials: {len(caches)} (one per candidate and depth, shared across lrs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("a", "b", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    init_ray()
    root = scratch_dir("ptm_ray_bench_cache_")
    if args.part in ("a", "both"):
        part_a(root, args.epochs)
    if args.part in ("b", "both"):
        part_b(root, args.epochs)


if __name__ == "__main__":
    main()
