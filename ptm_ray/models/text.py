"""Hugging Face text models: BERT, RoBERTa, GPT-2 and T5 (``hf:<hub id or local dir>``).

Heads: ``classifier`` (``AutoModelForSequenceClassification``, every family), ``seq2seq``
(``AutoModelForSeq2SeqLM``: T5) and ``causal_lm`` (``AutoModelForCausalLM``: GPT-2).

Blocks, input to output: the embeddings, then every transformer layer of each stack (T5: encoder, then
decoder), each stack's final norm riding with its last layer. What is left (pooler, classifier, T5's
classification head, a language-modelling head) is the task head. GPT-2 and T5 tie their LM head to the
input embeddings: freezing the embeddings block freezes that shared matrix too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptm_ray.config import Config, ModelConfig
from ptm_ray.freeze import Block
from ptm_ray.models.base import ModelRef, Preprocessor, weights_cache_dir
from ptm_ray.models.hf import HFFamily, set_label_maps
from ptm_ray.models.pooling import POOLING_KEY, pool_with_mean, set_pooling_mask

__all__ = ["HFTextFamily", "TEXT_MODEL_TYPES", "TextPreprocessor", "lower_layers_of"]

# model_type -> (embedding modules, [(layer list, modules appended to its last layer)]), relative to
# the base model (``model.base_model``).
_LAYOUTS: dict[str, tuple[list[str], list[tuple[str, list[str]]]]] = {
    "bert": (["embeddings"], [("encoder.layer", [])]),
    "roberta": (["embeddings"], [("encoder.layer", [])]),
    "gpt2": (["wte", "wpe"], [("h", ["ln_f"])]),
    "t5": (["shared"], [("encoder.block", ["encoder.final_layer_norm"]), ("decoder.block", ["decoder.final_layer_norm"])]),
}


TEXT_MODEL_TYPES = frozenset(_LAYOUTS)
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


def _is_encoder(config: Any) -> bool:
    """A bidirectional encoder (BERT-like: has a masked-LM head), not a decoder-only or encoder-decoder model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return not config.is_encoder_decoder and config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


class TextPreprocessor(Preprocessor):
    """Tokenizes a batch of strings with the model's own tokenizer, padded and truncated."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: list[str], train: bool = False) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )

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
        if head == "seq2seq" and not config.is_encoder_decoder:
            raise ValueError(f"model.task={cfg.task} needs an encoder-decoder model such as T5; model.name={cfg.name} "
                             f"is a {config.model_type!r} model")
        if head == "causal_lm" and (config.is_encoder_decoder or config.model_type in ("bert", "roberta")):
            raise ValueError(f"model.task={cfg.task} needs a decoder-only model such as GPT-2; model.name="
                             f"{cfg.name} is a {config.model_type!r} model")
        if head == "classifier":
            set_label_maps(config, labels)
            if config.pad_token_id is None:  # GPT-2 has no pad token; sequence classification needs one
                config.pad_token_id = config.eos_token_id
        if cfg.pooling == "mean" and (head != "classifier" or not _is_encoder(config)):
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
        embeddings, stacks = _LAYOUTS[model.config.model_type]
        # T5ForConditionalGeneration holds its stacks itself; the other heads wrap a base model
        base = "" if model.base_model is model else model.base_model_prefix + "."
        blocks = [Block("embeddings", tuple(base + m for m in embeddings))]
        for stack, trailer in stacks:
            n = len(model.base_model.get_submodule(stack))
            for i in range(n):
                extra = tuple(base + m for m in trailer) if i == n - 1 else ()
                blocks.append(Block(f"{stack}.{i}", (f"{base}{stack}.{i}",) + extra))
        return blocks

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
