"""Hugging Face image classifiers (``hf:``): ViT, DeiT, BEiT, ConvNeXt, Swin, ResNet, ... through
``AutoModelForImageClassification``.

Blocks are discovered from the module tree (``ptm_ray.models.layout``): the patch or stem embeddings, then
each layer (ViT, DeiT, BEiT) or stage (ConvNeXt, Swin, ResNet) with the final norm on the last one; the
classifier is the head. Preprocessing comes from the checkpoint's image processor (size, crop, mean/std,
resampling), translated to the same timm transform the ``timm`` family uses (``ImagePreprocessor``), and
is saved with the checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ptm_ray.config import Config, ModelConfig
from ptm_ray.freeze import Block
from ptm_ray.models.base import ModelRef
from ptm_ray.models.hf import HFFamily, set_label_maps
from ptm_ray.models.hf_types import refuse_head
from ptm_ray.models.layout import discover_blocks
from ptm_ray.models.vision import ImagePreprocessor

__all__ = ["HFVisionFamily", "timm_data_config"]

_INTERPOLATION = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def timm_data_config(processor: Any) -> dict[str, Any]:
    """A Hugging Face image processor's resize, crop and normalisation as a timm data config.

    With ``do_center_crop``: resize to ``size`` (``height`` or ``shortest_edge``), centre-crop ``crop_size``
    (timm keeps the aspect ratio where Hugging Face resizes to a square first: the same for square images).
    ``size={height, width}`` alone resizes to exactly that (timm's ``squash``). ``size={shortest_edge}``
    alone resizes the short side, or, as ConvNeXt's processor does with ``crop_pct``, resizes it to
    ``shortest_edge / crop_pct`` and centre-crops ``shortest_edge``.
    """
    height, width, shortest = (_field(processor.size, k) for k in ("height", "width", "shortest_edge"))
    crop = processor.crop_size if getattr(processor, "do_center_crop", False) else None
    if crop and (height or shortest):
        side = (_field(crop, "height"), _field(crop, "width"))
        crop_pct, mode = side[0] / (height or shortest), "center"
    elif height and width:
        side, crop_pct, mode = (height, width), 1.0, "squash"
    elif shortest:
        side, crop_pct, mode = (shortest, shortest), float(getattr(processor, "crop_pct", None) or 1.0), "center"
    else:
        raise ValueError(f"image processor {type(processor).__name__} gives no size (size={processor.size})")
    normalize = getattr(processor, "do_normalize", True)
    return {
        "input_size": (3, int(side[0]), int(side[1])),
        "interpolation": _INTERPOLATION.get(int(getattr(processor, "resample", 3) or 3), "bicubic"),
        "mean": tuple(processor.image_mean) if normalize else (0.0, 0.0, 0.0),
        "std": tuple(processor.image_std) if normalize else (1.0, 1.0, 1.0),
        "crop_pct": crop_pct,
        "crop_mode": mode,
    }


def _field(size: Any, key: str) -> Any:
    """``size[key]`` of a dict or ``size.key`` of transformers' ``SizeDict``; None where absent."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class HFVisionFamily(HFFamily):
    """``hf:`` image classifiers (``AutoModelForImageClassification``)."""

    name = "hf-vision"
    modality = "image"
    preprocessor_class = ImagePreprocessor
    auto_classes = {"classifier": "AutoModelForImageClassification"}

    def configure(self, config: Any, head: str, labels: list[str], cfg: ModelConfig) -> None:
        refuse_head(self.name, config, head, cfg)
        set_label_maps(config, labels)

    def blocks(self, model: nn.Module) -> list[Block]:
        return discover_blocks(model)

    def preprocessor(self, ref: ModelRef, model: nn.Module, cfg: Config) -> ImagePreprocessor:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(ref.location, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ValueError(f"model.name={cfg.model.name}: no image processor there (preprocessor_config.json, "
                             f"which every hub image model has): {str(e).splitlines()[0]}") from None
        data_config = timm_data_config(processor)
        if cfg.data.image_size:
            data_config["input_size"] = (3, cfg.data.image_size, cfg.data.image_size)
        return ImagePreprocessor(data_config, cfg.data.augment, cfg.data.hflip)

    # --- Classifier ---------------------------------------------------------------------------------
    def logits(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(pixel_values=inputs["pixel_values"]).logits
