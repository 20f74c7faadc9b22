"""Pretrained vs from scratch: EfficientNet-Lite0 (ImageNet weights) vs the same architecture randomly
initialised, fine-tuned on the same few labelled digits with the same budget; validation accuracy of each.

    .venv/bin/python bench/bench_pretrained_vs_scratch.py [--shots 5 20] [--epochs 12] [--image-size 96]

Both runs use the same config except ``model.weights`` (the shipped ImageNet weights vs ``none``), the same
training images (the first N digits of each class) and the same held-out validation images (the last 30
of each class, never trained on).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _scratch import scratch_dir  # bench/_scratch.py: the run's folder, removed at exit
from ptm_ray.config import load_config
from ptm_ray.datasets.digits import make_digits_split
from ptm_ray.runtime import init_ray
from ptm_ray.train import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 20], help="labelled images per class")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=96)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = scratch_dir("ptm_ray_pretrained_")
    init_ray()
    rows = []
    for shots in args.shots:
        train, val = make_digits_split(root, shots)
        for label, weights in (("pretrained", ""), ("from scratch", "none")):
            cfg = load_config(None, [
                "model.name=efficientnet-lite0", f"model.weights={weights}", "model.freeze_depth=0",
                f"data.train={train}", f"data.validation={val}", f"data.image_size={args.image_size}",
                "optim.lr=1e-3", "optim.head_lr=1e-2", "optim.scheduler=cosine", "optim.warmup_ratio=0.1",
                f"train.epochs={args.epochs}", "train.batch_size=16", "scaling.num_workers=1",
                "scaling.resources_per_worker={CPU: 1}", f"storage.path={root / 'runs'}",
                f"storage.name={shots}-{weights or 'imagenet'}",
            ])
            started = time.perf_counter()
            result = fit(cfg)
            best = max(result.history, key=lambda h: h["val_accuracy"])
            rows.append((shots, label, best["val_accuracy"], best["epoch"], time.perf_counter() - started))

    print("\n== EfficientNet-Lite0 on scikit-learn digits: ImageNet-pretrained vs from scratch, same data and budget")
    print(f"{args.epochs} epochs, {args.image_size}px, validation: 300 held-out digits (30 per class)")
    print(f"{'shots/class':>11}  {'init':<13} {'best val acc':>12} {'@epoch':>6} {'wall s':>7}")
    for shots, label, acc, epoch, wall in rows:
        print(f"{shots:>11}  {label:<13} {acc:>12.3f} {epoch:>6} {wall:>7.1f}")
    for shots in args.shots:
        pre, scratch = [r[2] for r in rows if r[0] == shots]
        print(f"{shots} shots/class: pretrained - scratch = {pre - scratch:+.3f}  (ratio {pre / max(scratch, 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
