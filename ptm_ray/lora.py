"""LoRA beside depth freezing, through ``peft``: adapters on the blocks above the frozen ones.

Semantics of ``model.lora.r > 0`` (``ptm_ray.config.LoraGroup``):

- the lowest ``model.freeze_depth`` blocks are frozen and get no adapters;
- every block above them keeps its own weights frozen too and gets rank-r adapters on its target layers:
  ``model.lora.target_modules`` (layer-name suffixes, as peft matches them), or by default every linear layer
  of those blocks (``nn.Linear``, GPT-2's ``Conv1D``; for a block with none, its 2-D convolutions), the
  "all-linear" choice QLoRA recommends over attention projections only;
- the task head (the parameters in no block: pooler, classifier) trains fully.

Blocks come from the family (``family.blocks(model)``), so every family gets LoRA without a table of model
types. Adapters are injected in place (``peft.LoraModel``): the model keeps its class and its parameter
names keep their block prefixes, so freezing, layer-wise learning rates, the feature cache (adapters sit
only above the cached prefix, which stays the pretrained one) and DDP work unchanged.

Checkpoints hold the model merged (``merge_and_unload``: a plain model for evaluation and serving) and,
for resuming, the adapters, head and buffers (``adapter_state``) in ``train_state.pt``; a resumed run
rebuilds the pretrained backbone, injects the same adapters and loads that state.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ptm_ray.config import LoraGroup
from ptm_ray.freeze import Block, block_of_parameters

__all__ = ["adapter_state", "apply_lora", "describe_lora", "load_adapter_state", "lora_targets", "merged_copy"]


def _linear_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer
    except ImportError:  # pragma: no cover - transformers is a dependency; timm-only installs still work
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def lora_targets(model: nn.Module, blocks: list[Block], depth: int, lora: LoraGroup) -> list[str]:
    """Full names of the layers that get adapters: in ``blocks[depth:]`` only, as ``lora`` selects them.

    Raises:
        ValueError: when no block is left above the frozen ones, or no layer there matches, naming the key.
    """
    if depth >= len(blocks):
        raise ValueError(f"model.lora.r={lora.r} with model.freeze_depth freezing all {len(blocks)} blocks leaves "
                         "no block for adapters: lower model.freeze_depth, or set model.lora.r=0 (train the head only)")
    above = blocks[depth:]
    kinds = (*_linear_types(), nn.Conv2d)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, kinds) and any(b.owns(name) for b in above)}
    if lora.target_modules:
        chosen = [n for n in layers if any(n == t or n.endswith("." + t) for t in lora.target_modules)]
        if not chosen:
            names = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise ValueError(f"model.lora.target_modules={lora.target_modules} matches no linear or convolution layer "
                             f"in the unfrozen blocks ({above[0].name}..{above[-1].name}); their layer names: "
                             f"{', '.join(names) or 'none'}")
        return chosen
    chosen = []
    for block in above:  # every linear layer of a block; a block without any: its convolutions
        own = [n for n, m in layers.items() if block.owns(n)]
        linear = [n for n in own if isinstance(layers[n], _linear_types())]
        chosen += linear or own
    if not chosen:
        raise ValueError(f"model.lora: the unfrozen blocks ({above[0].name}..{above[-1].name}) hold no linear or "
                         "2-D convolution layer to adapt; name layers in model.lora.target_modules")
    return chosen


def apply_lora(model: nn.Module, blocks: list[Block], depth: int, lora: LoraGroup) -> Any:
    """Inject adapters into ``model`` in place; freeze every block weight; keep the head trainable.

    Returns the ``peft.LoraModel`` wrapping ``model`` (``merged_copy`` needs it); ``model`` itself is what
    trains, with its parameter names still under their blocks' prefixes.
    """
    from peft import LoraConfig, LoraModel

    targets = lora_targets(model, blocks, depth, lora)
    transposed = any(isinstance(model.get_submodule(t), _linear_types()[1:]) for t in targets)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        fan_in_fan_out=transposed, bias="none")
    wrapper = LoraModel(model, config, "default")  # marks only the adapters trainable
    owner = block_of_parameters(model, blocks)
    for name, param in model.named_parameters():
        if owner[name] < 0:  # the head trains in full
            param.requires_grad_(True)
    return wrapper


def describe_lora(model: nn.Module) -> str:
    """A short log phrase: how many layers carry adapters and how many adapter parameters they hold."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    adapter = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    return f"LoRA on {len(layers)} layers ({adapter:,} adapter parameters)"


def merged_copy(wrapper: Any) -> nn.Module:
    """A plain model with the adapters merged into its weights (``merge_and_unload`` of a copy); the training
    model keeps its adapters."""
    merged = copy.deepcopy(wrapper).merge_and_unload()
    if hasattr(merged, "peft_config"):  # peft leaves its config on the model; a plain model carries none
        del merged.peft_config
    return merged


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA run changes: trainable parameters (adapters, head) and every buffer, on the CPU."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    return state | {n: b.detach().cpu().clone() for n, b in model.named_buffers()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``adapter_state`` back into a model with the same adapters injected.

    Raises:
        ValueError: when the saved adapters do not fit this model's (a changed ``model.lora``).
    """
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in state)
    unexpected = sorted(n for n in state if n not in own or own[n].shape != state[n].shape)
    if missing or unexpected:
        raise ValueError(f"the checkpoint's LoRA state does not fit model.lora: missing {missing[:3]}, unexpected or "
                         f"of another shape {unexpected[:3]}; resume with the model.lora the run started with")
    model.load_state_dict(state, strict=False)
