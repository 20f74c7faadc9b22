"""Object detection: boxes and classes per image; COCO mAP@[.5:.95] and mAP@.5 on validation.

Data (``data.format``):

* ``coco``: ``data.train`` and ``data.validation`` are COCO detection json files (``file_name`` relative
  to the json's folder); without ``data.validation``, ``data.val_fraction`` of the images is split off.
* ``yolo``: ``data.train`` is a folder with ``data.yaml`` (``names``), ``images/{train,val}`` and
  ``labels/{train,val}`` (``cls cx cy w h`` normalised); ``data.validation`` may name another such folder.

Every box is checked on the driver (``ptm_ray.detection_data.check_records``: inside the image, positive
area, a known category; the image decodes at its declared size). A bad image fails the run naming the file
and annotation, or with ``data.on_bad_file=skip`` is left out and counted. The labels (the checkpoint's
``labels``, which size the class head) are the category names of the training data.

Ray datasets have rows ``input`` (the image bytes) and ``target`` (JSON ``{"boxes": [[x1, y1, x2, y2],
...], "labels": [name, ...]}`` in pixels of that image). The detector families (``ptm_ray.models.detection``)
bring ``loss``, ``evaluate_batch`` and ``detect``; this module turns their outputs into metrics and
predictions: ``{"boxes": [[x1, y1, x2, y2], ...] (original pixels), "labels": [...], "scores": [...]}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ptm_ray.models.base import Detector
from ptm_ray.tasks.base import Task, WorkerContext, all_reduce, gather_objects, loss_stats, parse_options
from ptm_ray.tasks.registry import register_task

__all__ = ["DetectionTask", "read_detection_records"]

EVAL_SCORE_THRESHOLD = 0.01  # detections that count towards mAP (COCO evaluations use 0.001-0.05)
EVAL_MAX_BOXES = 100  # COCO's maxDets


def _format(cfg) -> str:
    if cfg.format in ("coco", "yolo"):
        return cfg.format
    if cfg.format == "auto":
        path = Path(cfg.train).expanduser()
        if path.suffix.lower() == ".json":
            return "coco"
        if (path / "data.yaml").is_file():
            return "yolo"
    raise ValueError(f"data.format={cfg.format}: model.task=detection reads data.format=coco (data.train: a COCO json "
                     "file) or data.format=yolo (data.train: a folder with data.yaml, images/ and labels/)")


def read_detection_records(cfg) -> tuple[list[dict], list[dict], list[str], dict[str, list[str]]]:
    """(train records, validation records, category names, skipped image paths per config key), checked."""
    from ptm_ray.detection_data import check_records, read_coco, read_yolo

    fmt = _format(cfg)
    root = str(Path(cfg.train).expanduser().resolve())
    if fmt == "coco":
        train, categories = read_coco(root)
        val, val_categories = read_coco(Path(cfg.validation).expanduser().resolve()) if cfg.validation else (None, None)
    else:
        train, categories = read_yolo(root, "train")
        val_root = str(Path(cfg.validation).expanduser().resolve()) if cfg.validation else root
        val, val_categories = read_yolo(val_root, "val")
    if val_categories is not None and val_categories != categories:
        raise ValueError(f"data.validation: categories {val_categories} differ from data.train's {categories}")
    if len(categories) < 1:
        raise ValueError(f"data.train: {cfg.train} names no categories")
    skipped: dict[str, list[str]] = {}
    if val is None:  # a fixed, seeded split: part of the data, not of the run
        order = np.random.default_rng(0).permutation(len(train))
        num_val = max(1, round(len(train) * cfg.val_fraction))
        val, train = [train[i] for i in order[:num_val]], [train[i] for i in order[num_val:]]
    checked = {}
    for key, records in (("data.train", train), ("data.validation", val)):
        good, count = check_records(records, categories, key, cfg.on_bad_file)
        if count:
            kept = {r["path"] for r in good}
            skipped[key] = [r["path"] for r in records if r["path"] not in kept]
            print(f"[ptm_ray] {key}: skipped {count} bad image(s) of {len(records)}, e.g. {skipped[key][:3]}")
        if not good:
            raise ValueError(f"{key}: no usable images left in {cfg.train if key == 'data.train' else cfg.validation}")
        checked[key] = good
    return checked["data.train"], checked["data.validation"], list(categories), skipped


def _target_json(record: dict) -> str:
    target = {"boxes": record["boxes"], "labels": record["labels"]}
    if any(record.get("crowd", ())):
        target["iscrowd"] = [int(c) for c in record["crowd"]]
    return json.dumps(target)


def _targets(batch_targets, labels: list[str], crowd: bool = False) -> list[dict[str, torch.Tensor]]:
    """Rows' ``target`` JSON -> ``{"boxes" [N, 4] float, "labels" [N] class index}`` per image.

    COCO crowd regions (``iscrowd``) are left out (training, as torchvision's references do), or kept with an
    ``iscrowd`` flag per box for ``MeanAP`` (``crowd=True``, evaluation).
    """
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for text in batch_targets:
        target = json.loads(str(text))
        flags = torch.tensor(target.get("iscrowd") or [0] * len(target["labels"]), dtype=torch.bool)
        keep = torch.ones_like(flags) if crowd else ~flags
        boxes = torch.tensor(target["boxes"], dtype=torch.float).reshape(-1, 4)[keep]
        classes = torch.tensor([index[name] for name in target["labels"]], dtype=torch.long)[keep]
        out.append({"boxes": boxes, "labels": classes} | ({"iscrowd": flags} if crowd else {}))
    return out


@register_task
class DetectionTask(Task):
    """Faster R-CNN and YOLO: boxes + classes; val_loss, val_map (COCO's mAP@[.5:.95]), val_map_50, val_map_75 and
    val_map_small/medium/large (faster-coco-eval's COCOeval; crowd regions ignored)."""

    name = "detection"
    metric, mode = "val_map", "max"
    head = "detector"
    requires = (Detector,)
    modalities = ("image",)
    stat_names = ("loss_sum", "images")

    def inspect(self, cfg, modality):
        from ptm_ray.data import DataSummary

        train, val, categories, skipped = read_detection_records(cfg.data)
        rows = lambda records: [(r["path"], _target_json(r)) for r in records]  # noqa: E731
        return DataSummary(categories, len(train), len(val), rows(train), rows(val), skipped)

    def datasets(self, summary, cfg):
        from ptm_ray.data import media_datasets

        return media_datasets(summary, cfg, "target")

    def train_step(self, ctx: WorkerContext, net, batch):
        targets = _targets(batch["target"], ctx.labels)
        inputs = ctx.preprocessor(list(batch["input"]), targets, train=True)
        loss = ctx.family.loss(net, _to(inputs, ctx.device))
        return loss, loss_stats(loss, len(targets), ctx.device)

    def evaluate(self, ctx, model, batches, autocast):
        from ptm_ray.detection_metrics import MeanAP

        metric = MeanAP(max_detections=EVAL_MAX_BOXES)
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for batch in batches:
            scored = _targets(batch["target"], ctx.labels, crowd=True)
            targets = _targets(batch["target"], ctx.labels)
            inputs = _to(ctx.preprocessor(list(batch["input"]), targets, train=False), ctx.device)
            with autocast():
                loss, detections = ctx.family.evaluate_batch(model, inputs, EVAL_SCORE_THRESHOLD, EVAL_MAX_BOXES)
            metric.update([{k: v.float().cpu() for k, v in d.items()} for d in detections], scored)
            sums += loss_stats(loss, len(targets), ctx.device)
        all_reduce(sums)
        merged = MeanAP(max_detections=EVAL_MAX_BOXES)
        merged.merge(gather_objects(metric.state()))  # every rank computes mAP over every validation image
        scores = merged.compute()
        return {"val_loss": (sums[0] / sums[1].clamp(min=1)).item(), **{f"val_{k}": v for k, v in scores.items()}}

    @torch.no_grad()
    def predict(self, artifact, inputs, score_threshold: float = 0.25, max_boxes: int = 100):
        """Per image ``{"boxes": [[x1, y1, x2, y2], ...] in original pixels, "labels": [...], "scores": [...]}``,
        best first: at most ``max_boxes`` detections scoring at least ``score_threshold``."""
        batch = artifact.batch(inputs)
        found = artifact.family.detect(artifact.model, batch, float(score_threshold), int(max_boxes))
        return [{"boxes": [[round(float(v), 2) for v in box] for box in d["boxes"].tolist()],
                 "labels": [artifact.labels[int(i)] for i in d["labels"].tolist()],
                 "scores": [round(float(s), 4) for s in d["scores"].tolist()]} for d in found]

    def describe(self, prediction):
        boxes = [f"{label} {score:.3f} at [{', '.join(f'{v:g}' for v in box)}]"
                 for label, score, box in zip(prediction["labels"], prediction["scores"], prediction["boxes"])]
        return f"{len(boxes)} box(es)" + (": " + "; ".join(boxes) if boxes else "")

    def request_options(self, parameters, settings):
        limit = int(settings.get("max_boxes", 300))

        class Options(BaseModel):
            model_config = ConfigDict(extra="forbid")
            score_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
            max_boxes: int = Field(default=min(100, limit), ge=1, le=limit)

        return parse_options(Options, parameters, hint=f"detection takes score_threshold in [0, 1] and max_boxes in "
                                                        f"1..{limit}, the server's serve.max_boxes")


def _to(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of a batch (images, masks, targets) on ``device``; frames, sizes and functions stay as they are."""
    from ptm_ray.checkpoint import to_device

    return inputs if device.type == "cpu" else to_device(inputs, device)
