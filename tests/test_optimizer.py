"""The optimizer and schedule the training loop builds (worker._optimizer), checked step by step without Ray."""

from __future__ import annotations

import pytest
import torch

from ptm_ray.config import load_config
from ptm_ray.worker import _optimizer

from test_freeze import BLOCKS, Tiny


def _built(*overrides: str, steps_per_epoch: int = 8):
    cfg = load_config(None, ["data.train=unused", "model.name=minilm-l6", "optim.lr=0.01", "optim.weight_decay=0.1",
                             "train.epochs=2", *overrides])
    model = Tiny()
    return model, *_optimizer(cfg, model, BLOCKS, steps_per_epoch)


def _lrs(optimizer, scheduler, steps: int) -> list[float]:
    """The head group's learning rate before each of ``steps`` optimizer steps."""
    seen = []
    for _ in range(steps):
        seen.append(max(g["lr"] for g in optimizer.param_groups))
        optimizer.step()
        scheduler.step()
    return seen


def test_head_lr_defaults_to_lr_and_layer_decay_shapes_the_backbone():
    # bug guarded: head_lr unset giving the head lr 0 (None) or the backbone's decayed rate
    model, optimizer, _ = _built("optim.scheduler=constant", "optim.warmup_ratio=0", "optim.layer_decay=0.5")
    rates = sorted({g["initial_lr"] for g in optimizer.param_groups})
    assert rates == pytest.approx([0.00125, 0.0025, 0.005, 0.01])  # blocks 0..3 at 0.01 * 0.5**(3-i); head at 0.01
    head = [g for g in optimizer.param_groups if any(p is model.head.weight for p in g["params"])][0]
    assert head["initial_lr"] == 0.01 and head["weight_decay"] == 0.1
    norms = [g for g in optimizer.param_groups if any(p.ndim == 1 for p in g["params"])]
    assert norms and all(g["weight_decay"] == 0.0 and all(p.ndim == 1 for p in g["params"]) for g in norms)


def test_linear_schedule_warms_up_then_decays_over_every_optimizer_step():
    # 8 batches per epoch with 2-step accumulation = 4 optimizer steps per epoch, 8 in the run; 25 % warm-up = 2 steps
    # bug guarded: counting batches instead of optimizer steps (the schedule would end halfway through the run)
    _, optimizer, scheduler = _built("optim.scheduler=linear", "optim.warmup_ratio=0.25", "train.grad_accum_steps=2")
    assert _lrs(optimizer, scheduler, 8) == pytest.approx([0.0, 0.005, 0.01, 0.01 * 5 / 6, 0.01 * 4 / 6, 0.01 * 3 / 6,
                                                          0.01 * 2 / 6, 0.01 * 1 / 6])
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0)  # ends at zero exactly when the run ends


def test_cosine_schedule_is_half_way_down_half_way_through():
    _, optimizer, scheduler = _built("optim.scheduler=cosine", "optim.warmup_ratio=0", steps_per_epoch=5)
    lrs = _lrs(optimizer, scheduler, 10)
    assert lrs[0] == pytest.approx(0.01) and lrs[5] == pytest.approx(0.005)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_an_optimizer_step_changes_only_trainable_parameters():
    # bug guarded: frozen blocks handed to AdamW (weight decay alone would move them)
    model = Tiny()
    for p in model.embed.parameters():
        p.requires_grad_(False)
    cfg = load_config(None, ["data.train=unused", "model.name=minilm-l6", "optim.weight_decay=0.5",
                             "optim.scheduler=constant", "optim.warmup_ratio=0"])
    optimizer, _ = _optimizer(cfg, model, BLOCKS, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = model.embed(torch.ones(2, 2))
    for layer in model.layers:
        x = layer(x)
    model.head(x).pow(2).sum().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, _ in model.named_parameters() if not n.startswith("embed")}
