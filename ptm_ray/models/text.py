"""Hugging Face text models (``hf:<hub id or local dir>``): any type transformers lists for sequence
classification, seq2seq or causal LM (BERT, DistilBERT, DeBERTa-v2, ALBERT, XLM-R, GPT-2, Llama, Qwen,
Mistral, T5, BART, ...; ``ptm_ray.models.hf_types``).

Heads: ``classifier`` (``AutoModelForSequenceClassification``), ``seq2seq`` (``AutoModelForSeq2SeqLM``:
encoder-decoders) and ``causal_lm`` (``AutoModelForCausalLM``: decoder-only models).

Blocks are discovered from the module tree (``ptm_ray.models.layout``): the embeddings, then every layer of
each stack (encoder-decoders: encoder, then decoder), each stack's final norm riding with its last layer.
What is left (pooler, classifier, a classification head, a language-modelling head) is the task head. A
language-modelling head tied to the input embeddings is frozen with the embeddings block.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ptm_ray.config import Config, ModelConfig
from ptm_ray.freeze import Block
from ptm_ray.models.base import ModelRef, Preprocessor, weights_cache_dir
from ptm_ray.models.hf import HFFamily, set_label_maps
from ptm_ray.models.hf_types import refuse_head
from ptm_ray.models.layout import discover_blocks
from ptm_ray.models.pooling import POOLING_KEY, pool_with_mean, set_pooling_mask

__all__ = ["HFTextFamily", "TextPreprocessor", "lower_layers_of"]

_CACHEABLE = frozenset({"bert"})  # encoders whose prefix/suffix split is implemented and checked


def lower_layers_of(source: str, num_layers: int, name: str) -> str:
    """A Hugging Face folder holding the embeddings and lowest ``num_layers`` layers of the model at ``source``.

    Layer dropping from the top keeps real pretrained weights in a smaller, faster model (Sajjad et al.,
    "On the effect of dropping layers of pre-trained transformer models"); used for the ``minilm-l3``
    candidate. Written once under ``$PTM_RAY_CACHE`` (default ``~/.cache/ptm_ray``) and reused.
    """
    from transformers import AutoModel

    target = weights_cache_dir() / name
    if (target / "config.json").is_file():
        return str(target)
    partial = target.with_name(f"{name}.{os.getpid()}.tmp")
    model = AutoModel.from_pretrained(source, num_hidden_layers=num_layers, use_safetensors=True)
    model.save_pretrained(partial, safe_serialization=True)
    for f in Path(source).iterdir():  # the tokenizer files
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")) and f.is_file():
            shutil.copy(f, partial / f.name)
    try:
        os.replace(partial, target)  # atomic: a concurrent worker sees no folder or a complete one
    except OSError:  # another process won the race
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def _masked_lm_encoder(config: Any) -> bool:
    """An encoder pretrained with masked language modelling (BERT, RoBERTa, ELECTRA, ...), not set up as a decoder:
    transformers lists it for causal LM (``BertLMHeadModel``), but its weights never learned to predict ahead."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def _end_of_sequence(config: Any, cfg: ModelConfig) -> int:
    """The id a classifier pads with where the config names no pad token: the end-of-sequence token."""
    eos = getattr(config.get_text_config(), "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if not isinstance(eos, int):
        raise ValueError(f"model.name={cfg.name}: its config ({config.model_type!r}) names neither pad_token_id nor "
                         "eos_token_id, and sequence classification needs a pad token; set one in config.json")
    return eos


class TextPreprocessor(Preprocessor):
    """Tokenizes a batch of strings with the model's own tokenizer, padded and truncated."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: list[str], train: bool = False) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )

    prepares_rows = True

    def rows(self, texts: list[str], train: bool = False) -> dict[str, list[np.ndarray]]:
        """Token ids (and masks) per text, truncated as ``__call__`` truncates, not padded."""
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return {name: [np.asarray(row, dtype=np.int64) for row in values] for name, values in encoded.items()}

    def collate(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Rows of ``rows`` padded to the batch's longest on the tokenizer's padding side, with its pad values:
        what ``__call__`` (``padding=True``) returns for the same texts."""
        pad_values = {"input_ids": self.tokenizer.pad_token_id, "token_type_ids": self.tokenizer.pad_token_type_id}
        left = self.tokenizer.padding_side == "left"
        out = {}
        for name, values in rows.items():
            width = max(len(v) for v in values)
            padded = np.full((len(values), width), pad_values.get(name, 0), dtype=np.int64)
            for i, v in enumerate(values):
                if left:
                    padded[i, width - len(v):] = v
                else:
                    padded[i, :len(v)] = v
            out[name] = torch.from_numpy(padded)
        return out

    def notes(self, texts: list[str]) -> list[dict[str, Any]]:
        """Texts whose tokens exceed ``max_length`` are cut: say so."""
        lengths = self.tokenizer(list(texts), truncation=False)["input_ids"]
        cut = {"truncated": True, "warning": f"input longer than the model's {self.max_length} tokens was truncated"}
        return [cut if len(ids) > self.max_length else {} for ids in lengths]

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        (path / "preprocessor.json").write_text(json.dumps({"kind": "text", "max_length": self.max_length}))

    @classmethod
    def load(cls, path: Path) -> "TextPreprocessor":
        from transformers import AutoTokenizer

        meta = json.loads((path / "preprocessor.json").read_text())
        return cls(AutoTokenizer.from_pretrained(path), meta["max_length"])


class HFTextFamily(HFFamily):
    """``hf:`` text models with a classifier, sequence-to-sequence or causal language-model head."""

    name = "hf-text"
    modality = "text"
    preprocessor_class = TextPreprocessor
    auto_classes = {
        "classifier": "AutoModelForSequenceClassification",
        "seq2seq": "AutoModelForSeq2SeqLM",
        "causal_lm": "AutoModelForCausalLM",
    }
    cache_sequence_features = ("hidden", "attention_mask")  # padded to model.max_length in the cache

    def configure(self, config: Any, head: str, labels: list[str], cfg: ModelConfig) -> None:
        if head == "seq2seq" and not getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"model.task={cfg.task} needs an encoder-decoder model such as T5; model.name={cfg.name} "
                             f"is a {config.model_type!r} model")
        if head == "causal_lm" and (getattr(config, "is_encoder_decoder", False) or _masked_lm_encoder(config)):
            why = " (an encoder pretrained with masked language modelling)" if _masked_lm_encoder(config) else ""
            raise ValueError(f"model.task={cfg.task} needs a decoder-only model such as GPT-2; model.name="
                             f"{cfg.name} is a {config.model_type!r} model{why}")
        refuse_head(self.name, config, head, cfg)
        if head == "classifier":
            set_label_maps(config, labels)
            if getattr(config, "pad_token_id", None) is None:  # GPT-2 has none; sequence classification needs one
                config.pad_token_id = _end_of_sequence(config, cfg)
        encoder = _masked_lm_encoder(config) and not getattr(config, "is_encoder_decoder", False)
        if cfg.pooling == "mean" and (head != "classifier" or not encoder):
            raise ValueError(f"model.pooling=mean is for the classifier of a text encoder (BERT-like); model.name="
                             f"{cfg.name} is a {config.model_type!r} model and model.task={cfg.task}: use model.pooling=cls")
        config.update({POOLING_KEY: cfg.pooling})

    def build(self, ref: ModelRef, labels: list[str], cfg: ModelConfig, head: str, pretrained: bool = True) -> nn.Module:
        model = super().build(ref, labels, cfg, head, pretrained)
        if cfg.pooling == "mean":
            pool_with_mean(model, self._last_layer(model))
        return model

    def load(self, path: Path) -> nn.Module:
        model = super().load(path)
        if getattr(model.config, POOLING_KEY, "cls") == "mean":
            pool_with_mean(model, self._last_layer(model))
        return model

    def _last_layer(self, model: nn.Module) -> nn.Module:
        """The top layer of the encoder (the last block's first module)."""
        return model.get_submodule(self.blocks(model)[-1].prefixes[0])

    def save_ecosystem_files(self, model: nn.Module, preprocessor: Preprocessor, labels: list[str],
                             path: Path) -> None:
        """The tokenizer beside the weights, where ``transformers.pipeline`` looks for it, its ``model_max_length``
        set to ``model.max_length`` (a pipeline called with ``truncation=True`` then cuts where ptm_ray does)."""
        tokenizer, limit = preprocessor.tokenizer, preprocessor.tokenizer.model_max_length
        tokenizer.model_max_length = preprocessor.max_length
        try:
            tokenizer.save_pretrained(path)
        finally:
            tokenizer.model_max_length = limit

    def blocks(self, model: nn.Module) -> list[Block]:
        return discover_blocks(model)

    def preprocessor(self, ref: ModelRef, model: nn.Module, cfg: Config) -> TextPreprocessor:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ref.location, trust_remote_code=cfg.model.trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return TextPreprocessor(tokenizer, cfg.model.max_length)

    # --- Classifier ---------------------------------------------------------------------------------
    def logits(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**inputs).logits

    # --- Generator ----------------------------------------------------------------------------------
    def generate(self, model: nn.Module, inputs: dict[str, torch.Tensor], **options: Any) -> torch.Tensor:
        return model.generate(**inputs, **options)

    # --- PrefixCache: BERT encoders ---------------------------------------------------------------
    def cache_unsupported(self, model: nn.Module, depth: int) -> str | None:
        """Why the prefix of ``depth`` blocks cannot be cached, or None."""
        if model.config.model_type not in _CACHEABLE:
            return (f"cache not supported for hf-text {model.config.model_type!r} (only {sorted(_CACHEABLE)}), "
                    "falling back to uncached")
        if model.config.is_decoder:
            return "a decoder BERT/RoBERTa uses causal masks; cache not supported"
        return None

    def prefix_forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
        """Embeddings and the first ``depth - 1`` layers; with every block frozen, only the first token's state."""
        base = model.base_model
        hidden = base.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))
        mask = inputs["attention_mask"]
        set_pooling_mask(model, mask)  # model.pooling=mean: the top layer's hook reads it
        layers = base.encoder.layer
        if depth > 1:
            extended, _ = base._create_attention_masks(mask, None, hidden, None, None)
            for layer in layers[: depth - 1]:
                hidden = layer(hidden, extended)
        if depth - 1 == len(layers):  # feature extraction: the head reads the first token only
            return {"first_token": hidden[:, 0]}
        return {"hidden": hidden, "attention_mask": mask}

    def suffix_logits(self, model: nn.Module, features: dict[str, torch.Tensor], depth: int) -> torch.Tensor:
        """The layers above the prefix and the classification head, as the model's own forward runs them."""
        base = model.base_model
        if "first_token" in features:
            sequence = features["first_token"].unsqueeze(1)
        else:
            mask = features["attention_mask"]
            length = int(mask.sum(1).max())  # trim the cache's padding to this batch's longest row
            sequence, mask = features["hidden"][:, :length], mask[:, :length]
            set_pooling_mask(model, mask)
            extended, _ = base._create_attention_masks(mask, None, sequence, None, None)
            for layer in base.encoder.layer[depth - 1:]:
                sequence = layer(sequence, extended)
        return model.classifier(model.dropout(base.pooler(sequence)))
