"""Fine-tuned variants of one pretrained base, served together: the base once, each variant's own weights beside it.

A run that changed only part of its model -- LoRA adapters above the frozen blocks (``model.lora.r > 0``), or a
head trained on a fully frozen backbone (feature extraction) -- writes, beside the usual ``model/``, what it
changed::

    variant/variant.json          the base (``model.name``), the adapters' targets and scaling, if any
    variant/weights.safetensors   the trained tensors: adapters (``*.lora_A.default.*``) and the head

Everything else is the base's pretrained weights, so a server can hold the base once and many variants on it
(``ptm_ray.serve.VariantServer``, multiplexed by Ray Serve): each variant's adapters are injected into the shared
base under their own peft adapter name, and its head tensors are substituted at call time
(``torch.func.functional_call``), so heads of different label counts share one module tree.

Only batched tasks (classification, multilabel) are served this way; a full fine-tune keeps its own deployment.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptm_ray.config import Config

__all__ = ["NotMixable", "SharedBase", "VARIANT_DIR", "base_key", "read_variant_info", "variant_tensors", "write_variant"]

VARIANT_DIR = "variant"
_INFO, _WEIGHTS = "variant.json", "weights.safetensors"
_ADAPTER = ".default."  # the adapter name training uses (peft's default)


def variant_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a partial run trained: every parameter that requires grad (adapters and head), on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def write_variant(folder: Path, cfg: Config, tensors: dict[str, torch.Tensor], lora: Any = None) -> None:
    """Write ``variant/`` into a checkpoint folder; ``lora`` is the run's ``peft.LoraModel`` or None (head only)."""
    from safetensors.torch import save_file

    out = Path(folder) / VARIANT_DIR
    out.mkdir(parents=True, exist_ok=True)
    adapters = None
    if lora is not None:
        config = lora.peft_config["default"]
        adapters = {"r": config.r, "alpha": config.lora_alpha, "targets": sorted(config.target_modules),
                    "fan_in_fan_out": config.fan_in_fan_out}
    info = {"base": cfg.model.name, "task": cfg.model.task, "lora": adapters, "tensors": len(tensors)}
    save_file(tensors, str(out / _WEIGHTS))
    (out / _INFO).write_text(json.dumps(info, indent=2))


def read_variant_info(path: str) -> dict[str, Any] | None:
    """``variant/variant.json`` of a checkpoint (folder or URI), or None when it is a full model."""
    from ptm_ray.data import read_bytes

    try:
        return json.loads(read_bytes(f"{str(path).rstrip('/')}/{VARIANT_DIR}/{_INFO}"))
    except (OSError, FileNotFoundError):
        return None


def base_key(meta: dict[str, Any], info: dict[str, Any]) -> str:
    """Versions with one key share a replica: same family, same pretrained base, same task."""
    return f"{meta['family']}|{info['base']}|{info['task']}"


@dataclass
class _Loaded:
    adapter: str | None
    """Its peft adapter name in the shared base (unique per load), or None for a head-only variant."""
    head: dict[str, torch.Tensor]
    """Head tensors substituted at call time, by parameter name."""


class _View(nn.Module):
    """One variant as a model: the shared base with this variant's adapter active and its head substituted."""

    def __init__(self, shared: SharedBase, loaded: _Loaded) -> None:
        super().__init__()
        object.__setattr__(self, "_shared", shared)  # not a submodule: the base belongs to the SharedBase
        self._loaded = loaded

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        shared = self._shared
        shared.activate(self._loaded.adapter)
        return torch.func.functional_call(shared.model, self._loaded.head, args, kwargs, strict=False)


class NotMixable(Exception):
    """Variants whose heads cannot be applied row by row in one pass."""


def _with_adapter_names(names: list[str], layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, {**kwargs, "adapter_names": names}


class _RowwiseLinear(nn.Module):
    """A head layer of several variants in one pass: each group of batch rows through its own weights, the
    outputs padded with zeros to the widest."""

    def __init__(self, groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], size: int) -> None:
        super().__init__()
        self.groups, self.size = groups, size
        self.width = max(weight.shape[0] for _, weight, _ in groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.size:
            raise NotMixable(f"a head layer's input has {x.shape[0]} rows, the batch {self.size}")
        out = x.new_zeros((*x.shape[:-1], self.width))
        for rows, weight, bias in self.groups:
            out[rows, ..., :weight.shape[0]] = nn.functional.linear(x[rows], weight, bias)
        return out


class SharedBase:
    """A pretrained base built once per replica, and the variants loaded onto it.

    Not thread-safe by itself: ``load``, ``unload`` and the views' forward passes must not run at the same time;
    callers hold ``lock`` around each.
    """

    def __init__(self, cfg: Config, device: str | torch.device) -> None:
        from ptm_ray.models import resolve_model
        from ptm_ray.tasks import task_for

        device = torch.device(device)
        self.base, self.task = cfg.model.name, cfg.model.task
        self.family, ref = resolve_model(cfg.model)
        # the base's own head is never used: every call substitutes a variant's; two labels make it buildable
        self.model = self.family.build(ref, ["a", "b"], cfg.model, task_for(cfg.model.task).head).eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = device
        self.lock = threading.Lock()
        self._names = itertools.count()
        self._active: str | None | bool = False  # False: nothing activated yet
        self._layers: list[Any] | None = None  # the LoRA layers, found again after each injection

    def load(self, folder: Path) -> nn.Module:
        """The variant in ``folder`` (a checkpoint holding ``variant/``) as a model on the shared base."""
        from safetensors.torch import load_file

        info = json.loads((folder / VARIANT_DIR / _INFO).read_text())
        if (info["base"], info["task"]) != (self.base, self.task):
            raise ValueError(f"{folder} is a {info['task']} variant of {info['base']}; this base is {self.base} "
                             f"({self.task}): serve it from its own base")
        tensors = load_file(str(folder / VARIANT_DIR / _WEIGHTS), device=str(self.device))
        adapter = None
        if info["lora"]:
            adapter = f"v{next(self._names)}"
            self._inject(adapter, info["lora"], {k: v for k, v in tensors.items() if ".lora_" in k})
        own = dict(self.model.named_parameters())
        head = {k: v for k, v in tensors.items() if ".lora_" not in k}
        strangers = sorted(k for k in head if k not in own)
        if strangers:
            raise ValueError(f"{folder}: the variant's head tensors {strangers[:3]} are not parameters of its base "
                             f"{info['base']}")
        return _View(self, _Loaded(adapter, head))

    def _inject(self, adapter: str, lora: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0, target_modules=lora["targets"],
                            fan_in_fan_out=lora["fan_in_fan_out"], bias="none")
        inject_adapter_in_model(config, self.model, adapter_name=adapter)
        state = {k.replace(_ADAPTER, f".{adapter}."): v for k, v in tensors.items()}
        result = self.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"adapter tensors {result.unexpected_keys[:3]} have no layer in the base")
        self._active, self._layers = False, None  # injection may wrap new layers and change their active adapter

    def unload(self, view: nn.Module) -> None:
        """Drop a variant's adapter from the base (its head tensors go with the view)."""
        adapter = view._loaded.adapter
        if adapter is None:
            return
        for layer in self._lora_layers():
            if adapter in layer.lora_A:
                layer.delete_adapter(adapter)
        self._active = False

    def activate(self, adapter: str | None) -> None:
        """Make ``adapter`` the one every LoRA layer applies (None: none, the pretrained base)."""
        if adapter == self._active:
            return
        # peft's own ``set_adapter`` also flips requires_grad on every adapter of every layer (about 3 ms on
        # MiniLM with 8 variants); serving needs only the active name. A name a layer lacks: it passes through.
        for layer in self._lora_layers():
            layer._active_adapter = [adapter or "none"]
        self._active = adapter

    def mixed_logits(self, views: list[nn.Module], inputs: dict[str, torch.Tensor],
                     rows: list[list[int]]) -> list[torch.Tensor]:
        """Logits of several variants from one forward pass over all their rows (``rows[i]``: the batch rows of
        ``views[i]``), each row through its own adapter and its own head, instead of a pass per variant.

        Adapters: peft's per-row ``adapter_names`` (each LoRA layer runs every adapter on its rows only). Heads:
        each head layer (a ``Linear`` some variant trained) is replaced for the pass by one that applies each
        variant's weights to its rows; a head wider than another (more labels) is cut to its own labels after.

        Raises:
            NotMixable: when a head layer is not a ``Linear`` over batch-first inputs (run the views one by one).
        """
        from functools import partial

        size = sum(len(r) for r in rows)
        names = ["__base__"] * size  # peft's name for "no adapter on this row"
        for view, own in zip(views, rows):
            for i in own:
                names[i] = view._loaded.adapter or "__base__"
        swapped = self._rowwise_heads(views, rows, size)
        hooks = [layer.register_forward_pre_hook(partial(_with_adapter_names, names), with_kwargs=True)
                 for layer in self._lora_layers()]
        try:
            logits = self.family.logits(self.model, inputs)
        finally:
            for hook in hooks:
                hook.remove()
            for parent, attr, layer in swapped:
                setattr(parent, attr, layer)
        return [logits[own] for own in rows]

    def _rowwise_heads(self, views: list[nn.Module], rows: list[list[int]], size: int) -> list[tuple]:
        """Swap each head layer for a ``_RowwiseLinear``; returns (parent, attribute, original) to put back."""
        layers = sorted({name.rsplit(".", 1)[0] for view in views for name in view._loaded.head})
        swapped = []
        try:
            for name in layers:
                layer = self.model.get_submodule(name)
                if not isinstance(layer, nn.Linear):
                    raise NotMixable(f"head layer {name} is a {type(layer).__name__}, not a Linear")
                groups = [(torch.tensor(own, device=self.device),
                           view._loaded.head.get(f"{name}.weight", layer.weight),
                           view._loaded.head.get(f"{name}.bias", layer.bias)) for view, own in zip(views, rows)]
                parent_name, _, attr = name.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                setattr(parent, attr, _RowwiseLinear(groups, size))
                swapped.append((parent, attr, layer))
        except NotMixable:
            for parent, attr, layer in swapped:
                setattr(parent, attr, layer)
            raise
        return swapped

    def _lora_layers(self) -> list[Any]:
        if self._layers is None:
            from peft.tuners.lora import LoraLayer

            self._layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        return self._layers
