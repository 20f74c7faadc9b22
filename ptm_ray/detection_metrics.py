"""COCO-style mean average precision for object detection, in numpy (no pycocotools).

The numbers follow COCOeval's ``bbox`` evaluation for area "all" and at most 100 detections per image
and class: per class and IoU threshold (.50:.05:.95), detections are matched greedily in score order to
the unmatched ground-truth box they overlap most (at least the threshold); precision is made monotone
and read at 101 recall points; classes with no ground truth are left out of the mean.

Per-image results are plain numpy arrays, so workers can ``all_gather`` ``state()`` and every rank can
``merge`` and ``compute`` the same numbers::

    metric = MeanAP()
    metric.update(postprocess(outputs), targets)     # per batch
    for other in gathered_states: metric.merge(other)
    metric.compute()                                  # {"map": ..., "map_50": ...}
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["MeanAP"]

_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


class MeanAP:
    """Accumulates (predictions, targets) per image; ``compute()`` gives mAP@[.5:.95] and mAP@.5.

    Args:
        iou_thresholds: IoU thresholds averaged over for ``map`` (COCO: .50, .55, ..., .95); the first
            must be .5 for ``map_50``.
        max_detections: highest-scoring detections per image and class that count (COCO: 100).
    """

    def __init__(self, iou_thresholds: tuple[float, ...] | None = None, max_detections: int = 100) -> None:
        self.iou_thresholds = np.linspace(0.5, 0.95, 10) if iou_thresholds is None else np.asarray(iou_thresholds, float)
        if not np.isclose(self.iou_thresholds[0], 0.5):
            raise ValueError(f"iou_thresholds={self.iou_thresholds.tolist()}: the first must be 0.5 (for map_50)")
        self.max_detections = max_detections
        self._images: list[dict[str, np.ndarray]] = []

    def update(self, predictions: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
        """Add images: ``predictions`` ``{"boxes" [K, 4] xyxy, "scores" [K], "labels" [K]}`` and
        ``targets`` ``{"boxes" [N, 4], "labels" [N]}`` per image, in the same pixels (tensors or arrays)."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets: one of each per image")
        for pred, target in zip(predictions, targets):
            self._images.append({
                "pred_boxes": _array(pred["boxes"], np.float64).reshape(-1, 4),
                "scores": _array(pred["scores"], np.float64).reshape(-1),
                "pred_labels": _array(pred["labels"], np.int64).reshape(-1),
                "gt_boxes": _array(target["boxes"], np.float64).reshape(-1, 4),
                "gt_labels": _array(target["labels"], np.int64).reshape(-1),
            })

    def state(self) -> list[dict[str, np.ndarray]]:
        """The per-image results so far (picklable), for ``merge`` on another worker."""
        return list(self._images)

    def merge(self, state: list[dict[str, np.ndarray]]) -> None:
        """Add the per-image results of another ``MeanAP.state()``."""
        self._images.extend(state)

    def reset(self) -> None:
        self._images = []

    def compute(self) -> dict[str, float]:
        """``{"map": mAP@[.5:.95], "map_50": mAP@.5}``; both -1.0 when no image has a ground-truth box
        (COCO's convention for "undefined")."""
        classes = sorted({int(c) for image in self._images for c in image["gt_labels"]})
        if not classes:
            return {"map": -1.0, "map_50": -1.0}
        ap = np.array([self._class_ap(c) for c in classes])  # [classes, thresholds]
        return {"map": float(ap.mean()), "map_50": float(ap[:, 0].mean())}

    def _class_ap(self, cls: int) -> np.ndarray:
        """AP of one class at every IoU threshold."""
        scores, hits, num_gt = [], [], 0
        for image in self._images:
            gt = image["gt_boxes"][image["gt_labels"] == cls]
            mine = image["pred_labels"] == cls
            order = np.argsort(-image["scores"][mine], kind="mergesort")[: self.max_detections]
            num_gt += len(gt)
            scores.append(image["scores"][mine][order])
            hits.append(_match(image["pred_boxes"][mine][order], gt, self.iou_thresholds))
        scores_all, hits_all = np.concatenate(scores), np.concatenate(hits, axis=1)
        order = np.argsort(-scores_all, kind="mergesort")
        return np.array([_average_precision(h[order], num_gt) for h in hits_all])


def _array(value: Any, dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes [D, 4] x [G, 4] -> [D, G]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _match(dets: np.ndarray, gts: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """True-positive flags [thresholds, D] for score-sorted detections against one image's boxes of a class:
    each detection takes the unmatched box it overlaps most, if that overlap reaches the threshold."""
    hits = np.zeros((len(thresholds), len(dets)), dtype=bool)
    if len(dets) == 0 or len(gts) == 0:
        return hits
    ious = _iou(dets, gts)
    for t, threshold in enumerate(thresholds):
        taken = np.zeros(len(gts), dtype=bool)
        for d in range(len(dets)):
            candidates = np.where(taken, -1.0, ious[d])
            best = int(candidates.argmax())
            if candidates[best] >= min(threshold, 1 - 1e-10):
                taken[best] = hits[t, d] = True
    return hits


def _average_precision(hits: np.ndarray, num_gt: int) -> float:
    """101-point interpolated AP from score-sorted true-positive flags."""
    if num_gt == 0 or len(hits) == 0:
        return 0.0
    true_pos = np.cumsum(hits)
    recall = true_pos / num_gt
    precision = true_pos / np.arange(1, len(hits) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
    at = np.searchsorted(recall, _RECALL_POINTS, side="left")
    return float(np.where(at < len(hits), precision[np.minimum(at, len(hits) - 1)], 0.0).mean())
