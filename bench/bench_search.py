"""A search's cost: today's trials (a Ray Train worker group each) vs trials that train in the Tune trial
itself on data read once per search, and ASHA vs the full grid, measured side by side in one run.

The space: 2 candidates (minilm-l6 and minilm-l3, real pretrained weights) x 3 freezing depths (all, 0.75,
0.5) x 2 learning rates = 12 trials, bundled intents, one trial at a time, one worker per trial. Three
searches over it:

  old   search.in_trial=false, fifo: every trial starts a TorchTrainer (the path before this benchmark)
  new   search.in_trial=true,  fifo: every trial trains in its Tune trial on the search's shared data
  asha  search.in_trial=true,  asha: the new path with ASHA stopping weak trials after each epoch

Printed: wall time of each search and the speed-up old/new; per trial of the new search its overhead, its
wall time (Tune's ``time_total_s`` at its last epoch) minus the time inside its epochs (training plus
validation), with the median (and without the feature-cache builds, which the first trial on each candidate
and depth does for the trials after it); the best validation accuracy of old and new (difference in points); and
``asha_fraction``: the trial-seconds the ASHA search spent (trials in the order they ran, the last one up
to the epoch that reached it) until a trial came within 0.5 points of the grid's best, over the grid's
(new) total trial-seconds. ``--quick``: 2 candidates x 1 depth (all) x 2 lrs, 2 epochs, 10 steps an epoch.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_search.py [--quick] [--epochs 3]

Last line: ``search: speedup=<x> overhead_median_s=<s> best_delta_pts=<d> asha_fraction=<f>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _scratch import scratch_dir  # bench/_scratch.py: the run's folder, removed at exit
from ptm_ray.config import load_config
from ptm_ray.runtime import init_ray
from ptm_ray.tune import run_search

_REACHED_WITHIN = 0.005  # a trial "reaches" the grid's best when it comes within half a point of it


def _overrides(quick: bool, epochs: int) -> list[str]:
    depths, steps = ("[all]", ["train.max_steps_per_epoch=10"]) if quick else ("[all, 0.75, 0.5]", [])
    space = ("{model.name: {grid: [minilm-l6, minilm-l3]}, model.freeze_depth: {grid: %s}, "
             "optim.lr: {grid: [1.0e-3, 3.0e-4]}}" % depths)
    return ["model.name=minilm-l6", "model.max_length=64", "data.train=bundled:support_intents_train.csv",
            "data.validation=bundled:support_intents_val.csv", f"train.epochs={epochs}", "train.batch_size=16",
            "optim.scheduler=constant", "optim.warmup_ratio=0.0", "scaling.num_workers=1",
            "scaling.resources_per_worker={CPU: 1}", f"search.space={space}", "search.max_concurrent_trials=1",
            "search.trial_cpus=0.5", "search.grace_period=1", "search.reduction_factor=2", *steps]


def _trials(experiment: Path) -> list[list[dict]]:
    """Each trial's per-epoch results (Tune's result.json), trials in the order they started."""
    trials = []
    for path in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            trials.append(rows)
    return sorted(trials, key=lambda rows: rows[0]["timestamp"] - rows[0]["time_total_s"])


def _search(name: str, overrides: list[str], root: Path) -> tuple[float, list[list[dict]]]:
    cfg = load_config(None, overrides + [f"storage.path={root}", f"search.name={name}",
                                         f"search.registry={root / 'registry'}"])
    started = time.perf_counter()
    result = run_search(cfg)
    return time.perf_counter() - started, _trials(Path(result.experiment_path))


def _best(trials: list[list[dict]]) -> float:
    return max(row["val_accuracy"] for rows in trials for row in rows)


def _overhead(rows: list[dict]) -> float:
    inside = sum(row["epoch_time_s"] + row["validation_time_s"] for row in rows)
    return rows[-1]["time_total_s"] - inside


def _cache_build(rows: list[dict]) -> float:
    """Seconds this trial spent building a feature cache (the first trial on each candidate and depth)."""
    return rows[-1].get("feature_cache_build_s", 0.0)


def _asha_fraction(asha: list[list[dict]], grid: list[list[dict]]) -> float:
    target, spent = _best(grid) - _REACHED_WITHIN, 0.0
    grid_seconds = sum(rows[-1]["time_total_s"] for rows in grid)
    for rows in asha:
        for row in rows:
            if row["val_accuracy"] >= target:
                return (spent + row["time_total_s"]) / grid_seconds
        spent += rows[-1]["time_total_s"]
    return float("inf")  # ASHA never came within half a point of the grid's best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 trials of 2 short epochs (a smoke run of the bench)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 3; --quick: 2)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    epochs = args.epochs or (2 if args.quick else 3)
    overrides = _overrides(args.quick, epochs)
    init_ray()
    root = scratch_dir("ptm_ray_bench_search_")
    old_s, old = _search("old", overrides + ["search.in_trial=false", "search.scheduler=fifo"], root)
    new_s, new = _search("new", overrides + ["search.in_trial=true", "search.scheduler=fifo"], root)
    asha_s, asha = _search("asha", overrides + ["search.in_trial=true", "search.scheduler=asha"], root)
    overheads = [_overhead(rows) for rows in new]
    old_overheads = [_overhead(rows) for rows in old]
    print(f"{'quick: ' if args.quick else ''}{len(new)} trials, {epochs} epochs, one at a time, one worker each")
    print(f"wall time: old {old_s:.1f} s, new {new_s:.1f} s, asha {asha_s:.1f} s")
    print(f"per-trial overhead (wall minus time in epochs): old median {statistics.median(old_overheads):.1f} s, "
          f"new median {statistics.median(overheads):.1f} s (new: {', '.join(f'{o:.1f}' for o in overheads)})")
    builds = [_cache_build(rows) for rows in new]
    print(f"  of which building feature caches (new): {', '.join(f'{b:.1f}' for b in builds)}; overhead without "
          f"them: old median {statistics.median(o - _cache_build(r) for o, r in zip(old_overheads, old)):.1f} s, "
          f"new median {statistics.median(o - b for o, b in zip(overheads, builds)):.1f} s")
    print(f"best val_accuracy: old {_best(old):.4f}, new {_best(new):.4f}, asha {_best(asha):.4f}")
    print(f"trial-seconds: grid (new, fifo) {sum(r[-1]['time_total_s'] for r in new):.1f}, "
          f"asha {sum(r[-1]['time_total_s'] for r in asha):.1f}")
    print(f"search: speedup={old_s / new_s:.2f} overhead_median_s={statistics.median(overheads):.2f} "
          f"best_delta_pts={100 * (_best(new) - _best(old)):+.2f} asha_fraction={_asha_fraction(asha, new):.3f}")


if __name__ == "__main__":
    main()
