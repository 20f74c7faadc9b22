"""Block layouts discovered from the module tree (no Ray): the six formerly listed types keep their blocks exactly;
ALBERT's shared layer group, tied LM heads, encoder-decoders, decoders and vision models get what the docs say."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from ptm_ray.config import ModelConfig
from ptm_ray.freeze import Block, block_of_parameters, freeze
from ptm_ray.models import family_for, resolve_model
from ptm_ray.models.hf_types import UNCOVERED, family_of_type, head_unsupported
from ptm_ray.models.layout import LayoutError, discover_blocks, discover_detector_blocks

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
             conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
             vocab_size=12)

# The hand-written layouts ptm_ray had before discovery (text.py's _LAYOUTS and audio.py's blocks), verbatim.
_FORMER_TEXT = {
    "bert": (["embeddings"], [("encoder.layer", [])]),
    "roberta": (["embeddings"], [("encoder.layer", [])]),
    "gpt2": (["wte", "wpe"], [("h", ["ln_f"])]),
    "t5": (["shared"], [("encoder.block", ["encoder.final_layer_norm"]),
                        ("decoder.block", ["decoder.final_layer_norm"])]),
}


def _former_text(model: nn.Module) -> list[Block]:
    embeddings, stacks = _FORMER_TEXT[model.config.model_type]
    base = "" if model.base_model is model else model.base_model_prefix + "."
    blocks = [Block("embeddings", tuple(base + m for m in embeddings))]
    for stack, trailer in stacks:
        n = len(model.base_model.get_submodule(stack))
        for i in range(n):
            extra = tuple(base + m for m in trailer) if i == n - 1 else ()
            blocks.append(Block(f"{stack}.{i}", (f"{base}{stack}.{i}",) + extra))
    return blocks


def _former_audio(model: nn.Module) -> list[Block]:
    base = model.base_model_prefix
    projection = [f"{base}.feature_projection", f"{base}.encoder.pos_conv_embed", f"{base}.encoder.layer_norm"]
    if getattr(model.base_model, "masked_spec_embed", None) is not None:
        projection.append(f"{base}.masked_spec_embed")
    blocks = [Block("feature_encoder", (f"{base}.feature_extractor",)), Block("feature_projection", tuple(projection))]
    layers = model.base_model.encoder.layers
    blocks += [Block(f"encoder.layers.{i}", (f"{base}.encoder.layers.{i}",)) for i in range(len(layers))]
    return blocks


def _text_config(model_type: str):
    if model_type == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, pad_token_id=0)
    if model_type == "t5":
        return transformers.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                                     vocab_size=100, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return transformers.AutoConfig.for_model(model_type, **TEXT)


FORMER = [
    ("bert", "AutoModelForSequenceClassification"),
    ("roberta", "AutoModelForSequenceClassification"),
    ("gpt2", "AutoModelForSequenceClassification"),
    ("gpt2", "AutoModelForCausalLM"),
    ("t5", "AutoModelForSequenceClassification"),
    ("t5", "AutoModelForSeq2SeqLM"),
    ("wav2vec2", "AutoModelForAudioClassification"),
    ("wav2vec2", "AutoModelForCTC"),
    ("hubert", "AutoModelForAudioClassification"),
    ("hubert", "AutoModelForCTC"),
]


@pytest.mark.parametrize("model_type, auto", FORMER)
def test_discovered_blocks_equal_the_former_hand_written_layouts(model_type, auto):
    audio = model_type in ("wav2vec2", "hubert")
    config = transformers.AutoConfig.for_model(model_type, **AUDIO) if audio else _text_config(model_type)
    model = getattr(transformers, auto).from_config(config)
    expected = _former_audio(model) if audio else _former_text(model)
    assert discover_blocks(model) == expected
    assert len(expected) == (5 if model_type == "t5" else 4 if audio else 3)


def test_wav2vec2_masked_spec_embed_and_layer_norm_feature_encoder_keep_their_place():
    # mask_time_prob=0 drops masked_spec_embed; feat_extract_norm=layer makes the conv layers one class (a
    # ModuleList of 2 layers inside the feature encoder, smaller than the transformer stack)
    config = transformers.Wav2Vec2Config(**AUDIO, mask_time_prob=0.0, mask_feature_prob=0.0, feat_extract_norm="layer")
    model = transformers.Wav2Vec2ForSequenceClassification(config)
    assert discover_blocks(model) == _former_audio(model)


def _albert(groups: int):
    config = transformers.AlbertConfig(embedding_size=16, num_hidden_groups=groups, num_hidden_layers=4, **{
        k: v for k, v in TEXT.items() if k != "num_hidden_layers"})
    return transformers.AlbertForSequenceClassification(config)


def test_albert_shared_layer_group_is_one_block_and_freezing_it_freezes_every_application():
    model = _albert(groups=1)  # one layer group applied 4 times
    blocks = discover_blocks(model)
    assert blocks == [Block("embeddings", ("albert.embeddings", "albert.encoder.embedding_hidden_mapping_in")),
                      Block("encoder.albert_layer_groups.0", ("albert.encoder.albert_layer_groups.0",))]
    freeze(model, blocks, 2)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "albert.pooler.weight", "albert.pooler.bias", "classifier.weight", "classifier.bias"}
    two = discover_blocks(_albert(groups=2))  # 4 layers in 2 groups: one block per group
    assert [b.name for b in two] == ["embeddings", "encoder.albert_layer_groups.0", "encoder.albert_layer_groups.1"]


def test_tied_lm_head_is_owned_once_and_frozen_with_the_embeddings():
    model = transformers.GPT2LMHeadModel(_text_config("gpt2"))
    assert model.lm_head.weight is model.transformer.wte.weight
    blocks = discover_blocks(model)
    owner = block_of_parameters(model, blocks)  # raises if a parameter is in two blocks
    assert owner["transformer.wte.weight"] == 0 and "lm_head.weight" not in owner
    freeze(model, blocks, 1)
    assert not model.lm_head.weight.requires_grad  # the same tensor as the frozen input embeddings
    assert {n for n, i in owner.items() if i == -1} == set()  # a tied LM head has no parameter of its own


def test_encoder_decoder_embeddings_registered_after_the_layers_and_decoder_positions():
    config = transformers.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                                     max_position_embeddings=64)
    blocks = discover_blocks(transformers.BartForSequenceClassification(config))
    assert blocks == [
        Block("embeddings", ("model.shared", "model.encoder.embed_positions", "model.encoder.layernorm_embedding")),
        Block("encoder.layers.0", ("model.encoder.layers.0",)),
        Block("encoder.layers.1", ("model.encoder.layers.1",)),
        Block("decoder.layers.0", ("model.decoder.layers.0", "model.decoder.embed_positions",
                                   "model.decoder.layernorm_embedding")),
        Block("decoder.layers.1", ("model.decoder.layers.1",)),
    ]


def test_llama_style_decoder_final_norm_rides_with_the_last_layer():
    config = transformers.LlamaConfig(**TEXT, num_key_value_heads=1, pad_token_id=0)
    blocks = discover_blocks(transformers.LlamaForSequenceClassification(config))
    assert blocks == [Block("embeddings", ("model.embed_tokens",)), Block("layers.0", ("model.layers.0",)),
                      Block("layers.1", ("model.layers.1", "model.norm"))]


def test_vision_models_patch_embeddings_then_layers_or_stages():
    vit = transformers.ViTConfig(**{k: v for k, v in TEXT.items() if k != "vocab_size"}, image_size=32, patch_size=8)
    assert discover_blocks(transformers.ViTForImageClassification(vit)) == [
        Block("embeddings", ("vit.embeddings",)), Block("layers.0", ("vit.layers.0",)),
        Block("layers.1", ("vit.layers.1", "vit.layernorm"))]
    convnext = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    assert discover_blocks(transformers.ConvNextForImageClassification(convnext)) == [
        Block("embeddings", ("convnext.embeddings",)), Block("encoder.stages.0", ("convnext.encoder.stages.0",)),
        Block("encoder.stages.1", ("convnext.encoder.stages.1", "convnext.layernorm"))]


def _detector(model_type: str, **changes) -> nn.Module:
    from ptm_ray.tiny import tiny_detector_config

    config = tiny_detector_config(model_type)
    for key, value in changes.items():
        setattr(config, key, value)
    config.num_labels = 3
    return transformers.AutoModelForObjectDetection.from_config(config)


def test_detr_stem_backbone_stages_then_encoder_and_decoder_layers_with_the_predictors_as_head():
    model = _detector("detr")
    blocks = discover_detector_blocks(model)
    assert [b.name for b in blocks] == ["stem"] + [f"backbone.model.encoder.stages.{i}" for i in range(4)] + [
        "encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.1"]
    owner = block_of_parameters(model, blocks)
    assert {n.split(".")[0] for n, i in owner.items() if i < 0} == {"class_labels_classifier", "bbox_predictor"}
    # the input projection and the object queries run before the first encoder layer; the decoder's norm after
    # its last layer
    assert owner["model.input_projection.weight"] == owner["model.query_position_embeddings.weight"] == 5
    assert owner["model.decoder.layernorm.weight"] == len(blocks) - 1
    assert all(owner[n] == 0 for n in owner if n.startswith("model.backbone.model.embedder."))


def test_rt_detr_class_heads_inside_its_decoder_are_the_head_and_its_neck_rides_with_the_first_decoder_layer():
    model = _detector("rt_detr")
    blocks = discover_detector_blocks(model)
    names = [b.name for b in blocks]
    assert names[5:] == ["encoder.aifi.0.layers.0", "encoder.aifi.0.layers.1", "decoder.layers.0", "decoder.layers.1"]
    owner = block_of_parameters(model, blocks)
    head = {n for n, i in owner.items() if i < 0}
    # every tensor whose shape follows the labels is in the head, so a checkpoint's head of another size is replaced
    assert {"model.decoder.class_embed.0.weight", "model.enc_score_head.weight", "model.denoising_class_embed.weight"} <= head
    assert owner["model.encoder.fpn_blocks.0.conv1.conv.weight"] == names.index("decoder.layers.0")


def test_a_timm_backbone_is_split_at_its_stages_and_yolos_is_an_encoder():
    # released DETR checkpoints use timm's ResNet-50 (features_only): conv1/bn1 are the stem, layer1..4 the stages
    timm_resnet = transformers.TimmBackboneConfig(backbone="resnet18", out_indices=[1, 2, 3, 4],
                                                  use_pretrained_backbone=False)
    model = _detector("detr", backbone_config=timm_resnet)
    names = [b.name for b in discover_detector_blocks(model)]
    assert names[:5] == ["stem"] + [f"backbone.model.layer{i}" for i in range(1, 5)], names
    assert [b.name for b in discover_detector_blocks(_detector("yolos"))] == ["embeddings", "encoder.layer.0",
                                                                             "encoder.layer.1"]


def test_a_model_without_a_layer_stack_is_refused_naming_it():
    with pytest.raises(LayoutError, match="Sequential holds no nn.ModuleList of layers"):
        discover_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


@pytest.mark.parametrize("model_type, family", [
    ("bert", "hf-text"), ("distilbert", "hf-text"), ("llama", "hf-text"), ("bart", "hf-text"), ("marian", "hf-text"),
    ("wavlm", "hf-audio"), ("data2vec-audio", "hf-audio"), ("whisper", "hf-audio"), ("vit", "hf-vision"),
    ("swin", "hf-vision"), ("sam", None), ("detr", "hf-detection"), ("rt_detr", "hf-detection"),
    ("yolos", "hf-detection"),
])
def test_model_types_are_routed_by_the_auto_mappings(model_type, family):
    assert family_of_type(model_type) == family


def test_a_head_the_model_type_cannot_make_is_refused_before_any_weights(tmp_path):
    config = transformers.MarianConfig(d_model=32, encoder_layers=1, decoder_layers=1, vocab_size=100)
    config.save_pretrained(tmp_path / "marian")
    family, _ = resolve_model(ModelConfig(name=f"hf:{tmp_path / 'marian'}"))
    assert family.name == "hf-text"
    with pytest.raises(ValueError, match="model.task=classification is not available for model.name=hf:.*no classifier "
                                         "head for 'marian' models.*hf-text builds \\['seq2seq', 'causal_lm'\\]"):
        family.configure(config, "classifier", ["a", "b"], ModelConfig(name=f"hf:{tmp_path / 'marian'}"))
    assert head_unsupported("hf-audio", "whisper", "ctc").startswith("transformers has no ctc head for 'whisper'")


def test_an_unrouted_type_is_refused_when_resolved(tmp_path):
    transformers.SamConfig().save_pretrained(tmp_path / "sam")
    with pytest.raises(ValueError, match="is a 'sam' model, which none of the transformers auto-mappings"):
        resolve_model(ModelConfig(name=f"hf:{tmp_path / 'sam'}"))


def test_every_uncovered_type_is_refused_with_its_reason():
    assert UNCOVERED, "the coverage test found types ptm_ray cannot take; they are listed"
    for (model_type, head), reason in UNCOVERED.items():
        family = family_of_type(model_type)
        assert family is not None, model_type
        message = head_unsupported(family, model_type, head)
        assert message is not None and model_type in message and reason in message
        # refused on the type alone (some default configs of these types do not even construct)
        config = SimpleNamespace(model_type=model_type, is_encoder_decoder=head == "seq2seq")
        with pytest.raises(ValueError, match=f"'{model_type}' models with a {head} head"):
            family_for(family).configure(config, head, ["a", "b"], ModelConfig(name="hf:x", task=head))


def test_the_feature_cache_stays_with_the_types_it_was_checked_on():
    from ptm_ray.models.audio import HFAudioFamily
    from ptm_ray.models.text import HFTextFamily

    wavlm = transformers.WavLMForSequenceClassification(transformers.WavLMConfig(**AUDIO))
    assert HFAudioFamily().cache_unsupported(wavlm, 1) == (
        "cache not supported for hf-audio 'wavlm' (only ['hubert', 'wav2vec2']), falling back to uncached")
    llama = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**TEXT, pad_token_id=0))
    assert HFTextFamily().cache_unsupported(llama, 1) == (
        "cache not supported for hf-text 'llama' (only ['bert']), falling back to uncached")
