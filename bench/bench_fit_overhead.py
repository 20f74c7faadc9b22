"""Where a short fit's time goes: the phases of a Ray Train run read from Ray Train's own logs.

Each fit is the same short run (MiniLM-L3, bundled intents, 1 epoch of 2 steps), one after another on one local
Ray: first ``--runs`` fits on one worker, then ``--runs`` on two. Every phase below is measured from the
timestamps that the driver and Ray Train's controller and workers log (``<ray logs>/train/ray-train-sys-*.log``):

  controller   fit() called -> the controller asks for the workers' resources (the driver reads and plans the data,
               under 0.1 s for this data; the controller's process starts and imports Ray Train)
  workers      worker actors created (their processes started, Ray Train imported)
  context      the train context set up on the workers (ptm_ray and torch imported there: the loop's module)
  setup        the loop starts -> the model is built and handed to Ray Train (transformers imported, weights read)
  train        -> the last checkpoint reported (the epoch, validation, checkpoint)
  end-poll     -> the controller sees the loop has ended (it looks every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)
  shutdown     -> the controller finished (workers, placement group, its callbacks)
  return       -> fit() returns on the driver

The first fit of a process pays one-off costs (the first actor processes, Ray Data's first plan); the medians
are of the fits after it. For comparison, Ray Train alone: a ``TorchTrainer`` on one worker whose loop only reports
(no data, no model), ``--runs`` times. Last line: ``fit-overhead: one_worker_s=<median total>
two_workers_s=<median total> ray_train_alone_s=<median> fixed_share=<share of the one-worker total outside "train">``.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_fit_overhead.py [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

from _scratch import scratch_dir  # bench/_scratch.py: the run's folder, removed at exit
from ptm_ray.config import load_config
from ptm_ray.console import logs_dir
from ptm_ray.runtime import init_ray
from ptm_ray.train import HEALTH_CHECK_INTERVAL_S, fit

PHASES = ("controller", "workers", "context", "setup", "train", "end-poll", "shutdown", "return")
# (phase that ends at this event, a substring of the message that marks it, the last such line or the first)
MARKS = (("controller", "Requesting resources", "first"),
         ("workers", "worker actors created", "first"),
         ("context", "Train context initialized", "first"),
         ("setup", "Moving model to device", "last"),
         ("train", "Checkpoint successfully created", "last"),
         ("end-poll", "RUNNING -> SHUTTING_DOWN", "first"),
         ("shutdown", "SHUTTING_DOWN -> FINISHED", "first"))


def _log_lines(since: float, until: float) -> list[tuple[float, str]]:
    """(time, message) of every Ray Train controller and worker log line between ``since`` and ``until``."""
    lines = []
    for path in Path(logs_dir(), "train").glob("ray-train-sys-*.log"):
        for raw in path.read_text().splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            # Python's logging writes local time: a naive datetime's timestamp() reads it as local time too
            t = datetime.datetime.strptime(record["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if since <= t <= until:
                lines.append((t, record["message"]))
    return sorted(lines)


def phases(started: float, returned: float) -> dict[str, float]:
    """Seconds of each phase of the fit that ran between ``started`` and ``returned`` (wall-clock times)."""
    time.sleep(0.5)  # log lines reach their files a moment after they are written
    lines = _log_lines(started, returned)
    ends, previous = {}, started
    for phase, text, which in MARKS:
        times = [t for t, message in lines if text in message and t >= previous]
        if not times:
            raise RuntimeError(f"no '{text}' in Ray Train's logs under {logs_dir()}/train for this fit")
        ends[phase] = previous = times[-1] if which == "last" else times[0]
    ends["return"] = returned
    out, previous = {}, started
    for phase in PHASES:
        out[phase], previous = ends[phase] - previous, ends[phase]
    return out


def _report_only(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def ray_train_alone(root: Path, runs: int) -> list[float]:
    """Seconds of ``runs`` TorchTrainer fits on one worker whose loop only reports, on the same Ray."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)  # as ptm_ray's fits run
    seconds = []
    for i in range(runs):
        started = time.perf_counter()
        TorchTrainer(_report_only, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name=f"alone-{i}", storage_path=str(root))).fit()
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fits of each kind (one worker, two workers)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    init_ray()
    root = scratch_dir("ptm_ray_bench_fit_overhead_")
    rows = []
    for workers in (1, 2):
        for i in range(args.runs):
            cfg = load_config(None, [
                "model.name=minilm-l3", "data.train=bundled:support_intents_train.csv",
                "data.validation=bundled:support_intents_val.csv", "train.epochs=1", "train.max_steps_per_epoch=2",
                f"scaling.num_workers={workers}", "scaling.resources_per_worker={CPU: 1}", "tracking.mlflow=off",
                f"storage.path={root}", f"storage.name=w{workers}-{i}"])
            started = time.time()
            fit(cfg)
            returned = time.time()
            rows.append((workers, i, returned - started, phases(started, returned)))
    print(f"\n{'workers':>7} {'fit':>3} {'total':>6}  " + " ".join(f"{p:>10}" for p in PHASES))
    for workers, i, total, spent in rows:
        print(f"{workers:>7} {i + 1:>3} {total:>6.1f}  " + " ".join(f"{spent[p]:>10.2f}" for p in PHASES))
    medians, warm = {}, {}
    for workers in (1, 2):
        fits = [(total, spent) for w, _, total, spent in rows if w == workers]
        warm[workers] = fits[1:] or fits  # the first fit of a process pays one-off costs
        medians[workers] = statistics.median(total for total, _ in warm[workers])
        print(f"{workers} worker(s), median of the fits after the first: {medians[workers]:.1f} s; " + ", ".join(
            f"{p} {statistics.median(spent[p] for _, spent in warm[workers]):.2f}" for p in PHASES))
    alone = ray_train_alone(root, args.runs)
    alone_s = statistics.median(alone[1:] or alone)
    print(f"Ray Train alone (one worker, a loop that only reports): {', '.join(f'{s:.1f}' for s in alone)} s; "
          f"median after the first {alone_s:.1f} s")
    fixed = statistics.median((total - spent["train"]) / total for total, spent in warm[1])
    print(f"fit-overhead: one_worker_s={medians[1]:.1f} two_workers_s={medians[2]:.1f} ray_train_alone_s={alone_s:.1f} "
          f"fixed_share={fixed:.2f}")


if __name__ == "__main__":
    main()
