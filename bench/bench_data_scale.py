"""Data at scale: memory and throughput of streamed data as the dataset grows, measured side by side in one run.

Synthetic text (25k, 100k, 400k rows) and images (2k, 8k, 32k PNG files), made here; a fixed validation set
at every size, so the training data is what grows. Two workers, one epoch, ``train.max_steps_per_epoch``
steps, ``data.materialize=never`` (streamed):

(a) tiny models (so the data path is what is stressed): the driver's peak RSS and the object store's peak
    use during ``fit`` (medians over the rounds, as (c)), growth from the smallest to the largest size;
(c) training samples/s at each size, spread = (max - min) / mean of the sizes' medians over ``--repeats`` rounds
    (default 3; one 30-step epoch of a tiny model lasts 5-8 s here, and single runs of one size ranged 317-381
    samples/s), after one fit of each kind at the smallest size
    that is printed and not counted (a process's first fit of a kind pays one-off costs: the first read and
    training worker processes, imports, Ray Data's first plan: at 30 steps the first text fit of a process ran
    322 samples/s, the three after it 418-469), over 30 steps a worker (the most the 2k image files give each of
    two workers at batch 32; at more, the smallest size trains fewer steps than the others);
(b) real models (MiniLM-L6 for text, EfficientNet-Lite0 for images) at the smallest size: share of the
    training time the workers waited for their next batch (``data_wait_share``).
Today's path (``data.materialize=always``) runs at the smallest size for comparison, and (b) runs once more with
the preprocessing in Ray Data tasks (``data.preprocess=ray_data``) instead of the training workers.
``--compare-preprocess`` runs only that: (b) streamed, ``data.preprocess=workers`` then ``ray_data``, side by side.
``--tiny-only`` runs only (a) and (c), ending with ``data-scale (a)+(c): rss_growth=<x> store_growth=<x>
throughput_spread=<f>``.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_data_scale.py [--steps 30] [--repeats 3] [--sizes small]
        [--compare-preprocess | --tiny-only]

The last line: ``data-scale: rss_growth=<x> store_growth=<x> data_wait_text=<f> data_wait_images=<f>
throughput_spread=<f>``.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from _scratch import scratch_dir  # bench/_scratch.py: the run's folder, removed at exit
from ptm_ray.config import load_config
from ptm_ray.runtime import init_ray
from ptm_ray.train import fit

TEXT_SIZES = (25_000, 100_000, 400_000)
IMAGE_SIZES = (2_000, 8_000, 32_000)
LABELS = ["billing", "delivery", "refund", "account", "password", "warranty", "cancel", "upgrade"]
WORDS = "please help my order the a card parcel late broken never arrived charge twice login reset new plan".split()


def make_text(path: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        for i in range(rows):
            label = rng.randrange(len(LABELS))
            words = [LABELS[label], *rng.choices(WORDS, k=rng.randint(4, 12)), str(i)]
            rng.shuffle(words)
            out.writerow([" ".join(words), LABELS[label]])
    return path


def make_images(folder: Path, files: int, seed: int) -> Path:
    """``files`` 32x32 RGB PNGs in ``folder/<label>/``: a class's colour plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 255, size=(4, 3))
    for label in range(4):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        label = i % 4
        pixels = np.clip(colours[label] + rng.normal(0, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"c{label}" / f"{i}.png")
    return folder


class Peaks:
    """The driver's peak RSS and the object store's peak use (bytes, all nodes), sampled every 0.1 s while running."""

    def __init__(self) -> None:
        self.rss = self.store = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        me, state = psutil.Process(), get_state_from_address(None)
        while not self._stop.is_set():
            self.rss = max(self.rss, me.memory_info().rss)
            try:  # the raylet's own count, in bytes (``ray memory`` prints it rounded down to MiB)
                used = get_memory_info_reply(state).store_stats.object_store_bytes_used
                self.store = max(self.store, used)
            except Exception:  # noqa: BLE001 - a missed sample is not a failed run
                pass
            self._stop.wait(0.1)

    def __enter__(self) -> "Peaks":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(name: str, overrides: list[str], root: Path) -> dict[str, float]:
    cfg = load_config(None, overrides + ["scaling.num_workers=2", "scaling.resources_per_worker={CPU: 1}",
                                         "train.epochs=1", "optim.scheduler=constant", "optim.warmup_ratio=0.0",
                                         "train.feature_cache=off", "tracking.mlflow=off", "tracking.tensorboard=off",
                                         f"storage.path={root / 'runs'}", f"storage.name={name}"])
    started = time.perf_counter()
    with Peaks() as peaks:
        history = fit(cfg).history
    epoch = history[-1]
    row = {"rss": peaks.rss, "store": peaks.store, "samples_per_s": epoch["samples_per_s"],
           "data_wait": epoch["data_wait_share"], "validation_rows": epoch["validation_rows"],
           "wall": time.perf_counter() - started}
    print(f"    {name:<28} driver peak RSS {row['rss'] / 2**20:7.0f} MiB  object store peak {row['store'] / 2**20:6.2f} MiB  "
          f"{row['samples_per_s']:7.1f} samples/s  data wait {row['data_wait']:6.1%}  "
          f"({row['validation_rows']} validation rows, {row['wall']:.0f} s)", flush=True)
    return row


def compare_preprocess(text: list[str], image: list[str], root: Path,
                       modes: tuple[str, ...] = ("workers", "ray_data")) -> dict[str, dict[str, dict]]:
    """(b)'s real models with the preprocessing in the training workers, then in Ray Data tasks; one line each,
    then ``preprocess: ...`` with the data-wait shares side by side."""
    rows: dict[str, dict[str, dict]] = {"text": {}, "images": {}}
    for mode in modes:
        rows["text"][mode] = run(f"text-minilm-{mode}", text + [f"data.preprocess={mode}"], root)
        rows["images"][mode] = run(f"images-lite0-{mode}", image + [f"data.preprocess={mode}"], root)
    print("preprocess: " + " ".join(f"data_wait_{kind}_{mode}={row['data_wait']:.3f} "
                                    f"samples_per_s_{kind}_{mode}={row['samples_per_s']:.1f}"
                                    for kind, by_mode in rows.items() for mode, row in by_mode.items()), flush=True)
    return rows


def _medians(runs: dict[int, list[dict]]) -> dict[int, dict]:
    """Per size, the median of each measure over the rounds (printed when there are several)."""
    rows = {n: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for n, rs in runs.items()}
    if any(len(rs) > 1 for rs in runs.values()):
        for n, row in rows.items():
            each = ", ".join(f"{r['samples_per_s']:.0f}" for r in runs[n])
            print(f"    median of {len(runs[n])} at {n:>7}: driver peak RSS {row['rss'] / 2**20:5.0f} MiB  object store "
                  f"peak {row['store'] / 2**20:5.2f} MiB  {row['samples_per_s']:6.1f} samples/s  (each: {each})")
    return rows


def _print_scale(text_rows: dict[int, dict], image_rows: dict[int, dict], text_sizes: list[int],
                 image_sizes: list[int]) -> tuple[float, float, float]:
    """(a) and (c): growth from the smallest to the largest size and the samples/s spread, printed; returned
    as (RSS growth, object store growth, spread), the worse of text and images."""

    def growth(rows: dict[int, dict], key: str) -> float:
        return rows[max(rows)][key] / max(rows[min(rows)][key], 1)

    def spread(rows: dict[int, dict]) -> float:
        values = [r["samples_per_s"] for r in rows.values()]
        return (max(values) - min(values)) / (sum(values) / len(values))

    print(f"    growth {min(text_sizes)} -> {max(text_sizes)} rows: RSS {growth(text_rows, 'rss'):.2f}x, "
          f"object store {growth(text_rows, 'store'):.2f}x; {min(image_sizes)} -> {max(image_sizes)} files: "
          f"RSS {growth(image_rows, 'rss'):.2f}x, object store {growth(image_rows, 'store'):.2f}x")
    print(f"    samples/s spread: text {spread(text_rows):.1%}, images {spread(image_rows):.1%}")
    rss = max(growth(text_rows, "rss"), growth(image_rows, "rss"))
    store = max(growth(text_rows, "store"), growth(image_rows, "store"))
    worst = max(spread(text_rows), spread(image_rows))
    print(f"data-scale (a)+(c): rss_growth={rss:.2f} store_growth={store:.2f} throughput_spread={worst:.3f}")
    return rss, store, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per worker, tiny models (a), (c)")
    parser.add_argument("--real-steps", type=int, default=60, help="training steps per worker, real models (b)")
    parser.add_argument("--sizes", choices=["full", "small"], default="full",
                        help="small: 1/10 of every size (a quick check of the bench itself)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of (a)+(c) over every size; each measure is the median of its size's rounds")
    parser.add_argument("--tiny-only", action="store_true",
                        help="only (a) and (c), the tiny models at every size (no real models; about 7 minutes)")
    parser.add_argument("--compare-preprocess", action="store_true",
                        help="only (b) at the smallest size: data.preprocess=workers vs ray_data, side by side")
    args = parser.parse_args()
    scale = 1 if args.sizes == "full" else 10
    text_sizes = [n // scale for n in TEXT_SIZES]
    image_sizes = [n // scale for n in IMAGE_SIZES]
    if args.compare_preprocess:  # the smallest size only
        text_sizes, image_sizes = text_sizes[:1], image_sizes[:1]
    init_ray()
    root = scratch_dir("bench_data_scale_")
    from ptm_ray.tiny import make_tiny_text_model

    started = time.perf_counter()
    val_text = make_text(root / "val.csv", 2000, seed=1)
    texts = {n: make_text(root / f"train_{n}.csv", n, seed=2) for n in text_sizes}
    val_images = make_images(root / "val_images", 400, seed=3)
    images = {n: make_images(root / f"images_{n}", n, seed=4) for n in image_sizes}
    with open(val_text) as f:
        tiny_bert = make_tiny_text_model("bert", root / "tiny_bert", [r["text"] for r in csv.DictReader(f)])
    print(f"data made in {time.perf_counter() - started:.0f} s under {root}", flush=True)

    tiny = [f"train.max_steps_per_epoch={args.steps}", "train.batch_size=32"]
    real = [f"train.max_steps_per_epoch={args.real_steps}", "train.batch_size=32"]
    text = lambda n, model, mode, steps=tiny: [f"model.name={model}", f"data.train={texts[n]}",  # noqa: E731
                                               f"data.validation={val_text}", "model.max_length=32",
                                               f"data.materialize={mode}", *steps]
    image = lambda n, model, mode, steps=tiny: [f"model.name={model}", f"data.train={images[n]}",  # noqa: E731
                                                f"data.validation={val_images}", f"data.materialize={mode}", *steps]
    tiny_image = "timm:test_resnet"
    if args.compare_preprocess:
        compare_preprocess(text(text_sizes[0], "minilm-l6", "never", real),
                           image(image_sizes[0], "efficientnet-lite0", "never", real) + ["data.image_size=96"], root)
        return
    print("(a)+(c) tiny models, streamed (data.materialize=never):")
    run(f"warm-up-text-{text_sizes[0]}", text(text_sizes[0], f"hf:{tiny_bert}", "never"), root)  # not counted
    run(f"warm-up-images-{image_sizes[0]}", image(image_sizes[0], tiny_image, "never")
        + ["model.weights=none", "data.image_size=32"], root)
    text_runs: dict[int, list[dict]] = {n: [] for n in text_sizes}
    image_runs: dict[int, list[dict]] = {n: [] for n in image_sizes}
    for r in range(args.repeats):  # rounds over every size, so that a slower minute of the machine hits them all
        for n in text_sizes:
            text_runs[n].append(run(f"text-tiny-{n}-{r}", text(n, f"hf:{tiny_bert}", "never"), root))
        for n in image_sizes:
            image_runs[n].append(run(f"images-tiny-{n}-{r}", image(n, tiny_image, "never")
                                     + ["model.weights=none", "data.image_size=32"], root))
    text_rows, image_rows = _medians(text_runs), _medians(image_runs)
    if args.tiny_only:
        _print_scale(text_rows, image_rows, text_sizes, image_sizes)
        return
    print("    today's path at the smallest size (data.materialize=always):")
    run(f"text-tiny-{text_sizes[0]}-materialized", text(text_sizes[0], f"hf:{tiny_bert}", "always"), root)
    run(f"images-tiny-{image_sizes[0]}-materialized", image(image_sizes[0], tiny_image, "always")
        + ["model.weights=none", "data.image_size=32"], root)
    print("(b) real models at the smallest size, streamed, then materialized:")
    minilm = [run(f"text-minilm-{text_sizes[0]}-{m}", text(text_sizes[0], "minilm-l6", m, real), root) for m in ("never", "always")]
    lite0 = [run(f"images-lite0-{image_sizes[0]}-{m}", image(image_sizes[0], "efficientnet-lite0", m, real)
                 + ["data.image_size=96"], root) for m in ("never", "always")]
    print("    the same, streamed, preprocessing in Ray Data tasks (data.preprocess=ray_data):")
    compare_preprocess(text(text_sizes[0], "minilm-l6", "never", real),
                       image(image_sizes[0], "efficientnet-lite0", "never", real) + ["data.image_size=96"], root,
                       modes=("ray_data",))

    rss, store, spread = _print_scale(text_rows, image_rows, text_sizes, image_sizes)
    print(f"    data wait, streamed vs materialized: MiniLM {minilm[0]['data_wait']:.1%} vs {minilm[1]['data_wait']:.1%}, "
          f"Lite0 {lite0[0]['data_wait']:.1%} vs {lite0[1]['data_wait']:.1%}")
    print(f"data-scale: rss_growth={rss:.2f} store_growth={store:.2f} data_wait_text={minilm[0]['data_wait']:.3f} "
          f"data_wait_images={lite0[0]['data_wait']:.3f} throughput_spread={spread:.3f}")


if __name__ == "__main__":
    main()
