"""Training throughput: the Ray Train loop with one worker vs a plain single-process PyTorch loop.

Same model, data, freezing, optimizer, batch size and thread count; both measured in this one run.
Throughput is samples/s of the training epochs after the first (warm-up), validation excluded.

    .venv/bin/python bench/bench_train_throughput.py [--model minilm-l6] [--epochs 3] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import pandas as pd
import torch
import torch.nn.functional as F

from _scratch import scratch_dir  # bench/_scratch.py: the run's folder, removed at exit
from ptm_ray.config import load_config
from ptm_ray.freeze import freeze, param_groups, set_train_mode
from ptm_ray.models import resolve_model
from ptm_ray.runtime import init_ray
from ptm_ray.train import fit, plan_run


def plain_loop(cfg, labels: list[str], threads: int) -> float:
    """The same work as one Ray Train worker, in a bare PyTorch loop; returns samples/s."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    family, ref = resolve_model(cfg.model)
    model = family.build(ref, labels, cfg.model, "classifier")
    preprocessor = family.preprocessor(ref, model, cfg)
    blocks = family.blocks(model)
    frozen = freeze(model, blocks, plan_run(cfg).freeze_blocks)
    optimizer = torch.optim.AdamW(param_groups(model, blocks, cfg.optim.lr, cfg.optim.head_lr or cfg.optim.lr,
                                               cfg.optim.layer_decay, cfg.optim.weight_decay))
    from ptm_ray.data import resolve_path

    frame = pd.read_csv(resolve_path(cfg.data.train))
    index = {label: i for i, label in enumerate(labels)}
    rates = []
    for epoch in range(cfg.train.epochs):
        set_train_mode(model, frozen)
        frame = frame.sample(frac=1.0, random_state=epoch)
        started, seen = time.perf_counter(), 0
        for start in range(0, len(frame), cfg.train.batch_size):
            batch = frame.iloc[start:start + cfg.train.batch_size]
            inputs = preprocessor(batch[cfg.data.text_column].tolist())
            targets = torch.tensor([index[str(v)] for v in batch[cfg.data.label_column]])
            loss = F.cross_entropy(family.logits(model, inputs).float(), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen += len(batch)
        rates.append(seen / (time.perf_counter() - started))
        print(f"plain loop epoch {epoch + 1}: {rates[-1]:.1f} samples/s")
    return statistics.mean(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--epochs", type=int, default=3, help="at least 2: the first is warm-up and not counted")
    parser.add_argument("--batch-size", type=int, default=16)
    # One core is left to Ray's own processes (raylet, GCS, dashboard, the data split coordinator): on a
    # 2-core machine giving torch both cores makes the Ray side compete with them (measured ratio 0.80-0.84).
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs {args.epochs}: at least 2 (the first epoch is warm-up and not counted)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = [
        f"model.name={args.model}", "model.max_length=64", "model.freeze_depth=0",
        "data.train=bundled:support_intents_train.csv", "data.validation=bundled:support_intents_val.csv",
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "optim.scheduler=constant",
        "optim.warmup_ratio=0.0", "train.shuffle_buffer=0", "scaling.num_workers=1",
        f"scaling.resources_per_worker={{CPU: {args.threads}}}",
        f"storage.path={scratch_dir('ptm_ray_bench_')}", "storage.name=throughput",
    ]
    cfg = load_config(None, overrides)
    labels = plan_run(cfg).labels

    init_ray(num_cpus=args.threads)
    result = fit(cfg)  # Ray sets OMP_NUM_THREADS to the worker's CPUs, so both loops use args.threads
    ray_rate = statistics.mean(h["samples_per_s"] for h in result.history[1:])
    plain_rate = plain_loop(cfg, labels, args.threads)

    print("\n== training throughput (samples/s, epochs 2..N, validation excluded)")
    print(f"model {args.model}, batch {args.batch_size}, {args.threads} threads, {args.epochs} epochs")
    print(f"Ray Train, 1 worker : {ray_rate:8.1f}")
    print(f"plain PyTorch loop  : {plain_rate:8.1f}")
    print(f"ratio Ray / plain   : {ray_rate / plain_rate:8.3f}   (target >= 0.95)")


if __name__ == "__main__":
    main()
