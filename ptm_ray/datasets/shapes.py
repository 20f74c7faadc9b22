"""A synthetic object-detection dataset made by the project: filled circles, squares and triangles.

Each image is a random crop of one of scikit-image's bundled photos (astronaut, coffee, chelsea, rocket,
camera), resized, with 1-3 shapes drawn on it in random colours, sizes and places (shapes never overlap,
so every object is fully visible). Boxes are exact: the bounding box of the pixels each shape painted.

    python -m ptm_ray.datasets.shapes /tmp/shapes            # COCO: train.json, val.json, images/
    python -m ptm_ray.datasets.shapes /tmp/shapes_yolo yolo  # YOLO: images/, labels/, data.yaml

Layout under ``root``: ``images/{train,val}/img_NNNN.png`` always; then ``train.json`` and ``val.json``
(COCO, ``file_name`` relative to ``root``), or ``labels/{train,val}/img_NNNN.txt`` (``cls cx cy w h``,
normalised) and ``data.yaml`` (``names``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ptm_ray._optional import require_extra

__all__ = ["CLASSES", "make_shapes"]

CLASSES = ("circle", "square", "triangle")
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def make_shapes(
    root: str | Path,
    num_train: int = 200,
    num_val: int = 50,
    image_size: int = 128,
    seed: int = 0,
    fmt: str = "coco",
) -> dict[str, Path]:
    """Write the dataset under ``root``; the same ``seed`` writes the same bytes.

    Args:
        root: target folder (created; existing files of the same names are overwritten).
        num_train, num_val: images per split.
        image_size: side of the square images; shapes are 12-48 px (at most half the side).
        seed: seed of the one random generator behind backgrounds, shapes and colours.
        fmt: ``coco`` or ``yolo`` (see the module docstring for each layout).

    Returns:
        ``{"root", "train", "val"}`` plus ``"data_yaml"`` for yolo: ``train``/``val`` are the COCO json
        files, or for yolo the image folders.
    """
    if fmt not in ("coco", "yolo"):
        raise ValueError(f"fmt={fmt!r}: expected 'coco' or 'yolo'")
    if image_size < 32:
        raise ValueError(f"image_size={image_size}: shapes need at least 32 px")
    root = Path(root)
    rng = np.random.default_rng(seed)
    photos = _photos()
    paths: dict[str, Path] = {"root": root}
    for split, count in (("train", num_train), ("val", num_val)):
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        samples = []
        for index in range(count):
            image = _background(rng, photos, image_size)
            objects = _draw_objects(image, rng, int(rng.integers(1, 4)))
            name = f"img_{index:04d}.png"
            image.save(folder / name)
            samples.append((name, objects))
        if fmt == "coco":
            paths[split] = _write_coco(root, split, samples, image_size)
        else:
            _write_yolo_labels(root, split, samples, image_size)
            paths[split] = folder
    if fmt == "yolo":
        paths["data_yaml"] = root / "data.yaml"
        paths["data_yaml"].write_text("names:\n" + "".join(f"  - {name}\n" for name in CLASSES))
    return paths


def _photos() -> list[np.ndarray]:
    skimage_data = require_extra("skimage.data", "demo", "the shapes demo data (photo backgrounds)")

    photos = []
    for name in _PHOTOS:
        pixels = getattr(skimage_data, name)()
        photos.append(np.stack([pixels] * 3, axis=-1) if pixels.ndim == 2 else pixels[..., :3])
    return photos


def _background(rng: np.random.Generator, photos: list[np.ndarray], size: int):
    """A random square crop (a quarter to all of the shorter side) of a random photo, resized to ``size``."""
    from PIL import Image

    photo = photos[int(rng.integers(len(photos)))]
    height, width = photo.shape[:2]
    side = int(rng.integers(min(height, width) // 4, min(height, width) + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    return crop.resize((size, size), Image.BILINEAR)


def _draw_objects(image, rng: np.random.Generator, count: int, tries: int = 50) -> list[tuple[int, list[int], tuple]]:
    """Paint up to ``count`` non-overlapping shapes on ``image`` (in place).

    Returns (class index, [x1, y1, x2, y2], colour) per shape; the box is the bounding box of the painted
    pixels with x2/y2 exclusive, so pixel columns x1..x2-1 and rows y1..y2-1 hold the shape.
    """
    from PIL import Image, ImageDraw

    size = image.width
    objects: list[tuple[int, list[int], tuple]] = []
    for _ in range(count):
        for _ in range(tries):
            cls = int(rng.integers(len(CLASSES)))
            side = int(rng.integers(12, min(48, size // 2) + 1))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if not any(_overlap([x, y, x + side, y + side], box) for _, box, _ in objects):
                break
        else:
            break  # the image is full
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        mask = Image.new("L", image.size, 0)
        _draw_shape(ImageDraw.Draw(mask), cls, x, y, side)
        ys, xs = np.nonzero(np.asarray(mask))
        image.paste(colour, mask=mask)
        objects.append((cls, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], colour))
    return objects


def _draw_shape(draw, cls: int, x: int, y: int, side: int) -> None:
    corners = [x, y, x + side - 1, y + side - 1]
    if CLASSES[cls] == "circle":
        draw.ellipse(corners, fill=255)
    elif CLASSES[cls] == "square":
        draw.rectangle(corners, fill=255)
    else:
        draw.polygon([(x + (side - 1) / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=255)


def _overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _write_coco(root: Path, split: str, samples: list, size: int) -> Path:
    images, annotations = [], []
    for image_id, (name, objects) in enumerate(samples, start=1):
        images.append({"id": image_id, "file_name": f"images/{split}/{name}", "width": size, "height": size})
        for cls, (x1, y1, x2, y2), _ in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    path = root / f"{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _write_yolo_labels(root: Path, split: str, samples: list, size: int) -> None:
    folder = root / "labels" / split
    folder.mkdir(parents=True, exist_ok=True)
    for name, objects in samples:
        lines = [
            f"{cls} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}\n"
            for cls, (x1, y1, x2, y2), _ in objects
        ]
        (folder / name).with_suffix(".txt").write_text("".join(lines))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m ptm_ray.datasets.shapes OUT_DIR [coco|yolo]")
    print(make_shapes(sys.argv[1], fmt=sys.argv[2] if len(sys.argv) == 3 else "coco"))
