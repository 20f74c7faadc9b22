"""Which ``hf:`` model types ptm_ray takes, and for which heads: read from transformers' auto-mappings.

A model type (``config.model_type``) goes to the family of the first mapping that lists it:

============================================== ============= =====================================
transformers mapping                           family        head
============================================== ============= =====================================
``MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING``     ``hf-audio``  ``classifier``
``MODEL_FOR_CTC_MAPPING``                      ``hf-audio``  ``ctc``
``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING``  ``hf-text``   ``classifier``
``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING``     ``hf-text``   ``seq2seq``
``MODEL_FOR_CAUSAL_LM_MAPPING``                ``hf-text``   ``causal_lm``
``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING``     ``hf-vision`` ``classifier``
============================================== ============= =====================================

A family can make a head for a type only where that head's mapping lists it, and only where
``tests/test_model_coverage.py`` found it working end to end (``UNCOVERED`` lists the rest with the reason).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ptm_ray.config import ModelConfig

__all__ = ["FAMILY_HEADS", "UNCOVERED", "family_of_type", "head_unsupported", "refuse_head", "supported_summary"]

# family -> head -> the transformers mapping (``transformers.models.auto.modeling_auto.<name>_MAPPING_NAMES``)
FAMILY_HEADS: dict[str, dict[str, str]] = {
    "hf-audio": {"classifier": "MODEL_FOR_AUDIO_CLASSIFICATION", "ctc": "MODEL_FOR_CTC"},
    "hf-text": {"classifier": "MODEL_FOR_SEQUENCE_CLASSIFICATION", "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM",
                "causal_lm": "MODEL_FOR_CAUSAL_LM"},
    "hf-vision": {"classifier": "MODEL_FOR_IMAGE_CLASSIFICATION"},
}

# (model type, head) -> why ptm_ray does not take it; kept equal to what tests/test_model_coverage.py finds.
UNCOVERED: dict[tuple[str, str], str] = {}


def _mapping(name: str) -> dict[str, str]:
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, f"{name}_MAPPING_NAMES")


def family_of_type(model_type: str) -> str | None:
    """The ``hf-*`` family a model type goes to, or None if no mapping ptm_ray reads lists it."""
    for family, heads in FAMILY_HEADS.items():
        if any(model_type in _mapping(m) for m in heads.values()):
            return family
    return None


def head_unsupported(family: str, model_type: str, head: str) -> str | None:
    """Why ``family`` cannot make ``head`` for ``model_type`` (a sentence naming both), or None."""
    mapping = FAMILY_HEADS[family].get(head)
    if mapping is None or model_type not in _mapping(mapping):
        offered = [h for h, m in FAMILY_HEADS[family].items() if model_type in _mapping(m)]
        return (f"transformers has no {head} head for {model_type!r} models ({mapping or family} does not list it); "
                f"{family} builds {offered or 'none'} for it")
    reason = UNCOVERED.get((model_type, head))
    if reason:
        return f"ptm_ray does not take {model_type!r} models with a {head} head: {reason}"
    return None


def refuse_head(family: str, config: Any, head: str, cfg: "ModelConfig") -> None:
    """Raise before any weights load if ``family`` cannot make ``head`` for ``config.model_type``.

    Raises:
        ValueError: naming ``model.task``, ``model.name``, the model type and the reason.
    """
    reason = head_unsupported(family, config.model_type, head)
    if reason:
        raise ValueError(f"model.task={cfg.task} is not available for model.name={cfg.name}: {reason}")


def supported_summary() -> str:
    """One line for error messages: which mappings decide what ``hf:`` models ptm_ray takes."""
    return ", ".join(f"{family} ({', '.join(m.lower() for m in heads.values())})" for family, heads in FAMILY_HEADS.items())
