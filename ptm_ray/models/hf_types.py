"""Which ``hf:`` model types ptm_ray takes, and for which heads: read from transformers' auto-mappings.

A model type (``config.model_type``) goes to the family of the first mapping that lists it:

============================================== ================ =============
transformers mapping                           family           head
============================================== ================ =============
``MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING``     ``hf-audio``     ``classifier``
``MODEL_FOR_CTC_MAPPING``                      ``hf-audio``     ``ctc``
``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING``  ``hf-text``      ``classifier``
``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING``     ``hf-text``      ``seq2seq``
``MODEL_FOR_CAUSAL_LM_MAPPING``                ``hf-text``      ``causal_lm``
``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING``     ``hf-vision``    ``classifier``
``MODEL_FOR_OBJECT_DETECTION_MAPPING``         ``hf-detection`` ``detector``
============================================== ================ =============

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
    "hf-detection": {"detector": "MODEL_FOR_OBJECT_DETECTION"},
}

# (model type, head) -> why ptm_ray does not take it: what tests/test_model_coverage.py found with transformers 5.24
# (``PTM_RAY_COVERAGE=all`` fails on a listed type that works, and on a failing type not listed). Refusals by
# design are not here: a causal LM head on a masked-LM encoder, a seq2seq head on a model that is not an
# encoder-decoder (``HFTextFamily.configure``).
UNCOVERED: dict[tuple[str, str], str] = {
    ('audio-spectrogram-transformer', 'classifier'):
        "takes spectrogram features, not the raw waveform ptm_ray's audio preprocessor feeds",
    ('axk1', 'causal_lm'):
        'failed in the coverage test with a tiny config: RuntimeError: The size of tensor a (4) must match '
        'the size of tensor b (8) at non-singleton dimension 3',
    ('axk1', 'classifier'):
        'failed in the coverage test with a tiny config: RuntimeError: The size of tensor a (4) must match '
        'the size of tensor b (8) at non-singleton dimension 3',
    ('axk2', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('axk2', 'classifier'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('bailing_hybrid', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('bamba', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_architecture':",
    ('beam', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('bit', 'classifier'):
        'failed in the coverage test with a tiny config: ValueError: num_channels must be divisible by '
        'num_groups',
    ('blt', 'causal_lm'): 'the coverage test could not shrink its config (still 96.2 M parameters): unchecked',
    ('canine', 'classifier'):
        "failed in the coverage test with a tiny config: RuntimeError: random_ expects 'from' to be less than "
        "'to', but got from=57346 >= to=128",
    ('codegen', 'causal_lm'):
        'failed in the coverage test with a tiny config: RuntimeError: The size of tensor a (16) must match '
        'the size of tensor b (64) at non-singleton dimension 3',
    ('cohere2_moe', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: `num_hidden_layers` (2) must be equal to '
        'the number of `mlp_layer_types` (40)',
    ('cohere_compass_text', 'causal_lm'): "failed in the coverage test with a tiny config: KeyError: 'full_attention'",
    ('cohere_compass_text', 'classifier'): "failed in the coverage test with a tiny config: KeyError: 'full_attention'",
    ('cvt', 'classifier'): 'the coverage test could not shrink its config (still 19.6 M parameters): unchecked',
    ('cwm', 'causal_lm'): "failed in the coverage test with a tiny config: TypeError: unhashable type: 'list'",
    ('dbrx', 'causal_lm'):
        "failed in the coverage test with a tiny config: AttributeError: 'DbrxAttentionConfig' object has no "
        "attribute 'rope_theta'",
    ('deepseek_v2', 'causal_lm'):
        "failed in the coverage test with a tiny config: TypeError: topk(): argument 'k' must be int, not "
        'NoneType',
    ('deepseek_v2', 'classifier'):
        "failed in the coverage test with a tiny config: TypeError: topk(): argument 'k' must be int, not "
        'NoneType',
    ('deepseek_v3', 'causal_lm'):
        'failed in the coverage test with a tiny config: RuntimeError: The size of tensor a (4) must match '
        'the size of tensor b (8) at non-singleton dimension 3',
    ('deepseek_v3', 'classifier'):
        'failed in the coverage test with a tiny config: RuntimeError: The size of tensor a (4) must match '
        'the size of tensor b (8) at non-singleton dimension 3',
    ('deepseek_v32', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('dinat', 'classifier'): 'needs a package ptm_ray does not install (ImportError when built)',
    ('dory', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_architecture':",
    ('dots1', 'causal_lm'):
        'failed in the coverage test with a tiny config: TypeError: empty() received an invalid combination '
        'of arguments - got (NoneType, int, int), but expected one o',
    ('dots3_note', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: `per_layer_config` keys must be integer '
        'layer indices in the range [0, 2); got [2, 3, 4, 6, 7, 8, ',
    ('dots3_note_text', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: `per_layer_config` keys must be integer '
        'layer indices in the range [0, 2); got [2, 3, 4, 6, 7, 8, ',
    ('efficientnet', 'classifier'):
        'the coverage test could not shrink its config (still 63.8 M parameters): unchecked',
    ('encoder-decoder', 'seq2seq'):
        'failed in the coverage test with a tiny config: ValueError: Make sure to set the pad_token_id '
        "attribute of the model's configuration.",
    ('ernie4_5_moe', 'causal_lm'):
        'failed in the coverage test with a tiny config: RuntimeError: selected index k out of range',
    ('esm', 'classifier'):
        "failed in the coverage test with a tiny config: TypeError: '<' not supported between instances of "
        "'int' and 'NoneType'",
    ('exaone_moe', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('falcon_mamba', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassFieldValidationError: Validation '
        "error for field 'conv_kernel':",
    ('gemma3n', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: intermediate_size must have an explicit '
        'intermediate size for every layer or one for all layers. E',
    ('gemma3n_text', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: intermediate_size must have an explicit '
        'intermediate size for every layer or one for all layers. E',
    ('gemma4', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: `per_layer_config` keys must be integer '
        'layer indices in the range [0, 2); got [5, 11, 17, 23, 29]',
    ('gemma4_assistant', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_architecture':",
    ('gemma4_text', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: `per_layer_config` keys must be integer '
        'layer indices in the range [0, 2); got [5, 11, 17, 23, 29]',
    ('gemma4_unified', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: `per_layer_config` keys must be integer '
        'layer indices in the range [0, 2); got [5, 11, 17, 23, 29]',
    ('gemma4_unified_assistant', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: `per_layer_config` keys must be integer '
        'layer indices in the range [0, 2); got [5, 11, 17, 23, 29]',
    ('gemma4_unified_text', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: `per_layer_config` keys must be integer '
        'layer indices in the range [0, 2); got [5, 11, 17, 23, 29]',
    ('git', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: Expected input batch_size (0) to match '
        'target batch_size (14).',
    ('glm', 'causal_lm'): "failed in the coverage test with a tiny config: TypeError: unhashable type: 'list'",
    ('glm', 'classifier'): "failed in the coverage test with a tiny config: TypeError: unhashable type: 'list'",
    ('glm4', 'causal_lm'): "failed in the coverage test with a tiny config: TypeError: unhashable type: 'list'",
    ('glm4', 'classifier'): "failed in the coverage test with a tiny config: TypeError: unhashable type: 'list'",
    ('glm_moe_dsa', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('gpt_neo', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_architecture':",
    ('gpt_neo', 'classifier'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_architecture':",
    ('gptj', 'causal_lm'):
        'failed in the coverage test with a tiny config: RuntimeError: The size of tensor a (16) must match '
        'the size of tensor b (64) at non-singleton dimension 3',
    ('gptj', 'classifier'):
        'failed in the coverage test with a tiny config: RuntimeError: The size of tensor a (16) must match '
        'the size of tensor b (64) at non-singleton dimension 3',
    ('granite_speech5_ctc', 'ctc'):
        'its discovered blocks leave no head parameters (the head sits inside the backbone)',
    ('granitemoehybrid', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_architecture':",
    ('hgnet_v2', 'classifier'): 'the coverage test could not shrink its config (still 13.6 M parameters): unchecked',
    ('hrm_text', 'causal_lm'): 'failed in the coverage test with a tiny config: IndexError: list index out of range',
    ('hy_v4', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('imagegpt', 'classifier'):
        'failed in the coverage test with a tiny config: ValueError: You have to specify either input_ids or '
        'inputs_embeds',
    ('inkling_text', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('jamba', 'causal_lm'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('jamba', 'classifier'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('kimi_linear', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('laguna', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_architecture':",
    ('lasr_ctc', 'ctc'): "takes spectrogram features, not the raw waveform ptm_ray's audio preprocessor feeds",
    ('layoutlmv2', 'classifier'): 'needs a package ptm_ray does not install (ImportError when built)',
    ('layoutlmv3', 'classifier'):
        'failed in the coverage test with a tiny config: RuntimeError: The size of tensor a (32) must match '
        'the size of tensor b (768) at non-singleton dimension 2',
    ('levit', 'classifier'):
        'failed in the coverage test with a tiny config: RuntimeError: The size of tensor a (4) must match '
        'the size of tensor b (64) at non-singleton dimension 3',
    ('lfm2_moe', 'causal_lm'):
        "failed in the coverage test with a tiny config: TypeError: 'NoneType' object is not subscriptable",
    ('lfm3', 'causal_lm'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('lilt', 'classifier'):
        'failed in the coverage test with a tiny config: RuntimeError: mat1 and mat2 shapes cannot be '
        'multiplied (16x30 and 32x8)',
    ('longcat_flash', 'causal_lm'):
        'the coverage test could not shrink its config (still 68.8 M parameters): unchecked',
    ('mamba', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassFieldValidationError: Validation '
        "error for field 'conv_kernel':",
    ('mamba2', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassFieldValidationError: Validation '
        "error for field 'conv_kernel':",
    ('marian', 'seq2seq'):
        'failed in the coverage test with a tiny config: loaded model predicts differently (max diff '
        '8.74e-04)',
    ('mellum', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('mimo_v2_flash', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('minimax_m3_vl_text', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_layer_type':",
    ('mobilenet_v1', 'classifier'): 'the coverage test could not shrink its config (still 3.2 M parameters): unchecked',
    ('mobilevitv2', 'classifier'): 'the coverage test could not shrink its config (still 4.4 M parameters): unchecked',
    ('musicgen', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: Multiple valid text configs were found '
        "in the model config: ['text_encoder', 'decoder']. In this c",
    ('musicgen_melody', 'causal_lm'):
        'failed in the coverage test with a tiny config: ValueError: Multiple valid text configs were found '
        "in the model config: ['text_encoder', 'decoder']. In this c",
    ('nemo_speechlm', 'seq2seq'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_architecture':",
    ('nemotron', 'causal_lm'):
        "failed in the coverage test with a tiny config: TypeError: unsupported operand type(s) for //: 'int' "
        "and 'NoneType'",
    ('nemotron', 'classifier'):
        "failed in the coverage test with a tiny config: TypeError: unsupported operand type(s) for //: 'int' "
        "and 'NoneType'",
    ('nemotron_h', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassFieldValidationError: Validation '
        "error for field 'conv_kernel':",
    ('olmo_hybrid', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_architecture':",
    ('omniasr_ctc', 'ctc'):
        'failed in the coverage test with a tiny config: RuntimeError: Given groups=1, weight of size [16, 1, '
        '10], expected input[1, 2, 3200] to have 1 channels, but g',
    ('parakeet_ctc', 'ctc'): "takes spectrogram features, not the raw waveform ptm_ray's audio preprocessor feeds",
    ('perceiver', 'classifier'): 'the coverage test could not shrink its config (still 269.5 M parameters): unchecked',
    ('phi4_multimodal', 'causal_lm'):
        'the coverage test could not shrink its config (still 6.2 M parameters): unchecked',
    ('pp_lcnet', 'classifier'):
        "failed in the coverage test with a tiny config: AttributeError: 'BaseModelOutputWithNoAttention' "
        "object has no attribute 'logits'",
    ('pvt', 'classifier'):
        'failed in the coverage test with a tiny config: ValueError: The hidden size (32) is not a multiple '
        'of the number of attention heads (5)',
    ('pvt_v2', 'classifier'):
        'failed in the coverage test with a tiny config: ValueError: The hidden size (32) is not a multiple '
        'of the number of attention heads (5)',
    ('qwen3_5', 'causal_lm'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('qwen3_5', 'classifier'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('qwen3_5_moe', 'causal_lm'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('qwen3_5_moe_text', 'causal_lm'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('qwen3_5_text', 'causal_lm'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('qwen3_5_text', 'classifier'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('qwen3_next', 'causal_lm'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('qwen3_next', 'classifier'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('qwen4_exp', 'causal_lm'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('qwen4_exp_text', 'causal_lm'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('recurrent_gemma', 'causal_lm'):
        'the coverage test could not shrink its config (still 13.7 M parameters): unchecked',
    ('reformer', 'classifier'):
        'failed in the coverage test with a tiny config: ValueError: Make sure that config.axial_pos_embds '
        'factors: (64, 192) sum to config.hidden_size: 32',
    ('rwkv', 'causal_lm'):
        'failed in the coverage test with a tiny config: RuntimeError: The size of tensor a (32) must match '
        'the size of tensor b (4096) at non-singleton dimension 1',
    ('shieldgemma2', 'classifier'):
        'its discovered blocks leave no head parameters (the head sits inside the backbone)',
    ('siglip2', 'classifier'):
        'failed in the coverage test with a tiny config: RuntimeError: mat1 and mat2 shapes cannot be '
        'multiplied (192x32 and 48x32)',
    ('textnet', 'classifier'):
        'failed in the coverage test with a tiny config: RuntimeError: Given groups=1, weight of size [32, '
        '32, 3, 3], expected input[2, 64, 320, 320] to have 32 channe',
    ('timm_wrapper', 'classifier'):
        'the coverage test could not shrink its config (still 23.5 M parameters): unchecked',
    ('wav2vec2-bert', 'classifier'):
        "takes spectrogram features, not the raw waveform ptm_ray's audio preprocessor feeds",
    ('wav2vec2-bert', 'ctc'): "takes spectrogram features, not the raw waveform ptm_ray's audio preprocessor feeds",
    ('whisper', 'classifier'): "takes spectrogram features, not the raw waveform ptm_ray's audio preprocessor feeds",
    ('xlstm', 'causal_lm'):
        'failed in the coverage test with a tiny config: RuntimeError: The size of tensor a (4096) must match '
        'the size of tensor b (32) at non-singleton dimension 2',
    ('xmod', 'classifier'):
        'failed in the coverage test with a tiny config: ValueError: Input language unknown. Please call '
        '`XmodPreTrainedModel.set_default_language()`',
    ('youtu', 'causal_lm'):
        'failed in the coverage test with a tiny config: RuntimeError: The size of tensor a (4) must match '
        'the size of tensor b (8) at non-singleton dimension 3',
    ('zamba', 'causal_lm'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('zamba', 'classifier'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('zamba2', 'causal_lm'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('zamba2', 'classifier'):
        "transformers' head fails on its linear-attention cache (get_seq_length) in the coverage test",
    ('zaya', 'causal_lm'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: Class '
        "validation error for validator 'validate_architecture':",
    # object detectors (MODEL_FOR_OBJECT_DETECTION)
    ('d_fine', 'detector'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: embedded dimension 32 '
        'must be divisible by decoder_attention_heads 2 (its validator): unchecked',
    ('deimv2', 'detector'):
        'failed in the coverage test with a tiny config: StrictDataclassClassValidationError: embedded dimension 32 '
        'must be divisible by decoder_attention_heads 2 (its validator): unchecked',
    ('lw_detr', 'detector'):
        "the coverage test's tiny config (a small Hugging Face ResNet backbone) does not fit its backbone (a ViT "
        "whose out_indices [2, 4, 5, 9] need 10 layers): unchecked",
    ('rf_detr', 'detector'):
        "the coverage test's tiny config (a small Hugging Face ResNet backbone) does not fit its backbone (a DINOv2 "
        "whose out_indices [2, 5, 8, 11] need 12 layers): unchecked",
    ('pp_doclayout_v2', 'detector'): 'the coverage test could not shrink its config (still 21.0 M parameters): unchecked',
    ('pp_doclayout_v3', 'detector'):
        "the coverage test's tiny config (a small Hugging Face ResNet backbone) does not fit its backbone: "
        "RuntimeError: Given groups=1, weight of size [64, 128, 3, 3], expected input[2, 16, 16, 16] to have 128 "
        "channels: unchecked",
    ('pp_doclayout_v4', 'detector'): "transformers' PPDocLayoutV4ForObjectDetection does not support training",
    **{(ocr, 'detector'): "a text-line detector: it outputs a map of text regions for OCR, not boxes with classes"
       for ocr in ('pp_ocrv5_mobile_det', 'pp_ocrv5_server_det', 'pp_ocrv6_medium_det', 'pp_ocrv6_small_det')},
}


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
