"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes) written as an image folder.

    python -m ptm_ray.datasets.digits /tmp/digits      # -> /tmp/digits/<digit>/<index>.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ptm_ray._optional import require_extra

__all__ = ["make_digits_folder", "make_digits_split"]


def make_digits_folder(out_dir: str | Path, size: int = 32, per_class: int | None = None) -> Path:
    """Write the digits as ``out_dir/<digit>/<index>.png`` (grey, upscaled to ``size``); returns ``out_dir``.

    Args:
        out_dir: target folder; reused as is when it already holds a complete copy.
        size: side of the written square images (bilinear upscaling of the 8x8 originals).
        per_class: keep only the first N images of each digit (few-shot experiments); all when None.
    """
    from PIL import Image

    load_digits = require_extra("sklearn.datasets", "demo", "the digits demo data").load_digits

    out = Path(out_dir)
    marker = out / f".complete-{size}-{per_class}"
    if marker.exists():
        return out
    digits = load_digits()
    counts: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        pixels = (image * (255.0 / 16.0)).astype(np.uint8)
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).save(folder / f"{index:04d}.png")
    marker.touch()
    return out


def make_digits_split(root: str | Path, shots: int, val_per_class: int = 30, size: int = 32) -> tuple[Path, Path]:
    """A few-shot split: ``root/train_<shots>`` with the first ``shots`` digits of each class and
    ``root/val`` with the last ``val_per_class`` of each class (never trained on, the same for every
    ``shots``); returns (train folder, validation folder). Reused when already written."""
    from PIL import Image

    load_digits = require_extra("sklearn.datasets", "demo", "the digits demo data").load_digits

    root = Path(root)
    train, val = root / f"train_{shots}", root / "val"
    digits = load_digits()
    if not 0 < shots <= len(digits.target) // 10 - val_per_class:
        raise ValueError(f"shots={shots}: digits has about {len(digits.target) // 10} images per class and "
                         f"{val_per_class} are held out for validation")
    for split, pick in ((train, slice(None, shots)), (val, slice(-val_per_class, None))):
        marker = split / f".complete-{size}"
        if marker.exists():
            continue
        for label in range(10):
            (split / str(label)).mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(digits.target == label)[pick]:
                pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).save(split / str(label) / f"{i}.png")
        marker.touch()
    return train, val


if __name__ == "__main__":
    print(make_digits_folder(sys.argv[1] if len(sys.argv) > 1 else "digits"))
