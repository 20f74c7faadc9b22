"""torchvision image classifiers by name: ``torchvision:<arch>[.<weights enum name>]`` (``torchvision:resnet18``,
``torchvision:resnet50.IMAGENET1K_V2``, ``torchvision:efficientnet_b0``, ``torchvision:vit_b_16``, ...).

The weight enum (the tag, default ``DEFAULT``) gives the preprocessing the weights were trained with (resize,
centre crop, mean/std, interpolation), mapped onto the shared ``ImagePreprocessor``. Weights come from
``model.weights`` (a local state dict: safetensors, or a torch file read with ``weights_only``), from the enum's
download where a network exists, or ``none``. Detection names (``torchvision:fasterrcnn_*``) are the
``torchvision-detection`` family.

Blocks, input to output: the top-level children that hold parameters, in definition order (which is forward
order for torchvision's classifiers), the one ``Sequential`` of stages where a model has exactly one
(``features`` of EfficientNet, MobileNet, VGG, ConvNeXt, Swin) expanded into its stages, leading single layers
(ResNet's conv1, bn1) merged into one ``stem``. The last child holding parameters (``fc``, ``classifier``,
``heads``, ``head``) is the head, replaced for the labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ptm_ray.config import Config, ModelConfig
from ptm_ray.freeze import Block
from ptm_ray.models.base import Family, ModelRef, announce_new_head
from ptm_ray.models.vision import ImagePreprocessor

__all__ = ["TorchvisionFamily", "is_torchvision_classifier"]


def is_torchvision_classifier(location: str) -> bool:
    """Whether ``location`` (``<arch>[.<tag>]``) names one of torchvision's classification models."""
    import torchvision

    return location.split(".")[0] in torchvision.models.list_models(module=torchvision.models)


def _weights_enum(ref: ModelRef) -> Any:
    """The weight enum member the name's tag (default ``DEFAULT``) picks; raises a ValueError listing the choices."""
    from torchvision.models import get_model_weights

    arch, _, tag = ref.location.partition(".")
    if not is_torchvision_classifier(arch):
        raise ValueError(f"model.name=torchvision:{ref.location}: torchvision has no such classifier "
                         f"(torchvision.models.list_models(), e.g. resnet18, efficientnet_b0, mobilenet_v3_small, "
                         "vit_b_16) nor detector (fasterrcnn_*)")
    members = get_model_weights(arch)
    try:
        return members[tag or "DEFAULT"]
    except KeyError:
        raise ValueError(f"model.name=torchvision:{ref.location}: {arch} has no weights {tag!r}; its weight enum "
                         f"{members.__name__} has {list(members.__members__)}") from None


def _read_state(weights: str) -> dict[str, torch.Tensor]:
    path = Path(weights).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"model.weights={weights}: no such file (a state dict: .safetensors, or .pth/.pt)")
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class TorchvisionFamily(Family):
    """``torchvision:<arch>[.<weights enum name>]`` image classifiers."""

    name = "torchvision"
    modality = "image"
    heads = ("classifier",)
    preprocessor_class = ImagePreprocessor
    ddp_find_unused_parameters = True  # Inception v3 and GoogLeNet train auxiliary heads the loss never reads

    def build(self, ref: ModelRef, labels: list[str], cfg: ModelConfig, head: str, pretrained: bool = True) -> nn.Module:
        from torchvision.models import get_model

        enum = _weights_enum(ref)
        arch = ref.location.split(".")[0]
        try:
            model = get_model(arch, weights=None, num_classes=len(labels), **cfg.kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model.kwargs={cfg.kwargs} do not fit torchvision's {arch}: {e}") from None
        if pretrained and ref.weights != "none":
            if ref.weights:
                state = _read_state(ref.weights)
            else:
                try:
                    state = enum.get_state_dict(progress=False)
                except OSError as e:  # URLError is an OSError
                    raise ValueError(f"model.name=torchvision:{ref.location}: downloading {enum} failed (no network? "
                                     f"set model.weights to a local state dict, or none): {e}") from None
            _load_keeping_body(model, state, cfg, len(labels))
        model._ptm_spec = {"arch": arch, "weights": enum.name, "num_classes": len(labels), "kwargs": dict(cfg.kwargs)}
        return model

    def blocks(self, model: nn.Module) -> list[Block]:
        head = _head_child(model)
        body = [(n, c) for n, c in model.named_children() if n != head and _has_parameters(c)]
        stacked = [n for n, c in body if isinstance(c, nn.Sequential) and len(_stages(n, c)) > 1]
        blocks: list[Block] = []
        stem: list[str] = [n for n, _ in model.named_parameters(recurse=False)]  # e.g. ViT's class_token
        for name, child in body:
            if stacked == [name]:  # the one stack of stages (efficientnet's, vgg's ``features``): a block each
                blocks += [Block(n, (n,)) for n in _stages(name, child)]
            elif not blocks and not list(child.children()):  # a single layer before the first stage
                stem.append(name)
            else:
                blocks.append(Block(name, (name,)))
        return [Block("stem", tuple(stem))] + blocks if stem else blocks

    def preprocessor(self, ref: ModelRef, model: nn.Module, cfg: Config) -> ImagePreprocessor:
        transform = _weights_enum(ref).transforms()
        crop, resize = transform.crop_size[0], transform.resize_size[0]
        size = cfg.data.image_size or crop
        data_config = {"input_size": (3, size, size), "interpolation": transform.interpolation.value,
                       "mean": tuple(transform.mean), "std": tuple(transform.std), "crop_pct": crop / resize,
                       "crop_mode": "center"}
        return ImagePreprocessor(data_config, cfg.data.augment, cfg.data.hflip)

    # --- Classifier -----------------------------------------------------------------------------------
    def logits(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(inputs["pixel_values"])
        return out.logits if hasattr(out, "logits") else out  # Inception/GoogLeNet in training: (logits, aux)

    def save(self, model: nn.Module, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "torchvision.json").write_text(json.dumps(model._ptm_spec))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")

    def load(self, path: Path) -> nn.Module:
        from torchvision.models import get_model

        spec = json.loads((path / "torchvision.json").read_text())
        model = get_model(spec["arch"], weights=None, num_classes=spec["num_classes"], **spec["kwargs"])
        model.load_state_dict(load_file(path / "model.safetensors"))
        model._ptm_spec = spec
        return model


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _stages(name: str, stack: nn.Module) -> list[str]:
    return [f"{name}.{n}" for n, c in stack.named_children() if _has_parameters(c)]


def _head_child(model: nn.Module) -> str:
    """The last top-level child holding parameters: the classifier (``fc``, ``classifier``, ``heads``, ``head``)."""
    return [name for name, child in model.named_children() if _has_parameters(child)][-1]


def _load_keeping_body(model: nn.Module, state: dict[str, torch.Tensor], cfg: ModelConfig, num_labels: int) -> None:
    """Load ``state``; classifier tensors of another size (in the head, or an auxiliary ``Linear`` with
    ``num_labels`` outputs) stay fresh, said in one line; any other difference is a ValueError naming it."""
    own = model.state_dict()
    head = _head_child(model)
    outputs = {k for k in own if k.startswith(head + ".")}
    outputs |= {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels
                for k in ("weight", "bias")}
    changed = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and own[k].shape != v.shape]
    wrong = [k for k, _, _ in changed if k not in outputs]
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items()
                                                 if k not in {c[0] for c in changed}}, strict=False)
    missing = [k for k in missing if k not in outputs]
    if wrong or missing or unexpected:
        raise ValueError(f"model.weights={cfg.weights or cfg.name} does not fit torchvision's "
                         f"{cfg.name.split(':', 1)[1]}: shapes differ {wrong[:5]}, missing {missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    if changed:
        announce_new_head(cfg.name, num_labels, changed)
