"""Every model type transformers' auto-mappings list for ptm_ray's heads, end to end with a tiny config (no Ray).

For each (mapping, model type): a tiny config from the type's own config class (sizes shrunk, parameters
counted on the meta device before anything is allocated), the head built through the family ptm_ray routes
the type to, blocks discovered, the lower half frozen, one optimizer step (only unfrozen weights move),
saved and loaded back through the family, and the same logits predicted. A type that fails must be listed in
``ptm_ray.models.hf_types.UNCOVERED`` with the reason, and one listed there must fail: the list is what
this test finds. By default the ``CORE`` types run (42 pairs, about a minute on 2 quiet cores); with
``PTM_RAY_COVERAGE=all`` every type of every mapping (449 cases, about 40 min of one core). Each type has
``PTM_RAY_COVERAGE_SECONDS`` (120) to finish. ``python tests/test_model_coverage.py [MAPPING[:first:last] ...]``
prints the N-of-M table README shows.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ptm_ray.config import ModelConfig
from ptm_ray.freeze import block_of_parameters, freeze
from ptm_ray.models import family_for
from ptm_ray.models.hf_types import FAMILY_HEADS, UNCOVERED, family_of_type

# task (mapping) -> (family, head)
TASKS = {m: (family, head) for family, heads in FAMILY_HEADS.items() for head, m in heads.items()}
LABELS = ["a", "b", "c"]
MAX_PARAMS = 3_000_000  # a tiny config above this was not shrunk: refuse it rather than build it
SECONDS_PER_TYPE = int(os.environ.get("PTM_RAY_COVERAGE_SECONDS", "120"))  # per type, on a loaded machine

_HIDDEN = {"hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "embed_dim": 32, "hidden_dim": 32,
           "word_embed_proj_dim": 32, "output_hidden_size": 32, "projection_dim": 32, "embedding_size": 32,
           "emb_dim": 32, "d_head": 16, "n_words": 128,
           "head_dim": 16, "d_kv": 16, "kv_channels": 16, "classifier_proj_size": 16, "n_inner": 64,
           "intermediate_size": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "d_ff": 64,
           "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "ffn_hidden_size": 64,
           "num_attention_heads": 2, "n_head": 2, "n_heads": 2, "encoder_attention_heads": 2,
           "decoder_attention_heads": 2, "num_key_value_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
           "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
           "num_decoder_layers": 2, "num_encoder_layers": 2, "num_layers": 2,
           "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
           "num_experts_per_tok": 2, "image_size": 32, "patch_size": 4,
           "conv_dim": (16, 16), "conv_kernel": (10, 3), "conv_stride": (5, 2), "num_feat_extract_layers": 2,
           "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2, "pooler_hidden_size": 32,
           "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 16}
_CAPPED = {"vocab_size": 128, "max_position_embeddings": 512, "n_positions": 512, "max_target_positions": 512}


def _shrink(values: dict) -> dict:
    """A config dict with its sizes made tiny (sub-configs too)."""
    out = dict(values)
    for key, value in values.items():
        if isinstance(value, dict) and "model_type" in value:
            out[key] = _shrink(value)
        elif key in _HIDDEN and (value is not None or key == "head_dim") and not isinstance(value, (bool, str)) and (
                not isinstance(value, (list, tuple)) or key.startswith("conv_")):
            if not (key == "num_layers" and "depths" in values):
                out[key] = _HIDDEN[key]
        elif (key in _CAPPED or key.endswith("vocab_size")) and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, _CAPPED.get(key, 128))
        elif key == "depths" and isinstance(value, (list, tuple)):
            out[key] = [1] * len(value)
        elif key in ("hidden_sizes", "embed_dims", "dims") and isinstance(value, (list, tuple)):
            out[key] = [32] * len(value)  # group norms of 32 groups (BiT) divide it
        elif key == "num_heads" and isinstance(value, (list, tuple)):
            out[key] = [1] * len(value)
        elif key in ("layer_types", "layers_block_type") and isinstance(value, (list, tuple)):
            out[key] = list(value[:2])
        elif key == "tdnn_dim" and isinstance(value, (list, tuple)):
            out[key] = [16] * len(value)
    vocab = out.get("vocab_size")
    for key, value in out.items():
        if key.endswith("token_id") and isinstance(value, int) and isinstance(vocab, int) and value >= vocab:
            out[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(key, 3)
    return out


def tiny_config(model_type: str, task: str = ""):
    """The config class of ``model_type`` with tiny sizes."""
    from transformers import CONFIG_MAPPING

    if task == "MODEL_FOR_OBJECT_DETECTION":  # detectors: a tiny backbone of Hugging Face's own, never timm's
        from ptm_ray.tiny import tiny_detector_config

        return tiny_detector_config(model_type)
    cls = CONFIG_MAPPING[model_type]
    values = _shrink(cls().to_dict())
    for key in ("transformers_version", "architectures", "_name_or_path", "model_type", "out_features", "out_indices",
                "stage_names"):
        values.pop(key, None)
    if "window_size" in values:  # Swin-style windows: 4 stages of 16, 8, 4, 2 patches, each a whole number of windows
        values.update(image_size=64, patch_size=4, window_size=2)
    config = cls.from_dict(values)
    config.architectures = []  # auto classes with two candidates (DeiT, LeViT) then take the first
    text = config.get_text_config()
    if getattr(text, "pad_token_id", None) is None and getattr(text, "eos_token_id", None) is None:
        text.eos_token_id = 2  # a released checkpoint names its end-of-sequence token
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = 0
    return config


@contextmanager
def _deadline(seconds: int):
    def stop(signum, frame):
        raise TimeoutError(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def _unlisted(key: tuple[str, str]):
    """``UNCOVERED`` without ``key`` for the duration."""
    reason = UNCOVERED.pop(key, None)
    try:
        yield
    finally:
        if reason is not None:
            UNCOVERED[key] = reason


def _inputs(family: str, head: str, config, batch: int = 2) -> tuple[dict, torch.Tensor]:
    """Model inputs as the family's preprocessor makes them, and targets for the head."""
    g = torch.Generator().manual_seed(0)
    if family == "hf-detection":  # boxes as the family's preprocessor makes them: class index, normalised cx, cy, w, h
        boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]]), torch.tensor([[0.5, 0.5, 0.4, 0.4]])]
        targets = [{"class_labels": torch.tensor([0, 1]), "boxes": boxes[0]},
                   {"class_labels": torch.tensor([2]), "boxes": boxes[1]}][:batch]
        return {"pixel_values": torch.randn(batch, 3, 64, 64, generator=g)}, targets
    if family == "hf-vision":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=g)}, torch.tensor([0, 1])
    if family == "hf-audio":
        inputs = {"input_values": torch.randn(batch, 3200, generator=g)}
        if head == "ctc":
            return inputs, torch.randint(1, config.vocab_size, (batch, 5), generator=g)
        return inputs, torch.tensor([0, 1])
    vocab = getattr(config.get_text_config(), "vocab_size", 128)
    specials = {getattr(config.get_text_config(), k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    low = max([s for s in specials if isinstance(s, int)] + [3]) + 1
    ids = torch.randint(low, vocab, (batch, 8), generator=g)
    eos = getattr(config.get_text_config(), "eos_token_id", None)
    if isinstance(eos, int):
        ids[:, -1] = eos  # sequence classifiers that pool at </s> (T5, BART) need one per row
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if head == "classifier":
        return inputs, torch.tensor([0, 1])
    return inputs, ids.clone()


def _loss_and_logits(model, family: str, head: str, inputs: dict, targets: torch.Tensor):
    if head in ("seq2seq", "causal_lm"):
        out = model(**inputs, labels=targets)
        return out.loss, out.logits
    if head in ("ctc", "detector"):
        out = model(**inputs, labels=targets)
        return out.loss, out.logits
    logits = model(**inputs).logits
    return torch.nn.functional.cross_entropy(logits, targets), logits


def cover(model_type: str, task: str, tmp: Path) -> str | None:
    """Run the whole path for one model type and task; the reason it fails, or None."""
    family_name, head = TASKS[task]
    routed = family_of_type(model_type)
    if routed != family_name:
        return f"routed to {routed} (listed by an earlier mapping)"
    try:
        with _deadline(SECONDS_PER_TYPE):
            return _cover(model_type, task, family_name, head, tmp)
    except Exception as e:  # noqa: BLE001 - the reason is the result
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _cover(model_type: str, task: str, family_name: str, head: str, tmp: Path) -> str | None:
    import transformers

    family = family_for(family_name)
    config = tiny_config(model_type, task)
    labels = [c for c in "_abcdefgh"][: min(9, getattr(config, "vocab_size", 9) or 9)] if head == "ctc" else LABELS
    try:
        with _unlisted((model_type, head)):  # run a listed type too: the list must not outlive its reason
            family.configure(config, head, labels, ModelConfig(name=f"hf:{model_type}", task=head))
    except ValueError as e:  # refused on purpose, before any weights (an encoder asked for a causal LM head)
        return f"refused: {e}"
    auto = getattr(transformers, family.auto_classes[head])
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    size = sum(p.numel() for p in skeleton.parameters())
    if size > MAX_PARAMS:
        return f"tiny config still has {size / 1e6:.1f} M parameters"
    torch.manual_seed(0)
    model = auto.from_config(config)
    blocks = family.blocks(model)
    owner = block_of_parameters(model, blocks)
    if head in ("classifier", "ctc", "detector") and not any(i == -1 for i in owner.values()):
        return "no head parameters outside the blocks"  # (an LM head tied to the embeddings has none of its own)
    k = max(1, len(blocks) // 2)
    freeze(model, blocks, k)
    frozen = {n for n, i in owner.items() if 0 <= i < k}
    inputs, targets = _inputs(family_name, head, model.config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss, _ = _loss_and_logits(model, family_name, head, inputs, targets)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    if not changed or changed & frozen:
        return f"the step changed {len(changed)} tensors, {len(changed & frozen)} of them frozen"
    model.eval()
    with torch.no_grad():
        expected = _loss_and_logits(model, family_name, head, inputs, targets)[1]
        family.save(model, tmp / model_type)
        loaded = family.load(tmp / model_type).eval()
        got = _loss_and_logits(loaded, family_name, head, inputs, targets)[1]
    if not torch.allclose(expected, got, atol=1e-5):
        return f"loaded model predicts differently (max diff {(expected - got).abs().max():.2e})"
    return None


def _types(task: str) -> list[str]:
    from transformers.models.auto import modeling_auto

    return sorted(getattr(modeling_auto, f"{task}_MAPPING_NAMES"))


# The types every run checks (the ones users bring most); PTM_RAY_COVERAGE=all walks every type of every mapping.
CORE = {
    "MODEL_FOR_SEQUENCE_CLASSIFICATION": ["albert", "bart", "bert", "deberta-v2", "distilbert", "electra", "gpt2",
                                          "llama", "mistral", "qwen2", "t5", "xlm-roberta"],
    "MODEL_FOR_CAUSAL_LM": ["gpt2", "llama", "mistral", "opt", "qwen2"],
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM": ["bart", "mbart", "t5"],
    "MODEL_FOR_AUDIO_CLASSIFICATION": ["data2vec-audio", "hubert", "unispeech", "wav2vec2", "wavlm"],
    "MODEL_FOR_CTC": ["data2vec-audio", "hubert", "unispeech-sat", "wav2vec2", "wavlm"],
    "MODEL_FOR_IMAGE_CLASSIFICATION": ["beit", "convnext", "deit", "resnet", "swin", "vit"],
    "MODEL_FOR_OBJECT_DETECTION": ["conditional_detr", "deformable_detr", "detr", "rt_detr", "yolos"],
}


def _cases() -> list[tuple[str, str]]:
    if os.environ.get("PTM_RAY_COVERAGE") == "all":
        return [(task, t) for task in sorted(TASKS) for t in _types(task)]
    return [(task, t) for task in sorted(TASKS) for t in CORE[task]]


@pytest.mark.parametrize("task, model_type", _cases())
def test_model_type_runs_end_to_end_or_is_listed_as_uncovered(task, model_type, tmp_path):
    family, head = TASKS[task]
    if family_of_type(model_type) != family:
        pytest.skip(f"{model_type} is routed to {family_of_type(model_type)} (an earlier mapping lists it)")
    reason = cover(model_type, task, tmp_path)
    if reason and reason.startswith("refused: "):
        assert f"is a {model_type!r} model" in reason  # the refusal names the type, before any weights load
        return
    if (model_type, head) in UNCOVERED:
        assert reason is not None, f"{model_type} {head} works now: remove it from UNCOVERED"
    else:
        assert reason is None, f"{model_type} {head}: {reason}"


def test_uncovered_lists_only_types_of_the_mappings():
    for model_type, head in UNCOVERED:
        family = family_of_type(model_type)
        assert family is not None and model_type in _types(FAMILY_HEADS[family][head]), (model_type, head)


def main() -> None:
    """Print, per task, N of M types covered and each failure with its reason."""
    import tempfile

    tasks = sys.argv[1:] or sorted(TASKS)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in tasks:  # TASK or TASK:first:last (a slice of its types, to split a sweep over processes)
            task, *part = spec.split(":")
            start, failures = time.time(), {}
            types = _types(task)[int(part[0]):int(part[1])] if part else _types(task)
            for model_type in types:
                t0 = time.time()
                reason = cover(model_type, task, Path(tmp))
                print(f"  {model_type:32s} {time.time() - t0:5.1f}s {reason or 'ok'}", flush=True)
                if reason:
                    failures[model_type] = reason
            print(f"{spec}: {len(types) - len(failures)} of {len(types)} in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
