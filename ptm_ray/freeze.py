"""Depth freezing shared by every model family.

An adapter describes a model as an ordered list of blocks, input to output. A block is a name and the
dotted parameter-name prefixes it owns. Everything not in a block is the task head. The functions here
are pure over that description: no family ever carries its own copy of freezing logic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Block",
    "block_of_parameters",
    "freeze",
    "frozen_modules",
    "param_groups",
    "parameter_counts",
    "set_train_mode",
]


@dataclass(frozen=True)
class Block:
    """One depth unit of a model: a name and the parameter-name prefixes it owns."""

    name: str
    prefixes: tuple[str, ...]

    def owns(self, param_name: str) -> bool:
        return any(param_name == p or param_name.startswith(p + ".") for p in self.prefixes)


def block_of_parameters(model: nn.Module, blocks: list[Block]) -> dict[str, int]:
    """Map each parameter name to the index of its block, or -1 for the head.

    Raises:
        ValueError: if a parameter is claimed by two blocks (an adapter bug).
    """
    owner: dict[str, int] = {}
    for name, _ in model.named_parameters():
        hits = [i for i, b in enumerate(blocks) if b.owns(name)]
        if len(hits) > 1:
            raise ValueError(f"parameter {name} belongs to blocks {[blocks[i].name for i in hits]}")
        owner[name] = hits[0] if hits else -1
    return owner


def freeze(model: nn.Module, blocks: list[Block], depth: int) -> list[nn.Module]:
    """Freeze the first ``depth`` blocks and unfreeze everything else.

    Returns the largest submodules whose parameters are all frozen; ``set_train_mode`` keeps them in
    eval mode so their dropout and BatchNorm behave as at inference.
    """
    if not 0 <= depth <= len(blocks):
        raise ValueError(f"freeze depth {depth} outside 0..{len(blocks)}")
    owner = block_of_parameters(model, blocks)
    for name, param in model.named_parameters():
        param.requires_grad_(not 0 <= owner[name] < depth)
    return frozen_modules(model)


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The largest submodules whose parameters are all frozen (``set_train_mode`` keeps them in eval mode)."""
    frozen: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return frozen


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """``model.train()``, then put the frozen submodules back in eval mode."""
    model.train()
    for module in frozen:
        module.eval()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    params = list(model.parameters())  # named/unnamed iteration already de-duplicates tied weights
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def param_groups(
    model: nn.Module,
    blocks: list[Block],
    lr: float,
    head_lr: float,
    layer_decay: float,
    weight_decay: float,
) -> list[dict]:
    """AdamW parameter groups: head at ``head_lr``; block i at ``lr * layer_decay**(top - i)``.

    Biases and 1-d weights (norms) get no weight decay, as in Hugging Face's Trainer.
    Frozen parameters are left out.
    """
    owner = block_of_parameters(model, blocks)
    top = len(blocks) - 1
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index = owner[name]
        group_lr = head_lr if index < 0 else lr * layer_decay ** (top - index)
        decay = 0.0 if param.ndim <= 1 else weight_decay
        groups.setdefault((group_lr, decay), []).append(param)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]
