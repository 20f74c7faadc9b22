"""COCO mean average precision for object detection, computed by faster-coco-eval's ``COCOeval``.

faster-coco-eval is a C++ port of pycocotools' ``COCOeval`` (``bbox``): per class and IoU threshold
(.50:.05:.95), detections are matched greedily in score order; crowd ground truth (``iscrowd``) neither
counts as missed nor makes a detection on it a false positive; at most ``max_detections`` detections per
image and class count; classes with no ground truth are left out of the mean. The numbers are the ones
papers and leaderboards quote: mAP@[.5:.95], AP50, AP75 and the small/medium/large area buckets (box area
below 32², below 96², above).

Per-image results are plain numpy arrays, so workers can ``all_gather`` ``state()`` and every rank can
``merge`` and ``compute`` the same numbers::

    metric = MeanAP()
    metric.update(postprocess(outputs), targets)     # per batch
    for other in gathered_states: metric.merge(other)
    metric.compute()                                  # {"map": ..., "map_50": ..., "map_75": ..., "map_small": ...}
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["MeanAP"]

# faster-coco-eval's stats_as_dict names -> ours (torchmetrics' names)
_STATS = {"AP_all": "map", "AP_50": "map_50", "AP_75": "map_75", "AP_small": "map_small", "AP_medium": "map_medium",
          "AP_large": "map_large"}


class MeanAP:
    """Accumulates (predictions, targets) per image; ``compute()`` gives COCO's AP numbers.

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
        ``targets`` ``{"boxes" [N, 4], "labels" [N], "iscrowd" [N] (optional)}`` per image, in the same pixels
        (tensors or arrays)."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets: one of each per image")
        for pred, target in zip(predictions, targets):
            gt_labels = _array(target["labels"], np.int64).reshape(-1)
            crowd = target.get("iscrowd")
            self._images.append({
                "pred_boxes": _array(pred["boxes"], np.float64).reshape(-1, 4),
                "scores": _array(pred["scores"], np.float64).reshape(-1),
                "pred_labels": _array(pred["labels"], np.int64).reshape(-1),
                "gt_boxes": _array(target["boxes"], np.float64).reshape(-1, 4),
                "gt_labels": gt_labels,
                "gt_crowd": np.zeros(len(gt_labels), bool) if crowd is None else _array(crowd, bool).reshape(-1),
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
        """``{"map": mAP@[.5:.95], "map_50", "map_75", "map_small", "map_medium", "map_large"}`` (``map_75`` only
        when .75 is one of the thresholds); -1.0 where undefined, COCO's convention: every value when no image
        has a ground-truth box, a size bucket with no ground truth in it."""
        if not any(len(image["gt_labels"]) for image in self._images):
            return {name: -1.0 for name in self._names()}
        from faster_coco_eval import COCO, COCOeval_faster

        truth, detections = self._coco()
        ground = COCO(truth, print_function=_silent)
        evaluator = COCOeval_faster(ground, ground.loadRes(detections), "bbox", print_function=_silent)
        evaluator.params.iouThrs = self.iou_thresholds
        evaluator.params.maxDets = [1, 10, self.max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        stats = evaluator.stats_as_dict
        return {name: float(stats[key]) for key, name in _STATS.items() if name in self._names()}

    def _names(self) -> list[str]:
        has_75 = bool(np.isclose(self.iou_thresholds, 0.75).any())
        return [name for name in _STATS.values() if name != "map_75" or has_75]

    def _coco(self) -> tuple[dict, list[dict]]:
        """The images as a COCO ground-truth dict and a detection list (xywh boxes, area = box area)."""
        images, annotations, detections, classes = [], [], [], set()
        for image_id, image in enumerate(self._images, start=1):
            images.append({"id": image_id})
            for box, label, crowd in zip(_xywh(image["gt_boxes"]), image["gt_labels"], image["gt_crowd"]):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": int(crowd)})
            for box, score, label in zip(_xywh(image["pred_boxes"]), image["scores"], image["pred_labels"]):
                detections.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
            classes.update(int(c) for c in image["gt_labels"])
        categories = [{"id": c, "name": str(c)} for c in sorted(classes)]
        return {"images": images, "annotations": annotations, "categories": categories}, detections


def _silent(*args: Any, **kwargs: Any) -> None:
    """faster-coco-eval prints its progress and summary table through this."""


def _array(value: Any, dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _xywh(boxes: np.ndarray) -> list[list[float]]:
    """xyxy [N, 4] -> COCO's [x, y, width, height] lists."""
    return [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in boxes.tolist()]
