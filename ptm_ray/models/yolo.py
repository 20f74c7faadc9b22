"""A YOLOv8-style single-stage, anchor-free object detector in plain PyTorch (our own code, Apache-2.0).

The architecture follows the YOLOv8 paper/design notes, written from scratch:

* a CSP backbone of ``Conv`` (Conv2d + BatchNorm + SiLU) and ``C2f`` stages, ``SPPF`` at the end;
* a PAN-FPN neck over P3/P4/P5 (strides 8/16/32);
* a decoupled head per level: a box branch predicting ``4 * reg_max`` distribution-focal-loss (DFL) bins
  (left/top/right/bottom distances from the cell centre, in cells) and a class branch.

``YOLO.forward`` returns the raw maps, one ``[B, 4 * reg_max + num_classes, H / s, W / s]`` tensor per
stride ``s``; ``YOLOLoss`` trains on them and ``postprocess`` turns them into boxes. Depth for freezing
comes from ``yolo_blocks``: stem, stage1..stage4, neck and the class-agnostic part of the head; the
class-prediction convs are the task head that ``replace_head`` re-creates for new classes.

Example::

    model = YOLO(num_classes=3)                       # YOLOv8n-sized: width 0.25, depth 0.33
    outputs = model(images)                           # images: [B, 3, H, W], H and W multiples of 32
    loss, parts = YOLOLoss(3)(outputs, targets)       # targets: [{"boxes": xyxy pixels, "labels": ...}]
    detections = postprocess(outputs)                 # [{"boxes", "scores", "labels"}] per image
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, complete_box_iou_loss

from ptm_ray.freeze import Block

__all__ = ["STRIDES", "YOLO", "YOLOLoss", "postprocess", "replace_head", "yolo_blocks"]

STRIDES = (8, 16, 32)
_BASE_CHANNELS = (64, 128, 256, 512, 1024)  # stem, stage1..stage4 at width 1.0
_MAX_CHANNELS = 1024


# --- building blocks ------------------------------------------------------------------------------------


class Conv(nn.Sequential):
    """Conv2d (no bias) + BatchNorm + SiLU; ``padding`` keeps the size at stride 1."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03),  # YOLOv8's BatchNorm settings
            nn.SiLU(inplace=True),
        )


class Bottleneck(nn.Module):
    """Two 3x3 convs with an optional residual connection."""

    def __init__(self, channels: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(channels, channels, 3)
        self.cv2 = Conv(channels, channels, 3)
        self.add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block with two halves: one half runs through ``n`` bottlenecks, every output is concatenated."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.hidden = c_out // 2
        self.cv1 = Conv(c_in, 2 * self.hidden, 1)
        self.blocks = nn.ModuleList(Bottleneck(self.hidden, shortcut) for _ in range(n))
        self.cv2 = Conv((2 + n) * self.hidden, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        parts = list(self.cv1(x).chunk(2, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools, concatenated with their input."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 5) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden, 1)
        self.pool = nn.MaxPool2d(kernel, stride=1, padding=kernel // 2)
        self.cv2 = Conv(4 * hidden, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = [self.cv1(x)]
        for _ in range(3):
            pooled.append(self.pool(pooled[-1]))
        return self.cv2(torch.cat(pooled, dim=1))


class _Neck(nn.Module):
    """PAN-FPN: top-down (P5 -> P4 -> P3), then bottom-up (P3 -> P4 -> P5)."""

    def __init__(self, c3: int, c4: int, c5: int, n: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down4 = C2f(c5 + c4, c4, n)
        self.top_down3 = C2f(c4 + c3, c3, n)
        self.down3 = Conv(c3, c3, 3, 2)
        self.bottom_up4 = C2f(c3 + c4, c4, n)
        self.down4 = Conv(c4, c4, 3, 2)
        self.bottom_up5 = C2f(c4 + c5, c5, n)

    def forward(self, p3: Tensor, p4: Tensor, p5: Tensor) -> list[Tensor]:
        t4 = self.top_down4(torch.cat([self.up(p5), p4], dim=1))
        n3 = self.top_down3(torch.cat([self.up(t4), p3], dim=1))
        n4 = self.bottom_up4(torch.cat([self.down3(n3), t4], dim=1))
        n5 = self.bottom_up5(torch.cat([self.down4(n4), p5], dim=1))
        return [n3, n4, n5]


class _Head(nn.Module):
    """Decoupled head per level: ``box`` (to DFL bins), ``cls_stem`` (shared features), ``cls_pred`` (classes)."""

    def __init__(self, channels: tuple[int, ...], num_classes: int, reg_max: int) -> None:
        super().__init__()
        box_hidden = max(16, channels[0] // 4, 4 * reg_max)
        # YOLOv8 widens this with the class count; a fixed width keeps it class-agnostic (re-usable)
        cls_hidden = max(channels[0], 32)
        self.box = nn.ModuleList(
            nn.Sequential(Conv(c, box_hidden, 3), Conv(box_hidden, box_hidden, 3),
                          nn.Conv2d(box_hidden, 4 * reg_max, 1))
            for c in channels
        )
        self.cls_stem = nn.ModuleList(
            nn.Sequential(Conv(c, cls_hidden, 3), Conv(cls_hidden, cls_hidden, 3)) for c in channels
        )
        self.cls_pred = _class_convs(cls_hidden, num_classes)
        for branch in self.box:
            nn.init.constant_(branch[-1].bias, 1.0)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [
            torch.cat([box(x), pred(stem(x))], dim=1)
            for x, box, stem, pred in zip(features, self.box, self.cls_stem, self.cls_pred)
        ]


def _class_convs(c_in: int, num_classes: int) -> nn.ModuleList:
    """One 1x1 class conv per stride, biased so that the initial class probability is about 5 objects per
    640x640 image (YOLOv8's prior): ``log(5 / num_classes / (640 / stride)**2)``."""
    convs = nn.ModuleList(nn.Conv2d(c_in, num_classes, 1) for _ in STRIDES)
    for conv, stride in zip(convs, STRIDES):
        nn.init.constant_(conv.bias, math.log(5 / num_classes / (640 / stride) ** 2))
    return convs


# --- the model --------------------------------------------------------------------------------------------


def _channels(base: int, width: float) -> int:
    """``base * width`` rounded up to a multiple of 8 (at least 8), capped as YOLOv8 caps its widest stage."""
    return max(8, math.ceil(min(base, _MAX_CHANNELS) * width / 8) * 8)


def _repeats(base: int, depth: float) -> int:
    return max(1, round(base * depth))


class YOLO(nn.Module):
    """YOLOv8-style detector; width/depth 0.25/0.33 is the "n" size, 0.5/0.33 "s"; 0.75/0.67 is close to
    "m" (whose widest stage YOLOv8 caps at 576 channels; here it gets 768).

    Args:
        num_classes: number of object classes (no background class: scores are per-class sigmoids).
        width: channel multiplier; every width is rounded up to a multiple of 8, at least 8.
        depth: repeat multiplier for the bottlenecks in each C2f (at least one).
        reg_max: DFL bins per box side; distances are predicted in 0..reg_max-1 cells.

    ``config`` holds the constructor arguments, so ``YOLO(**model.config)`` rebuilds the same shapes.
    """

    def __init__(self, num_classes: int, width: float = 0.25, depth: float = 0.33, reg_max: int = 16) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: a detector needs at least one class")
        self.config: dict[str, Any] = {"num_classes": num_classes, "width": width, "depth": depth, "reg_max": reg_max}
        self.num_classes, self.reg_max = num_classes, reg_max
        c0, c1, c2, c3, c4 = (_channels(c, width) for c in _BASE_CHANNELS)
        n3, n6 = _repeats(3, depth), _repeats(6, depth)
        self.stem = Conv(3, c0, 3, 2)                                          # stride 2
        self.stage1 = nn.Sequential(Conv(c0, c1, 3, 2), C2f(c1, c1, n3, True))  # 4
        self.stage2 = nn.Sequential(Conv(c1, c2, 3, 2), C2f(c2, c2, n6, True))  # 8: P3
        self.stage3 = nn.Sequential(Conv(c2, c3, 3, 2), C2f(c3, c3, n6, True))  # 16: P4
        self.stage4 = nn.Sequential(Conv(c3, c4, 3, 2), C2f(c4, c4, n3, True), SPPF(c4, c4))  # 32: P5
        self.neck = _Neck(c2, c3, c4, n3)
        self.head = _Head((c2, c3, c4), num_classes, reg_max)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Raw maps per stride 8/16/32: ``[B, 4 * reg_max + num_classes, H / s, W / s]`` (box bins, class logits)."""
        p3 = self.stage2(self.stage1(self.stem(images)))
        p4 = self.stage3(p3)
        p5 = self.stage4(p4)
        return self.head(self.neck(p3, p4, p5))


def yolo_blocks(model: YOLO) -> list[Block]:
    """Depth units input to output: stem, stage1..stage4 (with SPPF), neck, head_shared.

    ``head_shared`` is the class-agnostic part of the head (box branches and the class branches' hidden
    convs); the class-prediction convs (``head.cls_pred``) are in no block: they are the task head.
    """
    return [
        Block("stem", ("stem",)),
        *(Block(f"stage{i}", (f"stage{i}",)) for i in range(1, 5)),
        Block("neck", ("neck",)),
        Block("head_shared", ("head.box", "head.cls_stem")),
    ]


def replace_head(model: YOLO, num_classes: int) -> YOLO:
    """Re-create only the class-prediction convs for ``num_classes`` (YOLOv8's class bias init); returns ``model``."""
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes}: a detector needs at least one class")
    old = model.head.cls_pred
    model.head.cls_pred = _class_convs(old[0].in_channels, num_classes).to(old[0].weight.device, old[0].weight.dtype)
    model.num_classes = num_classes
    model.config["num_classes"] = num_classes
    return model


# --- decoding -----------------------------------------------------------------------------------------------


def _flatten(outputs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Raw maps -> (all channels [B, A, 4 * reg_max + C], cell centres [A, 2] in cells, stride per anchor
    [A, 1]); anchors run row-major through stride 8, then 16, then 32."""
    points, strides = [], []
    for x, stride in zip(outputs, STRIDES):
        h, w = x.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
        points.append(torch.stack([xs, ys], dim=-1).reshape(-1, 2).to(x.dtype) + 0.5)
        strides.append(torch.full((h * w, 1), float(stride), device=x.device, dtype=x.dtype))
    flat = torch.cat([x.flatten(2) for x in outputs], dim=2).transpose(1, 2)  # [B, A, channels]
    return flat, torch.cat(points), torch.cat(strides)


def _split(flat: Tensor, reg_max: int) -> tuple[Tensor, Tensor]:
    return flat[..., : 4 * reg_max], flat[..., 4 * reg_max :]


def _decode(bins: Tensor, points: Tensor, reg_max: int) -> Tensor:
    """DFL bins [..., A, 4 * reg_max] -> xyxy boxes in cells: the expected distance of each side's softmax."""
    probs = bins.unflatten(-1, (4, reg_max)).softmax(-1)
    ltrb = probs @ torch.arange(reg_max, device=bins.device, dtype=probs.dtype)
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


@torch.no_grad()
def postprocess(
    outputs: list[Tensor],
    score_threshold: float = 0.25,
    iou_threshold: float = 0.7,
    max_boxes: int = 100,
    reg_max: int = 16,
) -> list[dict[str, Tensor]]:
    """Raw maps -> per-image detections ``{"boxes": [K, 4] xyxy input pixels, "scores": [K], "labels": [K]}``.

    Each anchor keeps its best class; anchors scoring at least ``score_threshold`` go through class-wise
    NMS at ``iou_threshold``; the ``max_boxes`` best survive, highest score first. Boxes are clipped to
    the input size (the stride-8 map's size times 8).
    """
    flat, points, strides = _flatten(outputs)
    bins, logits = _split(flat.float(), reg_max)
    boxes = _decode(bins, points.float(), reg_max) * strides.float()
    height, width = (s * STRIDES[0] for s in outputs[0].shape[-2:])
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, width)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, height)
    scores, labels = logits.sigmoid().max(-1)
    results = []
    for image_boxes, image_scores, image_labels in zip(boxes, scores, labels):
        keep = image_scores >= score_threshold
        b, s, c = image_boxes[keep], image_scores[keep], image_labels[keep]
        keep = batched_nms(b, s, c, iou_threshold)[:max_boxes]  # sorted by score, highest first
        results.append({"boxes": b[keep], "scores": s[keep], "labels": c[keep]})
    return results


# --- loss -------------------------------------------------------------------------------------------------


class YOLOLoss:
    """YOLOv8's detection loss: task-aligned assignment, then CIoU + DFL on boxes and BCE on classes.

    Each part is summed over the batch and divided by the sum of the assigned (soft) class targets, as
    in YOLOv8, then weighted by the gains (box 7.5, cls 0.5, dfl 1.5). Unlike Ultralytics' trainer we
    do not multiply the total by the batch size: the loss does not grow with the batch.

    Args:
        num_classes: classes the model predicts.
        reg_max: DFL bins per box side (the model's ``reg_max``).
        topk, alpha, beta: task-aligned assigner settings (TOOD / YOLOv8: 10, 0.5, 6.0).
    """

    def __init__(
        self,
        num_classes: int,
        reg_max: int = 16,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
        gains: tuple[float, float, float] = (7.5, 0.5, 1.5),
    ) -> None:
        self.num_classes, self.reg_max = num_classes, reg_max
        self.topk, self.alpha, self.beta = topk, alpha, beta
        self.gains = gains

    def __call__(self, outputs: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
        """Returns (total loss, {"box", "cls", "dfl"} unweighted parts as floats).

        Args:
            outputs: the model's raw maps.
            targets: one dict per image: ``boxes`` FloatTensor[N, 4] xyxy in input pixels, ``labels``
                LongTensor[N] in 0..num_classes-1 (N may be 0).
        """
        flat, points, strides = _flatten(outputs)
        bins, logits = _split(flat, self.reg_max)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"outputs carry {logits.shape[-1]} classes but the loss was built for {self.num_classes}")
        boxes_cells = _decode(bins, points, self.reg_max)
        gt_boxes, gt_labels, gt_mask = _pad_targets(targets, flat.device, flat.dtype)
        with torch.no_grad():
            target_boxes, target_scores, fg = self._assign(
                logits.float().sigmoid(), (boxes_cells * strides).float(), (points * strides).float(),
                gt_boxes.float(), gt_labels, gt_mask,
            )
            target_boxes, target_scores = target_boxes.to(flat.dtype), target_scores.to(flat.dtype)
        normaliser = target_scores.sum().clamp(min=1.0)
        loss_cls = F.binary_cross_entropy_with_logits(logits, target_scores, reduction="sum") / normaliser
        loss_box = loss_dfl = flat.new_zeros(())
        if fg.any():
            weight = target_scores.sum(-1)[fg]
            target_cells = target_boxes / strides
            ciou_loss = complete_box_iou_loss(boxes_cells[fg], target_cells[fg], reduction="none")
            loss_box = (ciou_loss * weight).sum() / normaliser
            target_ltrb = _distances(points, target_cells, self.reg_max)[fg]
            loss_dfl = (_dfl(bins[fg].unflatten(-1, (4, self.reg_max)), target_ltrb) * weight).sum() / normaliser
        g_box, g_cls, g_dfl = self.gains
        total = g_box * loss_box + g_cls * loss_cls + g_dfl * loss_dfl
        return total, {"box": loss_box.item(), "cls": loss_cls.item(), "dfl": loss_dfl.item()}

    def _assign(
        self, scores: Tensor, pred_boxes: Tensor, points: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Task-aligned assignment (TOOD): each object takes the ``topk`` anchors inside it with the best
        ``score**alpha * iou**beta``; an anchor claimed twice goes to the object it overlaps most. The
        metric uses plain IoU as TOOD does (YOLOv8 uses CIoU clamped at 0, which can leave an object
        with no positive anchor while its predicted boxes are poor).

        Shapes: scores [B, A, C], pred_boxes [B, A, 4], points [A, 2] (pixels), gt_boxes [B, M, 4],
        gt_labels [B, M], gt_mask [B, M]. Returns target boxes [B, A, 4] (pixels), target scores
        [B, A, C] (one-hot scaled by the normalised alignment) and the foreground mask [B, A].
        """
        batch, anchors, _ = scores.shape
        if gt_boxes.shape[1] == 0:
            no_objects = scores.new_zeros(batch, anchors, dtype=torch.bool)
            return pred_boxes.new_zeros(batch, anchors, 4), torch.zeros_like(scores), no_objects
        # anchors whose centre lies inside each (real) object: [B, M, A]
        x, y = points[:, 0], points[:, 1]
        g = gt_boxes.unsqueeze(-1)  # [B, M, 4, 1]
        inside = (x > g[:, :, 0]) & (x < g[:, :, 2]) & (y > g[:, :, 1]) & (y < g[:, :, 3]) & gt_mask.unsqueeze(-1)
        # alignment metric on candidate pairs only
        overlaps = scores.new_zeros(inside.shape)
        b, m, a = inside.nonzero(as_tuple=True)
        overlaps[b, m, a] = _paired_iou(gt_boxes[b, m], pred_boxes[b, a])
        class_scores = scores.gather(2, gt_labels.unsqueeze(1).expand(-1, anchors, -1)).transpose(1, 2)  # [B, M, A]
        align = class_scores.pow(self.alpha) * overlaps.pow(self.beta) * inside
        # top-k candidates per object, restricted to anchors inside it
        top = align.topk(min(self.topk, anchors), dim=-1).indices
        positive = torch.zeros_like(inside).scatter_(-1, top, True) & inside
        # an anchor claimed by several objects keeps the one it overlaps most
        multiple = positive.sum(1, keepdim=True) > 1
        best = F.one_hot(overlaps.argmax(1), gt_boxes.shape[1]).transpose(1, 2).bool()
        positive = torch.where(multiple, best & inside, positive)
        fg = positive.any(1)
        owner = positive.float().argmax(1)  # [B, A]
        target_boxes = gt_boxes.gather(1, owner.unsqueeze(-1).expand(-1, -1, 4))
        target_labels = gt_labels.gather(1, owner)
        target_scores = F.one_hot(target_labels, scores.shape[-1]).to(scores.dtype) * fg.unsqueeze(-1)
        # scale each object's targets so that its best anchor gets its best IoU
        align = align * positive
        # (align**beta is tiny for poor early boxes: divide by its max as is, not by max + eps)
        best_align = align.amax(-1, keepdim=True).clamp(min=torch.finfo(align.dtype).tiny)
        norm = align * (overlaps * positive).amax(-1, keepdim=True) / best_align
        return target_boxes, target_scores * norm.amax(1).unsqueeze(-1), fg


def _paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of each box in ``a`` [N, 4] with the box at the same index in ``b`` [N, 4] (xyxy) -> [N]."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a + area_b - inter).clamp(min=1e-9)


def _pad_targets(
    targets: list[dict[str, Tensor]], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image targets -> boxes [B, M, 4], labels [B, M], mask [B, M] padded to the most objects M."""
    most = max((len(t["labels"]) for t in targets), default=0)
    boxes = torch.zeros(len(targets), most, 4, device=device, dtype=dtype)
    labels = torch.zeros(len(targets), most, device=device, dtype=torch.long)
    mask = torch.zeros(len(targets), most, device=device, dtype=torch.bool)
    for i, target in enumerate(targets):
        n = len(target["labels"])
        boxes[i, :n] = target["boxes"].to(device, dtype)
        labels[i, :n] = target["labels"].to(device)
        mask[i, :n] = True
    return boxes, labels, mask


def _distances(points: Tensor, boxes: Tensor, reg_max: int) -> Tensor:
    """xyxy boxes (cells) -> left/top/right/bottom distances from the anchor points, within the DFL range."""
    ltrb = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
    return ltrb.clamp(0, reg_max - 1 - 0.01)


def _dfl(bins: Tensor, target: Tensor) -> Tensor:
    """Distribution focal loss: cross-entropy to the two bins around each target distance, weighted by
    closeness; bins [N, 4, reg_max], target [N, 4] -> [N] (mean over the four sides)."""
    left = target.long()
    weight_left = left + 1 - target
    ce_left = F.cross_entropy(bins.flatten(0, 1), left.flatten(), reduction="none").view_as(target)
    ce_right = F.cross_entropy(bins.flatten(0, 1), (left + 1).flatten(), reduction="none").view_as(target)
    return (ce_left * weight_left + ce_right * (1 - weight_left)).mean(-1)
