"""Mean pooling for the classification head of a Hugging Face text encoder (``model.pooling=mean``).

A sequence classifier such as ``BertForSequenceClassification`` reads the first token's final state (BERT's
pooler, RoBERTa's classification head, ...). Sentence-transformer checkpoints (all-MiniLM, all-mpnet) were
trained to make the *mean* of the token states meaningful instead; their first token's state can be nearly
constant, which leaves a classifier on top at chance. With mean pooling the masked mean of the last layer's
token states takes the first token's place, so the model's own head (pooler and classifier, with its
pretrained weights) reads the mean: a forward hook on the last layer, and a pre-hook on the model that keeps
the batch's ``attention_mask``.

The choice is saved in the model's ``config.json`` (``ptm_ray_pooling``) and the hooks are put back when
ptm_ray loads the checkpoint. ``transformers.pipeline`` does not know the key: it reads the first token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["POOLINGS", "POOLING_KEY", "pool_with_mean", "set_pooling_mask"]

POOLINGS = ("cls", "mean")
POOLING_KEY = "ptm_ray_pooling"
"""The config.json key that records the pooling of a saved model."""


class _Mask:
    """The attention mask of the batch being run, shared by the hooks of one model."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


def pool_with_mean(model: nn.Module, last_layer: nn.Module) -> None:
    """Make ``model``'s head read the masked mean of ``last_layer``'s token states where it reads the first token.

    Args:
        model: the classifier; its forward's ``attention_mask`` keyword marks the real tokens (all, if absent).
        last_layer: the top layer of the encoder stack (its output: hidden states of shape (batch, tokens, dim)).
    """
    mask = _Mask()

    def remember(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask.value = kwargs.get("attention_mask")

    def pool(module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        pooled = torch.cat([_masked_mean(hidden, mask.value).unsqueeze(1), hidden[:, 1:]], dim=1)
        return (pooled, *output[1:]) if isinstance(output, tuple) else pooled

    model.register_forward_pre_hook(remember, with_kwargs=True)
    last_layer.register_forward_hook(pool)
    model._ptm_ray_pooling_mask = mask  # set_pooling_mask: for code that runs the layers without model.forward
    model.config.update({POOLING_KEY: "mean"})


def set_pooling_mask(model: nn.Module, attention_mask: torch.Tensor | None) -> None:
    """Give the pooling hook the mask of a batch run layer by layer (the feature cache), not through ``forward``."""
    holder = getattr(model, "_ptm_ray_pooling_mask", None)
    if holder is not None:
        holder.value = attention_mask


def _masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask[:, : hidden.shape[1]].unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
