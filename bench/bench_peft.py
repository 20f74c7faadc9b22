"""Full fine-tuning vs freezing half vs LoRA: MiniLM-L6 (real pretrained weights) on the bundled support intents,
the three runs side by side in one process: best validation accuracy, trainable parameters, training samples/s and
the training worker's peak resident memory.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_peft.py [--epochs 2] [--rank 8]

Every run: 1 worker, batch 16, max_length 64, head at lr 1e-3, constant schedule, the same seed. The backbone's
learning rate is 1e-4 for full fine-tuning and freezing (the top half of the blocks trains), 1e-3 for the LoRA
adapters (adapters usually train at ~10x a full fine-tune's rate). LoRA: every linear layer of every transformer
layer (``model.lora.target_modules`` empty), alpha 16. Peak RSS is the Ray Train worker process's, sampled every
0.25 s (psutil), so it counts the model, optimizer state and activations, not the driver.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
from pathlib import Path

import psutil

from _scratch import scratch_dir  # bench/_scratch.py: the run's folder, removed at exit
from ptm_ray.config import load_config
from ptm_ray.runtime import init_ray
from ptm_ray.train import fit

COMMON = ["model.name=minilm-l6", "model.max_length=64", "data.train=bundled:support_intents_train.csv",
          "data.validation=bundled:support_intents_val.csv", "train.batch_size=16", "optim.head_lr=1e-3",
          "optim.scheduler=constant", "optim.warmup_ratio=0.0", "scaling.num_workers=1",
          "scaling.resources_per_worker={CPU: 1}", "train.feature_cache=off", "tracking.mlflow=off",
          "tracking.tensorboard=off"]


class PeakRSS:
    """Peak resident memory of this process's Ray Train worker processes while the block runs."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process(os.getpid())
        while not self._stop.wait(0.25):
            for proc in me.children(recursive=True):  # only the Ray this process started
                try:
                    if "RayTrainWorker" in " ".join(proc.cmdline()):
                        self.peak = max(self.peak, proc.memory_info().rss)
                except psutil.Error:
                    continue

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(label: str, overrides: list[str], epochs: int, root: Path) -> dict:
    cfg = load_config(None, COMMON + overrides + [f"train.epochs={epochs}", f"storage.path={root}",
                                                  f"storage.name={label.replace(' ', '-')}"])
    with PeakRSS() as rss:
        result = fit(cfg)
    history = result.history
    return {"label": label, "best": max(h["val_accuracy"] for h in history),
            "trainable": history[-1]["trainable_params"], "total": history[-1]["total_params"],
            "samples_per_s": statistics.mean(h["samples_per_s"] for h in history), "rss_mb": rss.peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    init_ray()
    root = scratch_dir("ptm_ray_bench_peft_")
    rows = [run("full fine-tune", ["model.freeze_depth=0", "optim.lr=1e-4"], args.epochs, root),
            run("freeze half", ["model.freeze_depth=0.5", "optim.lr=1e-4"], args.epochs, root),
            run(f"LoRA r={args.rank}", [f"model.lora.r={args.rank}", "optim.lr=1e-3"], args.epochs, root)]
    print(f"\n== MiniLM-L6 on support intents (320 train / 96 validation rows), {args.epochs} epochs, 1 worker on CPU")
    print(f"{'run':<16} {'best val_acc':>12} {'trainable':>12} {'of total':>12} {'trainable %':>11} "
          f"{'samples/s':>9} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['label']:<16} {r['best']:>12.4f} {r['trainable']:>12,} {r['total']:>12,} "
              f"{100 * r['trainable'] / r['total']:>10.2f}% {r['samples_per_s']:>9.1f} {r['rss_mb']:>11.0f}")
    full, half, lora = rows
    print(f"peft: LoRA r={args.rank} trains {lora['trainable'] / full['trainable']:.4f}x the parameters of a full "
          f"fine-tune ({lora['trainable']:,} vs {full['trainable']:,}; freeze half {half['trainable'] / full['trainable']:.3f}x), "
          f"best val_accuracy {lora['best']:.4f} vs {full['best']:.4f} full and {half['best']:.4f} freeze half, "
          f"{lora['samples_per_s'] / full['samples_per_s']:.2f}x the full fine-tune's samples/s "
          f"(freeze half {half['samples_per_s'] / full['samples_per_s']:.2f}x), "
          f"{lora['rss_mb'] / full['rss_mb']:.2f}x its peak RSS (freeze half {half['rss_mb'] / full['rss_mb']:.2f}x)")


if __name__ == "__main__":
    main()
