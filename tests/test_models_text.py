"""Text families (BERT, RoBERTa, GPT-2, T5): load from a local folder, list blocks, freeze exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ptm_ray.config import Config, DataConfig, ModelConfig
from ptm_ray.freeze import block_of_parameters, freeze, param_groups, parameter_counts, set_train_mode
from ptm_ray.models import resolve_model
from ptm_ray.tiny import TEXT_FAMILIES

LABELS = ["a", "b", "c"]

# family -> (number of blocks, parameter-name prefixes of block 0, of the last block, of the head)
EXPECTED = {
    "bert": (3, ("bert.embeddings.",), ("bert.encoder.layer.1.",), ("bert.pooler.", "classifier.")),
    "roberta": (3, ("roberta.embeddings.",), ("roberta.encoder.layer.1.",), ("classifier.",)),
    "gpt2": (3, ("transformer.wte.", "transformer.wpe."), ("transformer.h.1.", "transformer.ln_f."), ("score.",)),
    "t5": (5, ("transformer.shared.",), ("transformer.decoder.block.1.", "transformer.decoder.final_layer_norm."),
           ("classification_head.",)),
}


def _load(family, tiny_text):
    cfg = Config(model=ModelConfig(name=f"hf:{tiny_text[family]}", max_length=32), data=DataConfig(train="x"))
    model_family, ref = resolve_model(cfg.model)
    torch.manual_seed(0)
    model = model_family.build(ref, LABELS, cfg.model, "classifier")
    return model_family, model, model_family.preprocessor(ref, model, cfg)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_blocks_partition_the_parameters(family, tiny_text):
    model_family, model, _ = _load(family, tiny_text)
    blocks = model_family.blocks(model)
    n_blocks, first, last, head = EXPECTED[family]
    assert len(blocks) == n_blocks
    owner = block_of_parameters(model, blocks)  # raises if a parameter sits in two blocks
    names = list(owner)
    assert {n for n in names if owner[n] == 0} == {n for n in names if n.startswith(first)}
    assert {n for n in names if owner[n] == n_blocks - 1} == {n for n in names if n.startswith(last)}
    assert {n for n in names if owner[n] == -1} == {n for n in names if n.startswith(head)}
    assert all(owner[n] >= 0 or n.startswith(head) for n in names)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_freeze_depths_zero_k_all(family, tiny_text):
    model_family, model, _ = _load(family, tiny_text)
    blocks = model_family.blocks(model)
    n_blocks, first, _, head = EXPECTED[family]
    everything = {n for n, _ in model.named_parameters()}
    head_names = {n for n in everything if n.startswith(head)}

    freeze(model, blocks, 0)
    assert _trainable(model) == everything

    freeze(model, blocks, 1)
    assert _trainable(model) == {n for n in everything if not n.startswith(first)}

    frozen = freeze(model, blocks, n_blocks)  # 'all': feature extraction, only the head trains
    assert _trainable(model) == head_names
    trainable, total = parameter_counts(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in head_names)
    assert 0 < trainable < total

    # frozen modules stay in eval mode (dropout off) while the head trains
    set_train_mode(model, frozen)
    assert all(not m.training for f in frozen for m in f.modules())
    head_modules = [m for n, m in model.named_modules() if n and (n + ".").startswith(head)]
    assert head_modules and all(m.training for m in head_modules)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_one_training_step_changes_only_trainable_parameters(family, tiny_text, support_texts):
    model_family, model, preprocessor = _load(family, tiny_text)
    blocks = model_family.blocks(model)
    frozen = freeze(model, blocks, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, blocks, 1e-2, 1e-2, 1.0, 0.0))
    set_train_mode(model, frozen)
    inputs = preprocessor(support_texts[:8])
    loss = F.cross_entropy(model_family.logits(model, inputs), torch.arange(8) % 3)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= _trainable(model)
    assert not any(n.startswith(EXPECTED[family][1]) for n in changed)


def test_layer_decay_and_head_lr(tiny_text):
    model_family, model, _ = _load("bert", tiny_text)
    blocks = model_family.blocks(model)
    freeze(model, blocks, 1)
    groups = param_groups(model, blocks, lr=1e-4, head_lr=1e-3, layer_decay=0.5, weight_decay=0.01)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["classifier.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(params["bert.encoder.layer.1.output.dense.weight"])] == pytest.approx(1e-4)  # top block
    assert lr_of[id(params["bert.encoder.layer.0.output.dense.weight"])] == pytest.approx(5e-5)  # one below
    assert id(params["bert.embeddings.word_embeddings.weight"]) not in lr_of  # frozen: not optimised
    assert wd_of[id(params["bert.encoder.layer.0.output.dense.bias"])] == 0.0  # no decay on biases
    assert wd_of[id(params["bert.encoder.layer.0.output.dense.weight"])] == 0.01


def test_minilm_short_name_loads_real_weights():
    cfg = Config(model=ModelConfig(name="minilm-l6"), data=DataConfig(train="x"))
    model_family, ref = resolve_model(cfg.model)
    model = model_family.build(ref, LABELS, cfg.model, "classifier")
    assert len(model_family.blocks(model)) == 7  # embeddings + 6 layers
    assert 22_000_000 < parameter_counts(model)[1] < 23_000_000
    # real pretrained weights: similar sentences get closer embeddings than unrelated ones
    pre = model_family.preprocessor(ref, model, cfg)
    with torch.no_grad():
        out = model.bert(**pre(["where is my parcel", "where is my package", "the cat sat on the mat"]))
    emb = F.normalize(out.last_hidden_state.mean(1), dim=-1)
    assert (emb[0] @ emb[1]) > (emb[0] @ emb[2]) + 0.2


def test_minilm_l3_is_the_lower_half_of_minilm_l6_with_its_weights():
    base = ModelConfig(name="minilm-l6")
    six_model_family, six_ref = resolve_model(base)
    three_model_family, three_ref = resolve_model(ModelConfig(name="minilm-l3"))
    six = six_model_family.build(six_ref, LABELS, base, "classifier")
    three = three_model_family.build(three_ref, LABELS, base, "classifier")
    assert len(three_model_family.blocks(three)) == 4  # embeddings + 3 layers
    six_state, three_state = six.state_dict(), three.state_dict()
    for key in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.2.output.dense.weight"):
        assert torch.equal(six_state[key], three_state[key])
    assert "bert.encoder.layer.3.output.dense.weight" not in three_state
    assert resolve_model(ModelConfig(name="minilm-l3"))[1].location == three_ref.location  # built once, reused
