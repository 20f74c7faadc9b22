"""Model registry: ``resolve_model(cfg.model)`` returns the family adapter for a registry name.

Families: ``hf-text`` (BERT, RoBERTa, GPT-2, T5), ``hf-audio`` (wav2vec 2.0, HuBERT), ``timm`` (any timm
classifier), ``torchaudio`` (DeepSpeech), ``torchvision-detection`` (Faster R-CNN) and ``yolo`` (detectors,
imported only when used). Sources: ``hf:``, ``timm:``, ``torchaudio:``, ``torchvision:``, ``yolo:``.
"""

from ptm_ray.models.audio import AUDIO_MODEL_TYPES, DeepSpeechAdapter, HFAudioAdapter
from ptm_ray.models.registry import (
    SHORT_NAMES,
    Adapter,
    ModelRef,
    adapter_for_family,
    register_family,
    register_source,
    resolve_model,
)
from ptm_ray.models.text import TEXT_MODEL_TYPES, HFTextAdapter, hf_config
from ptm_ray.models.vision import TimmAdapter


def _hf_family(location: str) -> str:
    model_type = hf_config(location).model_type
    if model_type in AUDIO_MODEL_TYPES:
        return "hf-audio"
    if model_type in TEXT_MODEL_TYPES:
        return "hf-text"
    raise ValueError(
        f"model.name=hf:{location} is a {model_type!r} model; ptm_ray knows text {sorted(TEXT_MODEL_TYPES)} "
        f"and audio {sorted(AUDIO_MODEL_TYPES)} (add a layout in ptm_ray/models/text.py or audio.py)"
    )


register_family("hf-text", HFTextAdapter)
register_family("hf-audio", HFAudioAdapter)
register_family("timm", TimmAdapter)
register_family("torchaudio", DeepSpeechAdapter)


def _faster_rcnn():
    from ptm_ray.models.detection import FasterRCNNAdapter

    return FasterRCNNAdapter()


def _yolo():
    from ptm_ray.models.detection import YOLOAdapter

    return YOLOAdapter()


register_family("torchvision-detection", _faster_rcnn)
register_family("yolo", _yolo)
register_source("hf", _hf_family)
register_source("timm", lambda location: "timm")
register_source("torchaudio", lambda location: "torchaudio")
register_source("torchvision", lambda location: "torchvision-detection")
register_source("yolo", lambda location: "yolo")

__all__ = ["SHORT_NAMES", "Adapter", "ModelRef", "adapter_for_family", "register_family", "register_source",
           "resolve_model"]
