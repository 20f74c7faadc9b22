"""What every Hugging Face family shares: the config, one ``Auto*`` class per head, save and load.

Text (``ptm_ray.models.text``), audio (``ptm_ray.models.audio``) and vision (``ptm_ray.models.hf_vision``)
families subclass ``HFFamily`` and say which auto class makes each head and how the config is sized for it.

Weights whose head has another size (someone's model fine-tuned for 2 labels, trained here on 4) load with
that head replaced: ``ignore_mismatched_sizes`` re-initialises it, ``announce_new_head`` prints one line
naming each replaced tensor with its old and new shape (instead of transformers' load-report table), and a
shape mismatch anywhere below the head is a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ptm_ray.config import ModelConfig
from ptm_ray.models.base import Family, ModelRef, announce_new_head

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


class _DropMismatchReport(logging.Filter):
    """Drops transformers' load-report table when it lists size mismatches (``announce_new_head`` says it in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("LOAD REPORT" in message and "MISMATCH" in message)


@contextlib.contextmanager
def _without_mismatch_report() -> Iterator[None]:
    logger, report_filter = logging.getLogger("transformers.modeling_utils"), _DropMismatchReport()
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


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
        with _without_mismatch_report():
            model, info = auto.from_pretrained(ref.weights or ref.location, config=config, use_safetensors=True,
                                               trust_remote_code=cfg.trust_remote_code, ignore_mismatched_sizes=True,
                                               output_loading_info=True)
        self._check_new_head(model, cfg, info["mismatched_keys"], len(labels))
        return model

    def _check_new_head(self, model: nn.Module, cfg: ModelConfig, mismatched: Any, num_labels: int) -> None:
        """Announce a re-initialised head; a tensor of another shape inside the blocks is an error."""
        if not mismatched:
            return
        blocks = self.blocks(model)
        wrong = sorted(k for k, _, _ in mismatched if any(block.owns(k) for block in blocks))
        if wrong:
            source = f"model.weights={cfg.weights}" if cfg.weights else f"model.name={cfg.name}"
            raise ValueError(f"{source}: tensors below the head have other shapes than the architecture in its "
                             f"config.json: {wrong[:5]} (only a head of another size is replaced)")
        announce_new_head(cfg.name, num_labels, [(k, tuple(old), tuple(new)) for k, old, new in mismatched])

    def save(self, model: nn.Module, path: Path) -> None:
        model.save_pretrained(path, safe_serialization=True)

    def load(self, path: Path) -> nn.Module:
        import transformers

        architecture = hf_config(str(path)).architectures[0]  # e.g. BertForSequenceClassification, as saved
        return getattr(transformers, architecture).from_pretrained(path, use_safetensors=True)
