"""What every Hugging Face family shares: the config, one ``Auto*`` class per head, save and load.

Text (``ptm_ray.models.text``), audio (``ptm_ray.models.audio``) and vision (``ptm_ray.models.hf_vision``)
families subclass ``HFFamily`` and say which auto class makes each head and how the config is sized for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ptm_ray.config import ModelConfig
from ptm_ray.models.base import Family, ModelRef

__all__ = ["HFFamily", "hf_config", "set_label_maps"]


def hf_config(location: str, trust_remote_code: bool = False) -> Any:
    """The Hugging Face config at a local folder or hub id, with an error that says what was expected."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model.name=hf:{location}: no Hugging Face model there (a local folder with config.json, or a hub id "
            f"when a network exists): {str(e).splitlines()[0]}"
        ) from None


def set_label_maps(config: Any, labels: list[str]) -> None:
    """Size a classification head: ``num_labels``, ``id2label`` and ``label2id`` as pipelines read them."""
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}


class HFFamily(Family):
    """``hf:`` models: ``build`` takes the head's auto class, ``configure`` sizes the config for it."""

    auto_classes: dict[str, str] = {}
    """head -> the transformers auto class that adds it, e.g. ``classifier`` -> ``AutoModelForSequenceClassification``."""

    @property
    def heads(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.auto_classes)

    def configure(self, config: Any, head: str, labels: list[str], cfg: ModelConfig) -> None:
        """Size ``config`` for ``head`` and ``labels`` (a classifier's label maps by default)."""
        set_label_maps(config, labels)

    def build(self, ref: ModelRef, labels: list[str], cfg: ModelConfig, head: str, pretrained: bool = True) -> nn.Module:
        import transformers

        config = hf_config(ref.location, cfg.trust_remote_code)
        self.configure(config, head, labels, cfg)
        auto = getattr(transformers, self.auto_classes[head])
        if not pretrained or ref.weights == "none":  # architecture only, randomly initialised
            return auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
        return auto.from_pretrained(ref.weights or ref.location, config=config, use_safetensors=True,
                                    trust_remote_code=cfg.trust_remote_code)

    def save(self, model: nn.Module, path: Path) -> None:
        model.save_pretrained(path, safe_serialization=True)

    def load(self, path: Path) -> nn.Module:
        import transformers

        architecture = hf_config(str(path)).architectures[0]  # e.g. BertForSequenceClassification, as saved
        return getattr(transformers, architecture).from_pretrained(path, use_safetensors=True)
