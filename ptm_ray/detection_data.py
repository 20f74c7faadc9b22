"""Reading, checking and augmenting object-detection data (COCO json or the YOLO folder layout).

A record is one image and its objects::

    {"path": str, "width": int, "height": int,
     "boxes": [[x1, y1, x2, y2], ...],    # floats, pixels, x2/y2 exclusive
     "labels": [category name, ...],
     "origin": {...}}                      # where it came from, for error messages (optional)

``read_coco`` and ``read_yolo`` turn files into records without judging them; ``check_records`` then
checks every box and image and either fails naming the file, annotation/line and image, or leaves the
bad records out and counts them. ``augment`` (train time), ``letterbox`` and ``unletterbox`` move boxes
with the pixels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["SeededAugmentation", "augment", "check_records", "letterbox", "read_coco", "read_yolo", "unletterbox"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_TOLERANCE = 1.0  # px a box may reach outside the image before it counts as wrong (it is clipped)
_FILL = 114  # grey for padding, as YOLO uses


# --- readers ----------------------------------------------------------------------------------------------


def read_coco(json_path: str | Path) -> tuple[list[dict], list[str]]:
    """Records and category names from a COCO detection json (``file_name`` relative to the json's folder).

    Unknown ``category_id``s are kept as their number in ``labels`` for ``check_records`` to report.

    Raises:
        ValueError: if the file is not COCO json (names the file and the missing key).
    """
    json_path = Path(json_path)
    try:
        coco = json.loads(json_path.read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        records = {
            im["id"]: _record(json_path.parent / im["file_name"], im["width"], im["height"], json_path,
                              f"image id {im['id']}")
            for im in coco["images"]
        }
        annotations = coco["annotations"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{json_path}: not a COCO detection json ({type(e).__name__}: {e}); expected keys "
                         "images (id, file_name, width, height), annotations, categories (id, name)") from None
    for ann in annotations:
        record = records.get(ann.get("image_id"))
        if record is None:
            raise ValueError(f"{json_path.name}: annotation {ann.get('id')} refers to image_id {ann.get('image_id')}, "
                             "which is not in images")
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            box = [x, y, x + w, y + h]
        except (KeyError, TypeError, ValueError):
            box = [math.nan] * 4  # check_records reports it
        category = ann.get("category_id")
        _add_box(record, box, names.get(category, str(category)), f"annotation {ann.get('id')}",
                 f"bbox {ann.get('bbox')}", crowd=bool(ann.get("iscrowd", 0)))
    return list(records.values()), list(names.values())


def read_yolo(root: str | Path, split: str) -> tuple[list[dict], list[str]]:
    """Records and category names from ``root/images/<split>/*``, ``root/labels/<split>/<stem>.txt`` (lines
    ``cls cx cy w h``, normalised; a missing file means no objects) and ``root/data.yaml`` (``names``: a
    list, or a dict from class index to name).

    Raises:
        ValueError: if data.yaml or the image folder is missing, or a label line is not five numbers.
    """
    from PIL import Image

    root = Path(root)
    names = _yolo_names(root / "data.yaml")
    image_dir = root / "images" / split
    if not image_dir.is_dir():
        raise ValueError(f"{image_dir}: no such folder; the YOLO layout is images/{split}/ and "
                         f"labels/{split}/ under {root}")
    records = []
    for image_path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
        label_path = root / "labels" / split / (image_path.stem + ".txt")
        try:
            with Image.open(image_path) as image:
                width, height = image.size
        except OSError:
            width = height = 0  # check_records reports the undecodable image
        record = _record(image_path, width, height, label_path, "")
        lines = label_path.read_text().splitlines() if label_path.is_file() else []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            cls, cx, cy, w, h = _yolo_line(line, label_path, number)
            box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
            label = names[cls] if 0 <= cls < len(names) else str(cls)
            _add_box(record, box, label, f"line {number}", f"box {line.strip()!r}")
        records.append(record)
    return records, names


def _yolo_names(path: Path) -> list[str]:
    import yaml

    if not path.is_file():
        raise ValueError(f"{path}: no such file; a YOLO dataset names its classes there (names: [cat, dog, ...])")
    names = (yaml.safe_load(path.read_text()) or {}).get("names")
    if isinstance(names, dict) and sorted(int(k) for k in names) == list(range(len(names))):
        return [str(names[k]) for k in sorted(names, key=int)]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise ValueError(f"{path}: names must be a list of class names or a dict 0..N-1 -> name, got {names!r}")


def _yolo_line(line: str, path: Path, number: int) -> tuple[int, float, float, float, float]:
    parts = line.split()
    try:
        if len(parts) != 5 or float(parts[0]) != int(float(parts[0])):
            raise ValueError
        return (int(float(parts[0])), *(float(v) for v in parts[1:]))
    except ValueError:
        raise ValueError(f"{path.name} line {number}: {line.strip()!r} is not 'class cx cy w h' "
                         "(an integer class and four normalised numbers)") from None


def _record(path: Path, width: int, height: int, source: Path, image_ref: str) -> dict:
    origin = {"file": str(source), "image": image_ref, "boxes": [], "given": []}
    return {"path": str(path), "width": int(width), "height": int(height), "boxes": [], "labels": [], "crowd": [],
            "origin": origin}


def _add_box(record: dict, box: list[float], label: str, ref: str, given: str, crowd: bool = False) -> None:
    """Add a box; ``crowd``: COCO's ``iscrowd`` (a region of many objects: not trained on, ignored by mAP)."""
    record["boxes"].append(box)
    record["labels"].append(label)
    record["crowd"].append(crowd)
    record["origin"]["boxes"].append(ref)
    record["origin"]["given"].append(given)


# --- checks -----------------------------------------------------------------------------------------------


def check_records(records: list[dict], categories: list[str], key: str, on_bad: str = "fail") -> tuple[list[dict], int]:
    """Check every image and box; return (good records with boxes clipped to the image, skipped count).

    A box must have positive width and height, lie inside the image (up to 1 px outside, then clipped)
    and name a known category; an image must exist, decode and have its declared size. Images without
    boxes are fine (negatives).

    Args:
        records: from ``read_coco``/``read_yolo`` (``origin`` optional).
        categories: the known category names.
        key: the config key the data came from, e.g. ``data.train``: every error starts with it.
        on_bad: ``fail`` raises on the first bad record; ``skip`` leaves bad records out and counts them.

    Raises:
        ValueError: e.g. ``data.train: train.json annotation 17 (image img_003.png): bbox [10, 5, 0, 8]
            has non-positive width``.
    """
    if on_bad not in ("fail", "skip"):
        raise ValueError(f"on_bad={on_bad!r}: expected 'fail' or 'skip'")
    known = set(categories)
    good, skipped = [], 0
    for record in records:
        try:
            good.append(_checked(record, known, key))
        except ValueError as e:
            if on_bad == "fail":
                raise ValueError(f"{e} (set data.on_bad_file=skip to leave such images out)") from None
            skipped += 1
    return good, skipped


def _checked(record: dict, known: set[str], key: str) -> dict:
    origin = record.get("origin") or {}
    source = Path(origin.get("file") or record["path"]).name
    image_ref = f" {origin['image']}" if origin.get("image") else ""
    where = f"{key}: {source}{image_ref} (image {Path(record['path']).name})"
    problem = _image_problem(record)
    if problem:
        raise ValueError(f"{where}: {problem}")
    width, height = record["width"], record["height"]
    boxes = []
    for i, (box, label) in enumerate(zip(record["boxes"], record["labels"])):
        ref = origin["boxes"][i] if origin.get("boxes") else f"box {i}"
        given = origin["given"][i] if origin.get("given") else f"box {box}"
        problem = _box_problem(box, label, known, width, height)
        if problem:
            raise ValueError(f"{key}: {source} {ref} (image {Path(record['path']).name}): {given} {problem}")
        x1, y1, x2, y2 = box
        boxes.append([min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                      min(max(x2, 0.0), width), min(max(y2, 0.0), height)])
    return {**record, "boxes": boxes, "labels": list(record["labels"])}


def _image_problem(record: dict) -> str | None:
    from PIL import Image, UnidentifiedImageError

    path = Path(record["path"])
    if not path.is_file():
        return f"image file {path} does not exist"
    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return f"image file {path} does not decode: {e}"
    if size != (record["width"], record["height"]):
        return f"image is {size[0]}x{size[1]} but declared {record['width']}x{record['height']}"
    return None


def _box_problem(box: list[float], label: str, known: set[str], width: int, height: int) -> str | None:
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        return "is not four finite numbers"
    x1, y1, x2, y2 = box
    if x2 <= x1:
        return "has non-positive width"
    if y2 <= y1:
        return "has non-positive height"
    if x1 < -_TOLERANCE or y1 < -_TOLERANCE or x2 > width + _TOLERANCE or y2 > height + _TOLERANCE \
            or min(x2, width) <= max(x1, 0) or min(y2, height) <= max(y1, 0):
        return (f"lies outside the {width}x{height} image (as x1,y1,x2,y2: {[round(v, 2) for v in box]}; "
                f"up to {_TOLERANCE:g} px outside is clipped)")
    if label not in known:
        return f"has category {label!r}, which is not one of {sorted(known)}"
    return None


# --- augmentation and resizing ----------------------------------------------------------------------------


class SeededAugmentation:
    """For preprocessors with a ``seed``: the augmentation draws, seeded by ``train.seed`` and the worker's rank, so
    each data-parallel worker draws its own flips and scales and a rerun draws the same ones. The generator is made
    at the first augmented batch, in the worker process that draws from it."""

    seed: int = 0
    _rng: np.random.Generator | None = None

    def _augment_rng(self) -> np.random.Generator:
        if self._rng is None:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self._rng = np.random.default_rng([self.seed, rank])
        return self._rng


def augment(image, boxes: Tensor, labels: Tensor, rng: np.random.Generator, hflip: float = 0.5,
            scale: tuple[float, float] = (0.75, 1.25), min_visible: float = 0.4):
    """Random horizontal flip, then random scale and translation on a canvas of the same size.

    Zooming in crops, zooming out pads with grey. Boxes move with the pixels and are clipped to the
    canvas; a box with less than ``min_visible`` of its area left on the canvas is dropped, with its label.

    Args:
        image: PIL image.
        boxes: [N, 4] xyxy pixels; labels: [N].
        rng: numpy Generator (one per worker/epoch, seeded by the caller).

    Returns:
        (image, boxes [K, 4], labels [K]), the same size as the input image.
    """
    from PIL import Image

    width, height = image.size
    boxes = boxes.float().reshape(-1, 4).clone()
    if rng.random() < hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    factor = rng.uniform(*scale)
    new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
    dx = int(rng.integers(min(0, width - new_w), max(0, width - new_w) + 1))
    dy = int(rng.integers(min(0, height - new_h), max(0, height - new_h) + 1))
    canvas = Image.new(image.mode, (width, height), (_FILL,) * len(image.getbands()))
    canvas.paste(image.resize((new_w, new_h), Image.BILINEAR), (dx, dy))
    moved = boxes * torch.tensor([new_w / width, new_h / height] * 2) + torch.tensor([dx, dy, dx, dy]).float()
    clipped = torch.stack([moved[:, 0].clamp(0, width), moved[:, 1].clamp(0, height),
                           moved[:, 2].clamp(0, width), moved[:, 3].clamp(0, height)], dim=1)
    keep = _area(clipped) >= min_visible * _area(moved).clamp(min=1e-9)
    return canvas, clipped[keep], labels.reshape(-1)[keep]


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def letterbox(image, size: int) -> tuple[Tensor, float, tuple[int, int]]:
    """Resize keeping the aspect ratio so the longer side is ``size``, pad the rest with grey, centred.

    Returns:
        (float tensor [3, size, size] in 0..1, scale, (pad_x, pad_y)); boxes map into the letterboxed
        image as ``boxes * scale + (pad_x, pad_y, pad_x, pad_y)``; ``unletterbox`` maps back.
    """
    from PIL import Image

    image = image.convert("RGB")
    scale = size / max(image.size)
    new_w, new_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas = Image.new("RGB", (size, size), (_FILL,) * 3)
    canvas.paste(image.resize((new_w, new_h), Image.BILINEAR), (pad_x, pad_y))
    pixels = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return pixels, scale, (pad_x, pad_y)


def unletterbox(boxes: Tensor, scale: float, pad: tuple[int, int], width: int, height: int) -> Tensor:
    """Boxes in letterboxed pixels -> boxes in the original ``width`` x ``height`` image, clipped to it."""
    pad_x, pad_y = pad
    out = (boxes.float() - torch.tensor([pad_x, pad_y, pad_x, pad_y], dtype=torch.float, device=boxes.device)) / scale
    return torch.stack([out[:, 0].clamp(0, width), out[:, 1].clamp(0, height),
                        out[:, 2].clamp(0, width), out[:, 3].clamp(0, height)], dim=1)
