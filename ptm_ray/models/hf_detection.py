"""Hugging Face object detectors (``hf:``): DETR, Conditional/Deformable/DAB-DETR, Table Transformer, RT-DETR
(v1, v2) and YOLOS, through ``AutoModelForObjectDetection``, beside Faster R-CNN and YOLO
(``ptm_ray.models.detection``).

Blocks (``ptm_ray.models.layout.discover_detector_blocks``): the backbone's stem and stages, then each
transformer layer of the encoder and decoder; the class and box predictors are the head (a checkpoint's
class head of another size is replaced, as for every ``hf:`` model).

Preprocessing is the checkpoint's own image processor (rescale, normalisation, and its post-processing of
the raw queries into boxes), resizing every image to one square side: ``data.image_size``, else the
processor's own (RT-DETR 640, DETR its shortest edge, 800). A square keeps a batch free of padding, so a box
normalised to its image means the same in training, in batches of any size and in
``transformers.pipeline("object-detection")``, which loads the processor saved beside the weights. DETR-family checkpoints were pretrained on images whose
aspect ratio was kept; the square changes it (as RT-DETR's own processor does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptm_ray.config import Config, ModelConfig
from ptm_ray.detection_data import SeededAugmentation
from ptm_ray.freeze import Block
from ptm_ray.models.base import ModelRef, Preprocessor
from ptm_ray.models.hf import HFFamily, set_label_maps
from ptm_ray.models.hf_types import refuse_head
from ptm_ray.models.hf_vision import _field
from ptm_ray.models.layout import discover_detector_blocks

__all__ = ["HFDetectionFamily", "HFDetectionPreprocessor"]


def _load_processor(location: str | Path, image_size: int | None, name: str) -> Any:
    """The image processor at ``location``, resizing to a square of ``image_size`` (its own size if None)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(str(location))
    except (OSError, ValueError) as e:
        raise ValueError(f"model.name={name}: no image processor there (preprocessor_config.json, which every hub "
                         f"detector has): {str(e).splitlines()[0]}") from None
    side = image_size or _native_side(processor.size)
    return AutoImageProcessor.from_pretrained(str(location), size={"height": side, "width": side})


def _native_side(size: Any) -> int:
    """The square's side from a processor's own size: the larger of ``height``/``width`` (RT-DETR: 640), else
    its shortest edge (DETR: 800, of 800 shortest / 1333 longest), else its longest edge."""
    values = {k: _field(size, k) for k in ("height", "width", "shortest_edge", "longest_edge")}
    if values["height"] and values["width"]:
        return int(max(values["height"], values["width"]))
    side = values["shortest_edge"] or values["longest_edge"]
    if not side:
        raise ValueError(f"the image processor gives no size ({size}); set data.image_size")
    return int(side)


class HFDetectionPreprocessor(SeededAugmentation, Preprocessor):
    """Encoded images (+ boxes at train time) -> the detector's ``pixel_values`` (and ``pixel_mask``), targets
    as Hugging Face detectors take them (``class_labels``, ``boxes`` as normalised centre x, y, width, height),
    and each image's size for post-processing. ``augment=light`` flips, scales and shifts (seeded by
    ``train.seed`` and the worker's rank), moving the boxes with the pixels, as for Faster R-CNN and YOLO."""

    def __init__(self, processor: Any, image_size: int, augment: str = "none", hflip: float = 0.0,
                 seed: int = 0) -> None:
        self.processor, self.image_size = processor, image_size
        self.augment, self.hflip, self.seed = augment, hflip, seed

    def __call__(self, images: list[bytes], targets: list[dict[str, torch.Tensor]] | None = None,
                 train: bool = False) -> dict[str, Any]:
        """``images`` [B, 3, S, S]; ``sizes`` (height, width) of each image; ``targets`` when given; and
        ``postprocess``, the processor's own decoding of the model's outputs (``detections``)."""
        from ptm_ray.detection_data import augment
        from ptm_ray.models.vision import decode_image

        pictures, labels = [], []
        for i, data in enumerate(images):
            image = decode_image(data)
            if targets is not None:
                boxes, classes = targets[i]["boxes"].float().reshape(-1, 4), targets[i]["labels"].long().reshape(-1)
                if train and self.augment == "light":
                    image, boxes, classes = augment(image, boxes, classes, self._augment_rng(), hflip=self.hflip)
                labels.append({"class_labels": classes, "boxes": _normalised_centres(boxes, image.width, image.height)})
            pictures.append(image)
        encoded = self.processor(images=pictures, return_tensors="pt")
        batch: dict[str, Any] = {"images": encoded["pixel_values"], "sizes": [(p.height, p.width) for p in pictures],
                                 "postprocess": self.detections}
        if "pixel_mask" in encoded:
            batch["pixel_mask"] = encoded["pixel_mask"]
        if targets is not None:
            batch["targets"] = labels
        return batch

    def detections(self, outputs: Any, sizes: list[tuple[int, int]], score_threshold: float,
                   max_boxes: int) -> list[dict[str, torch.Tensor]]:
        """The processor's ``post_process_object_detection``: per image ``{boxes (pixels), scores, labels}`` scoring
        at least ``score_threshold``, best first, at most ``max_boxes``."""
        found = self.processor.post_process_object_detection(outputs, threshold=score_threshold, target_sizes=sizes)
        out = []
        for d in found:
            order = torch.argsort(d["scores"], descending=True, stable=True)[:max_boxes]
            out.append({"boxes": d["boxes"][order], "scores": d["scores"][order], "labels": d["labels"][order]})
        return out

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.processor.save_pretrained(path)
        meta = {"kind": "hf-detection", "image_size": self.image_size, "augment": self.augment, "hflip": self.hflip,
                "seed": self.seed}
        (path / "preprocessor.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: Path) -> "HFDetectionPreprocessor":
        meta = json.loads((path / "preprocessor.json").read_text())
        processor = _load_processor(path, meta["image_size"], str(path))
        return cls(processor, meta["image_size"], meta["augment"], meta["hflip"], meta.get("seed", 0))


def _normalised_centres(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pixel boxes (x1, y1, x2, y2) -> (centre x, centre y, width, height) as fractions of the image."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    scale = torch.tensor([width, height, width, height], dtype=torch.float)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1) / scale


class HFDetectionFamily(HFFamily):
    """``hf:`` object detectors (``AutoModelForObjectDetection``)."""

    name = "hf-detection"
    modality = "image"
    preprocessor_class = HFDetectionPreprocessor
    auto_classes = {"detector": "AutoModelForObjectDetection"}

    def configure(self, config: Any, head: str, labels: list[str], cfg: ModelConfig) -> None:
        refuse_head(self.name, config, head, cfg)
        set_label_maps(config, labels)
        # the checkpoint holds the backbone's weights: never fetch timm's ImageNet ones on top (no network here)
        for holder in (config, getattr(config, "backbone_config", None)):
            if holder is not None and getattr(holder, "use_pretrained_backbone", False):
                holder.use_pretrained_backbone = False

    def blocks(self, model: nn.Module) -> list[Block]:
        return discover_detector_blocks(model)

    def preprocessor(self, ref: ModelRef, model: nn.Module, cfg: Config) -> HFDetectionPreprocessor:
        processor = _load_processor(ref.location, cfg.data.image_size, cfg.model.name)
        side = int(_field(processor.size, "height"))
        return HFDetectionPreprocessor(processor, side, cfg.data.augment, cfg.data.hflip, cfg.train.seed)

    def save_ecosystem_files(self, model: nn.Module, preprocessor: Preprocessor, labels: list[str],
                             path: Path) -> None:
        """The image processor beside the weights: ``pipeline("object-detection", model=<ckpt>/model)`` then
        resizes and decodes as ptm_ray does."""
        preprocessor.processor.save_pretrained(path)

    # --- Detector ---------------------------------------------------------------------------------------
    @staticmethod
    def _forward(model: nn.Module, inputs: dict[str, Any], labels: list[dict[str, torch.Tensor]] | None = None):
        extra = {"pixel_mask": inputs["pixel_mask"]} if "pixel_mask" in inputs else {}
        return model(pixel_values=inputs["images"], labels=labels, **extra)

    def loss(self, net: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The model's own loss (Hungarian matching of queries to boxes, class + L1 + GIoU terms)."""
        return self._forward(net, inputs, inputs["targets"]).loss

    @torch.no_grad()
    def evaluate_batch(self, model: nn.Module, inputs: dict[str, Any], score_threshold: float,
                       max_boxes: int) -> tuple[float, list[dict[str, torch.Tensor]]]:
        """(validation loss, detections in original pixels) from one eval-mode forward pass with the targets."""
        outputs = self._forward(model, inputs, inputs["targets"])
        return float(outputs.loss), inputs["postprocess"](outputs, inputs["sizes"], score_threshold, max_boxes)

    @torch.no_grad()
    def detect(self, model: nn.Module, inputs: dict[str, Any], score_threshold: float,
               max_boxes: int) -> list[dict[str, torch.Tensor]]:
        return inputs["postprocess"](self._forward(model, inputs), inputs["sizes"], score_threshold, max_boxes)
