"""Short spoken sentences for speech recognition, synthesised with espeak-ng as 16 kHz mono wav.

    python -m ptm_ray.datasets.spoken_sentences /tmp/spoken    # -> /tmp/spoken/{train,val}.csv + {train,val}/<n>.wav

Sentences follow one grammar, "<verb> the <colour> <object>" ("open the red door", "stop the blue fan"),
from 6 verbs x 6 colours x 6 objects. Validation sentences are combinations never spoken in training,
made only of words that training does speak, so validation measures recognition rather than recall of
whole sentences. Each clip draws a voice, speed and pitch from a seeded RNG. The manifests have columns
``path`` (relative to the manifest) and ``transcript``.

espeak-ng is a Debian package (``apt-get install espeak-ng``; ``make setup`` installs it).
"""

from __future__ import annotations

import csv
import itertools
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["COLOURS", "OBJECTS", "SAMPLING_RATE", "VERBS", "make_spoken_sentences"]

VERBS = ("open", "close", "stop", "start", "clean", "move")
COLOURS = ("red", "blue", "green", "black", "white", "yellow")
OBJECTS = ("door", "fan", "lamp", "box", "window", "car")
VOICES = ("en-us+m3", "en-us+f3", "en+m1", "en+f2", "en-gb-scotland+m2", "en-us+f4")
SPEEDS = (150, 165, 180)  # words per minute; at 150 the longest sentence lasts about 1.9 s
PITCHES = (35, 50, 65)
SAMPLING_RATE = 16_000
_SILENCE = 1e-3  # leading and trailing samples quieter than this are trimmed (espeak pads each clip)
_THREADS = 4


def _split_sentences(num_train: int, num_val: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Train and validation sentences: validation combinations are unseen, their words are all seen."""
    combos = list(itertools.product(VERBS, COLOURS, OBJECTS))
    # Six combinations that together use every word go to training first, so validation words are all heard.
    colours, objects = rng.sample(COLOURS, len(COLOURS)), rng.sample(OBJECTS, len(OBJECTS))
    cover = list(zip(VERBS, colours, objects))
    rest = [c for c in combos if c not in cover]
    rng.shuffle(rest)
    if not 0 <= num_val <= len(rest):
        raise ValueError(f"num_val={num_val}: between 0 and {len(rest)} of the {len(combos)} sentences can be held "
                         f"out (six stay in training so that it speaks every word)")
    val, train_pool = rest[:num_val], cover + rest[num_val:]
    train = [train_pool[i % len(train_pool)] for i in range(num_train)]  # repeats get other voices
    return [f"{v} the {c} {o}" for v, c, o in train], [f"{v} the {c} {o}" for v, c, o in val]


def _synthesise(espeak: str, text: str, voice: str, speed: int, pitch: int, target: Path) -> None:
    """One espeak-ng clip -> trimmed, 16 kHz mono wav at ``target``."""
    import numpy as np
    import soundfile
    import torch
    import torchaudio.functional

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run([espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text],
                       check=True, capture_output=True)
        samples, rate = soundfile.read(raw, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    loud = np.flatnonzero(np.abs(mono) > _SILENCE)
    if loud.size:
        margin = rate // 20  # keep 50 ms either side
        mono = mono[max(loud[0] - margin, 0):loud[-1] + margin]
    wav = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, SAMPLING_RATE)
    soundfile.write(target, wav.numpy(), SAMPLING_RATE, subtype="PCM_16")


def _write_split(espeak: str, root: Path, split: str, sentences: list[str], rng: random.Random,
                 pool: ThreadPoolExecutor) -> Path:
    (root / split).mkdir(parents=True, exist_ok=True)
    rows, jobs = [], []
    for n, text in enumerate(sentences):
        voice, speed, pitch = rng.choice(VOICES), rng.choice(SPEEDS), rng.choice(PITCHES)
        rel = f"{split}/{n}.wav"
        jobs.append(pool.submit(_synthesise, espeak, text, voice, speed, pitch, root / rel))
        rows.append((rel, text))
    for job in jobs:
        job.result()
    manifest = root / f"{split}.csv"
    partial = manifest.with_suffix(".csv.partial")  # the manifest appears only once every clip exists
    with open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "transcript"])
        writer.writerows(rows)
    partial.replace(manifest)
    return manifest


def make_spoken_sentences(root: str | Path, num_train: int = 120, num_val: int = 40, seed: int = 0
                          ) -> dict[str, Path]:
    """Synthesise the spoken-sentence set under ``root`` (skipped when both manifests already exist).

    Args:
        root: output folder; clips go to ``root/{train,val}/<n>.wav``, manifests to ``root/{train,val}.csv``.
        num_train: training clips; past the 216 - num_val training sentences, sentences repeat in other voices.
        num_val: validation clips, each a distinct sentence absent from training (at most 210).
        seed: the same seed gives the same sentences, voices, speeds and pitches.

    Returns:
        ``{"train": <train.csv>, "validation": <val.csv>}``.

    Raises:
        RuntimeError: if espeak-ng is not installed (with the command that installs it).
        ValueError: if ``num_val`` is negative or above 210.
    """
    root = Path(root)
    manifests = {"train": root / "train.csv", "validation": root / "val.csv"}
    if all(p.exists() for p in manifests.values()):
        return manifests
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed: run `apt-get install espeak-ng` (make setup does it)")
    rng = random.Random(seed)
    train, val = _split_sentences(num_train, num_val, rng)
    with ThreadPoolExecutor(_THREADS) as pool:
        _write_split(espeak, root, "train", train, rng, pool)
        _write_split(espeak, root, "val", val, rng, pool)
    return manifests


if __name__ == "__main__":
    print(make_spoken_sentences(sys.argv[1] if len(sys.argv) > 1 else "spoken_sentences"))
