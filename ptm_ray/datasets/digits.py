"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes) written as an image folder.

    python -m ptm_ray.datasets.digits /tmp/digits      # -> /tmp/digits/<digit>/<index>.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

__all__ = ["make_digits_folder"]


def make_digits_folder(out_dir: str | Path, size: int = 32, per_class: int | None = None) -> Path:
    """Write the digits as ``out_dir/<digit>/<index>.png`` (grey, upscaled to ``size``); returns ``out_dir``.

    Args:
        out_dir: target folder; reused as is when it already holds a complete copy.
        size: side of the written square images (bilinear upscaling of the 8x8 originals).
        per_class: keep only the first N images of each digit (few-shot experiments); all when None.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

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


if __name__ == "__main__":
    print(make_digits_folder(sys.argv[1] if len(sys.argv) > 1 else "digits"))
