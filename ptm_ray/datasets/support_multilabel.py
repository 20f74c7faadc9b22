"""A multi-label set derived from the bundled support intents: messages that ask for one, two or three things.

    python -m ptm_ray.datasets.support_multilabel /tmp/multilabel   # -> train.csv, val.csv (text, labels)

Each row joins one to three messages of different intents from ``support_intents_{train,val}.csv`` (in
a seeded order) into one text; ``labels`` lists those intents joined by ``|`` (``billing|refund``).
Validation rows come from the validation intents only, so half of their phrasings never occur in
training. The output is a pure function of the intent CSVs and the seed.
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

__all__ = ["make_support_multilabel"]

_HERE = Path(__file__).parent


def _rows(source: Path, count: int, seed: int) -> list[tuple[str, str]]:
    with open(source, newline="") as f:
        messages = [(row["text"], row["label"]) for row in csv.DictReader(f)]
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts: dict[str, str] = {}
        for _ in range(rng.choice((1, 1, 2, 2, 3))):
            text, label = rng.choice(messages)
            parts.setdefault(label, text)  # one message per intent
        out.append((" and ".join(parts.values()), "|".join(sorted(parts))))
    return out


def make_support_multilabel(out_dir: str | Path, train_rows: int = 320, val_rows: int = 96,
                            seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.csv`` and ``val.csv`` (columns ``text``, ``labels``) into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, count in (("train", train_rows), ("val", val_rows)):
        path = out / f"{split}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "labels"])
            writer.writerows(_rows(_HERE / f"support_intents_{split}.csv", count, seed))
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":
    print(*make_support_multilabel(sys.argv[1] if len(sys.argv) > 1 else "multilabel"))
