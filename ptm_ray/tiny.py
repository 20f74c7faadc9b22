"""Tiny configs of real architectures, saved to a local folder like a hub snapshot.

Tests and benchmarks use them to exercise the same ``from_pretrained`` loading path a hub id takes,
with no network: the weights are random, the architectures and tokenizer classes are the real ones.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

__all__ = ["AUDIO_FAMILIES", "DETECTOR_TYPES", "TEXT_FAMILIES", "TINY_DEEPSPEECH", "make_lora_variant",
           "make_tiny_audio_model", "make_tiny_deepspeech", "make_tiny_detector", "make_tiny_text_model",
           "tiny_detector_config"]

TEXT_FAMILIES = ("bert", "roberta", "gpt2", "t5")
AUDIO_FAMILIES = ("wav2vec2", "hubert")
TINY_DEEPSPEECH = {"n_mels": 20, "n_hidden": 32}
DETECTOR_TYPES = ("detr", "conditional_detr", "deformable_detr", "dab-detr", "table-transformer", "rt_detr",
                  "rt_detr_v2", "yolos")
"""Hugging Face detector types ``tiny_detector_config`` shrinks (the ones ``tests/test_model_coverage.py`` covers)."""


def _words(texts: list[str]) -> list[str]:
    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})


def _tokenizer(family: str, texts: list[str]):
    from transformers import BertTokenizer, GPT2Tokenizer, RobertaTokenizer, T5Tokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    if family == "bert":
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _words(texts)
        return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    if family in ("roberta", "gpt2"):  # byte-level BPE with no merges: one token per byte
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if family == "roberta" else ["<|endoftext|>"]
        vocab = {w: i for i, w in enumerate(specials + sorted(ByteLevel.alphabet()))}
        cls = RobertaTokenizer if family == "roberta" else GPT2Tokenizer
        return cls(vocab=vocab, merges=[])
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in _words(texts)]
    pieces += [(c, -5.0) for c in sorted({c for t in texts for c in t.lower()} - {" "})]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


@contextmanager
def _seeded(seed: int):
    """Random weights drawn from ``seed`` without touching the caller's torch RNG: the same tiny model whatever ran
    before (the test order used to change the weights, and with them what a test saw)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_tiny_text_model(family: str, path: str | Path, texts: list[str], seed: int = 0) -> Path:
    """Write a tiny randomly initialised ``family`` model and its tokenizer to ``path``.

    Args:
        family: one of ``TEXT_FAMILIES``.
        path: output folder (made if missing).
        texts: sample texts the tokenizer's vocabulary is built from.
        seed: the weights' seed (the caller's RNG state is left as it was).
    """
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, RobertaConfig, RobertaModel, T5Config, T5Model

    path = Path(path)
    tokenizer = _tokenizer(family, texts)
    vocab = len(tokenizer)
    with _seeded(seed):
        if family == "bert":
            model = BertModel(BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=256))
        elif family == "roberta":
            model = RobertaModel(RobertaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=128,
                                               max_position_embeddings=258, pad_token_id=1))
        elif family == "gpt2":
            model = GPT2Model(GPT2Config(vocab_size=vocab, n_layer=2, n_head=4, n_embd=64, n_positions=256,
                                         pad_token_id=0, eos_token_id=0, bos_token_id=0))
        elif family == "t5":
            model = T5Model(T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                     num_decoder_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0))
        else:
            raise ValueError(f"unknown tiny text family {family!r}; choose from {TEXT_FAMILIES}")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_audio_model(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny wav2vec 2.0 or HuBERT encoder, randomly initialised from ``seed``, and its feature extractor to
    ``path``."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    path = Path(path)
    dims = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                conv_dim=(16, 16, 16), conv_kernel=(10, 8, 4), conv_stride=(5, 8, 4), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=2)
    with _seeded(seed):
        if family == "wav2vec2":
            model = Wav2Vec2Model(Wav2Vec2Config(**dims))
        elif family == "hubert":
            model = HubertModel(HubertConfig(**dims))
        else:
            raise ValueError(f"unknown tiny audio family {family!r}; choose from {AUDIO_FAMILIES}")
    model.save_pretrained(path, safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(path)
    return path


def make_tiny_deepspeech(path: str | Path, num_labels: int = 10, seed: int = 0) -> Path:
    """Write the state dict of a tiny DeepSpeech classifier to ``path`` (safetensors), as pretrained weights."""
    from safetensors.torch import save_file

    from ptm_ray.models.audio import DeepSpeechClassifier

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        model = DeepSpeechClassifier(num_labels, **TINY_DEEPSPEECH)
    save_file(model.state_dict(), path)
    return path


def tiny_detector_config(model_type: str, image_size: int = 64):
    """The config class of a Hugging Face detector type with tiny sizes: a 2+2-layer transformer of width 32 with
    10 queries on a 4-stage ResNet backbone of 16-40 channels (Hugging Face's, so nothing is fetched: released DETR
    configs name a timm ResNet-50 with ImageNet weights)."""
    from transformers import CONFIG_MAPPING, ResNetConfig

    cls = CONFIG_MAPPING[model_type]
    values = cls().to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "model_type"):
        values.pop(key, None)
    sizes = {"d_model": 32, "hidden_size": 32, "encoder_hidden_dim": 32, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
             "encoder_layers": 2, "decoder_layers": 2, "num_hidden_layers": 2, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "num_attention_heads": 2, "intermediate_size": 64, "num_queries": 10,
             "dim_feedforward": 64, "num_denoising": 10}
    values.update({k: v for k, v in sizes.items() if k in values})
    if values.get("backbone_config") is not None:
        out = list(values["backbone_config"].get("out_indices") or [1, 2, 3, 4])
        backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 24, 32, 40], depths=[1, 1, 1, 1],
                                layer_type="basic", out_indices=out)
        values.update(backbone_config=backbone.to_dict(), use_timm_backbone=False)
        if "encoder_in_channels" in values:  # RT-DETR's neck takes the last stages' channels
            channels = [backbone.hidden_sizes[i - 1] for i in out]
            values["encoder_in_channels"] = channels[-len(values["encoder_in_channels"]):]
        if "decoder_in_channels" in values:
            values["decoder_in_channels"] = [32] * len(values["decoder_in_channels"])
    if "image_size" in values:  # YOLOS: position embeddings for this many patches
        values.update(image_size=[image_size, image_size], patch_size=16)
    return cls.from_dict(values)


def make_tiny_detector(model_type: str, path: str | Path, labels: list[str], image_size: int = 64,
                       seed: int = 0) -> Path:
    """Write a tiny randomly initialised Hugging Face detector (``AutoModelForObjectDetection``) for ``labels``
    and its type's image processor to ``path``, as a hub snapshot has them."""
    from transformers import AutoModelForObjectDetection
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    config = tiny_detector_config(model_type, image_size)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    with _seeded(seed):
        model = AutoModelForObjectDetection.from_config(config)
    path = Path(path)
    model.save_pretrained(path)
    # DAB-DETR's and RT-DETR v2's hub checkpoints name DETR's and RT-DETR's processors (transformers maps none)
    names = IMAGE_PROCESSOR_MAPPING_NAMES[{"dab-detr": "detr", "rt_detr_v2": "rt_detr"}.get(model_type, model_type)]
    processor = get_image_processor_class_from_name(names["torchvision"])
    processor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def make_lora_variant(path: str | Path, overrides: list[str], labels: list[str], seed: int = 0) -> Path:
    """A checkpoint as a LoRA run (or, with ``model.lora.r=0`` and every block frozen, a head-only run) writes
    it, with random adapters and head instead of trained ones: ``model/`` merged, ``variant/`` the adapters and
    head. ``overrides`` are config overrides naming the base (``model.name``) and ``model.lora``."""
    import torch

    from ptm_ray.checkpoint import save_checkpoint
    from ptm_ray.config import load_config, parse_freeze_depth
    from ptm_ray.freeze import freeze
    from ptm_ray.lora import apply_lora, merged_copy
    from ptm_ray.models import resolve_model
    from ptm_ray.variants import variant_tensors, write_variant

    cfg = load_config(None, ["data.train=unused", *overrides])
    family, ref = resolve_model(cfg.model)
    with _seeded(seed):
        net = family.build(ref, labels, cfg.model, "classifier")
        blocks = family.blocks(net)
        depth = parse_freeze_depth(cfg.model.freeze_depth, len(blocks))
        freeze(net, blocks, depth)
        wrapper = apply_lora(net, blocks, depth, cfg.model.lora) if cfg.model.lora.r else None
        with torch.no_grad():  # peft starts B at zero; trained adapters are not
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    plain = merged_copy(wrapper) if wrapper is not None else net
    folder = save_checkpoint(Path(path), family=family, model=plain.eval(), preprocessor=family.preprocessor(ref, net, cfg),
                             cfg=cfg, labels=labels, metrics={"epoch": 0}, history=[])
    write_variant(folder, cfg, variant_tensors(net), wrapper)
    return folder


def main(argv: list[str] | None = None) -> None:
    """``python -m ptm_ray.tiny <family> <out dir> [--texts CSV --columns a,b]``: write a tiny model to try a
    task offline (its weights are random; a real run names a pretrained folder or hub id instead)."""
    import argparse
    import csv

    from ptm_ray.data import resolve_path

    parser = argparse.ArgumentParser(prog="python -m ptm_ray.tiny", description=main.__doc__)
    parser.add_argument("family", choices=TEXT_FAMILIES + AUDIO_FAMILIES)
    parser.add_argument("out")
    parser.add_argument("--texts", default="bundled:support_intents_train.csv", help="CSV the tokenizer's words come from")
    parser.add_argument("--columns", default="text", help="comma-separated text columns of --texts")
    args = parser.parse_args(argv)
    if args.family in AUDIO_FAMILIES:
        print(make_tiny_audio_model(args.family, args.out))
        return
    with open(resolve_path(args.texts)) as f:
        rows = list(csv.DictReader(f))
    texts = [row[c] for row in rows for c in args.columns.split(",")]
    print(make_tiny_text_model(args.family, args.out, texts))


if __name__ == "__main__":
    main()
