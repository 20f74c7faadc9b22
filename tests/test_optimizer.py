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


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
def test_schedules_match_transformers_and_resume_from_its_state(name):
    # the loop's own schedules (no transformers import in timm/torchvision/torchaudio workers) step for step
    # what transformers.get_scheduler gives, and load the state a checkpoint saved with it
    from transformers import get_scheduler

    _, optimizer, scheduler = _built(f"optim.scheduler={name}", "optim.warmup_ratio=0.25", steps_per_epoch=6)
    _, theirs_opt, _ = _built(f"optim.scheduler={name}", "optim.warmup_ratio=0.25", steps_per_epoch=6)
    theirs = get_scheduler(name, theirs_opt, num_warmup_steps=3, num_training_steps=12)
    assert _lrs(optimizer, scheduler, 12) == pytest.approx(_lrs(theirs_opt, theirs, 12))
    _, optimizer, resumed = _built(f"optim.scheduler={name}", "optim.warmup_ratio=0.25", steps_per_epoch=6)
    resumed.load_state_dict(theirs.state_dict())
    assert resumed.last_epoch == 12 and resumed.get_last_lr() == pytest.approx(theirs.get_last_lr())


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


@pytest.mark.parametrize("mode, values, stop_after", [
    # min_delta 0.1 in "max" mode: +0.1 exactly is not an improvement (bug guarded: >= for >), +0.1001 is
    ("max", [0.5, 0.6, 0.7001, 0.75], None),  # one bad epoch (+0.1), then +0.1001 resets the count
    ("max", [0.5, 0.6001, 0.7002, 0.75], None),
    ("max", [0.5, 0.6, 0.7], 3),
    # "min": the same margin below the best (bug guarded: the sign of min_delta flipped for min)
    ("min", [1.0, 0.8999, 0.79, 0.75, 0.7], 5),
    ("min", [1.0, 1.2, 0.95, 0.9], 3),  # worse, then better by less than min_delta: two bad epochs
])
def test_early_stopping_counts_only_gains_beyond_min_delta(mode, values, stop_after):
    from ptm_ray.worker import EarlyStopping

    stopper = EarlyStopping(mode, patience=2, min_delta=0.1)
    stopped = None
    for epoch, value in enumerate(values, start=1):
        stopper.update(value, epoch)
        if stopper.should_stop:
            stopped = epoch
            break
    assert stopped == stop_after
    # a smaller gain still moves the best (the checkpoint ranking follows the metric itself)
    best = max(values[:stopped]) if mode == "max" else min(values[:stopped])
    assert stopper.best == best and stopper.best_epoch == values.index(best) + 1
    restored = EarlyStopping(mode, patience=2, min_delta=0.1)
    restored.load_state_dict(stopper.state_dict())  # what resume restores
    assert (restored.best, restored.best_epoch, restored.bad_epochs) == (stopper.best, stopper.best_epoch, stopper.bad_epochs)


def test_early_stopping_without_patience_never_stops():
    from ptm_ray.worker import EarlyStopping

    stopper = EarlyStopping("max", patience=0, min_delta=0.0)
    for epoch in range(1, 20):
        stopper.update(0.5, epoch)
    assert not stopper.should_stop and stopper.bad_epochs == 18
