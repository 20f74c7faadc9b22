"""Depth freezing, train mode, parameter counts and optimizer groups, on a tiny hand-built model whose every
number is known (pure functions: no Ray, no pretrained weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptm_ray.freeze import Block, block_of_parameters, freeze, param_groups, parameter_counts, set_train_mode


class Tiny(nn.Module):
    """embed -> 3 layers (Linear + LayerNorm) -> head, with a dropout and an activation that own no parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 4)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(3))
        self.drop = nn.Dropout(0.5)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 3)


BLOCKS = [Block("embed", ("embed",)), *(Block(f"layer{i}", (f"layers.{i}",)) for i in range(3))]


def _trainable(model: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def test_block_owns_its_prefix_and_dotted_children_only():
    block = Block("layer1", ("layers.1", "norm"))
    assert block.owns("layers.1") and block.owns("layers.1.weight") and block.owns("norm.bias")
    # a bare startswith would hand layer 10's parameters (and "normal") to this block
    assert not block.owns("layers.10.weight") and not block.owns("normal.weight") and not block.owns("layers")


def test_block_of_parameters_maps_each_parameter_and_head_is_minus_one():
    owner = block_of_parameters(Tiny(), BLOCKS)
    assert owner == {"embed.weight": 0, "embed.bias": 0,
                     **{f"layers.{i}.{j}.{k}": i + 1 for i in range(3) for j in (0, 1) for k in ("weight", "bias")},
                     "head.weight": -1, "head.bias": -1}
    overlapping = [*BLOCKS, Block("again", ("layers.2.1",))]  # an adapter bug: LayerNorm claimed twice
    with pytest.raises(ValueError, match=r"parameter layers.2.1.weight belongs to blocks \['layer2', 'again'\]"):
        block_of_parameters(Tiny(), overlapping)


@pytest.mark.parametrize("depth", [0, 1, 2, 4])
def test_freeze_freezes_exactly_the_first_depth_blocks(depth):
    model = Tiny()
    owner = block_of_parameters(model, BLOCKS)
    freeze(model, BLOCKS, depth)
    assert _trainable(model) == {name: not 0 <= owner[name] < depth for name in owner}
    assert _trainable(model)["head.weight"]  # the head always trains


def test_freeze_returns_the_largest_fully_frozen_modules_and_unfreezes_again():
    model = Tiny()
    assert freeze(model, BLOCKS, 0) == []
    assert freeze(model, BLOCKS, 2) == [model.embed, model.layers[0]]  # not the half-frozen ModuleList
    assert freeze(model, BLOCKS, 4) == [model.embed, model.layers]  # the whole list once all of it is frozen
    frozen = freeze(model, BLOCKS, 1)  # a shallower depth unfreezes what the deeper one froze
    assert frozen == [model.embed] and all(p.requires_grad for p in model.layers.parameters())
    head_only = Tiny()
    for p in head_only.parameters():
        p.requires_grad_(False)
    assert freeze(head_only, [Block("all", ("embed", "layers", "head"))], 1) == [head_only]  # root, not its parts


@pytest.mark.parametrize("depth", [-1, 5])
def test_freeze_depth_outside_the_blocks_is_refused(depth):
    with pytest.raises(ValueError, match=rf"freeze depth {depth} outside 0..4"):
        freeze(Tiny(), BLOCKS, depth)


def test_set_train_mode_keeps_frozen_modules_in_eval():
    model = Tiny().eval()
    frozen = freeze(model, BLOCKS, 2)
    set_train_mode(model, frozen)
    modes = {name: m.training for name, m in model.named_modules()}
    assert modes[""] and modes["drop"] and modes["head"] and modes["layers"] and modes["layers.1"]
    assert not modes["embed"] and not modes["layers.0"] and not modes["layers.0.1"]  # eval: dropout/BN as served


def test_parameter_counts_trainable_total_and_tied_weights_once():
    model = Tiny()
    total = (2 * 4 + 4) + 3 * ((4 * 4 + 4) + (4 + 4)) + (4 * 3 + 3)  # 12 + 84 + 15
    assert parameter_counts(model) == (total, total) == (111, 111)
    freeze(model, BLOCKS, 2)  # embed (12) and layer 0 (28) frozen
    assert parameter_counts(model) == (111 - 12 - 28, 111)
    tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    tied[1].weight = tied[0].weight  # a language-model head tied to the embeddings
    assert parameter_counts(tied) == (15, 15)


def test_param_groups_layer_decay_head_lr_and_no_decay_on_biases_and_norms():
    model = Tiny()
    groups = param_groups(model, BLOCKS, lr=1.0, head_lr=7.0, layer_decay=0.5, weight_decay=0.01)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    expected_lr = {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0, -1: 7.0}  # lr * 0.5 ** (top - i); the head at head_lr
    owner = block_of_parameters(model, BLOCKS)
    for name, p in model.named_parameters():
        decay = 0.01 if p.ndim == 2 else 0.0  # biases and LayerNorm weights are 1-d: no weight decay
        assert by_param[id(p)] == (expected_lr[owner[name]], decay), name
    # one group per (lr, weight decay): 5 learning rates x {decayed, not decayed}
    assert len(groups) == 10 and sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(set(g) == {"params", "lr", "weight_decay"} for g in groups)


def test_param_groups_leave_frozen_parameters_out():
    model = Tiny()
    freeze(model, BLOCKS, 2)
    groups = param_groups(model, BLOCKS, lr=1e-3, head_lr=1e-3, layer_decay=1.0, weight_decay=0.1)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    # layer_decay 1.0 and head_lr == lr: every trainable parameter in one of two groups (decayed or not)
    assert sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in groups) == [(1e-3, 0.0, 7), (1e-3, 0.1, 3)]
    step = torch.optim.AdamW(groups)  # the groups are what AdamW takes
    assert len(step.param_groups) == 2
