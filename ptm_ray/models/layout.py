"""Block layouts of Hugging Face models, discovered from the module tree rather than listed per model type.

``discover_blocks(model)`` turns any ``transformers`` model with a head into ``ptm_ray.freeze.Block`` s,
input to output:

1. **Stacks.** The backbone is ``model.base_model``. A *stack* is an ``nn.ModuleList`` inside it whose
   ``>= 2`` children are layers (modules with submodules and parameters), not nested in another stack. The
   stack with the most parameters makes the depth; an encoder-decoder (``config.is_encoder_decoder``) also
   takes the largest stack on the other side (T5, BART: encoder stack, then decoder stack). Each layer is a
   block named by its path below the backbone (``encoder.layer.0``, ``h.1``, ``layers.3``).
2. **Around the stacks.** Walking the containers that hold a stack, each other child (module or direct
   parameter) is placed by where it is registered: before a stack, it runs before it (``embeddings``,
   ``wte``, ``patch_embed``); after the stack, it runs after it (a final norm: ``ln_f``, ``norm``,
   ``final_layer_norm``). A name containing ``embed`` is always *before* (BART registers
   ``layernorm_embedding`` after its layers; DeBERTa-v2 its ``rel_embeddings``).
   What runs before the first stack is the ``embeddings`` block; what runs before a later stack (BART's
   decoder position embeddings) rides with that stack's first layer; what runs after a stack rides with its
   last layer.
3. **Head.** Everything outside the backbone (classifier, score, projector, LM head), a backbone child named
   ``pool*`` (BERT's pooler), and, where the model is its own backbone (``T5ForConditionalGeneration``),
   what follows the stacks at the top (``lm_head``).

Overrides where discovery alone would be wrong (each small, none keyed on a model type list):

* **Speech feature encoders.** A backbone child ``feature_extractor`` (the convolutional waveform encoder of
  wav2vec 2.0, HuBERT, WavLM, Data2VecAudio, UniSpeech, SEW) is its own first block ``feature_encoder``; the
  rest of what runs before the transformer layers is ``feature_projection`` (not ``embeddings``).
* **Shared layers (ALBERT).** ALBERT applies one layer group ``num_hidden_layers`` times
  (``albert_layer_groups`` holds ``num_hidden_groups`` modules, usually 1). With no stack of two layers, a
  ``ModuleList`` of one layer is taken: the shared group is one block, so freezing it freezes every
  application of it, and ALBERT's depth is ``embeddings`` + one block per layer *group*.

Tied weights (an LM head sharing the input embedding matrix) appear once in ``named_parameters``, under the
name that comes first; blocks are built from those names, so a parameter never belongs to two blocks, and
freezing the embeddings block freezes the tied LM head too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ptm_ray.freeze import Block

__all__ = ["DETECTION_HEADS", "LayoutError", "discover_blocks", "discover_detector_blocks", "find_stacks"]

_FEATURE_ENCODER = "feature_extractor"


class LayoutError(ValueError):
    """The model's blocks cannot be discovered (no repeated layer stack)."""


@dataclass
class _Places:
    """Where the backbone's items go: per stack, extra prefixes before its first and after its last layer."""

    stacks: list[str]
    before: list[list[str]]
    after: list[list[str]]
    feature_encoder: list[str] = field(default_factory=list)


def discover_blocks(model: nn.Module) -> list[Block]:
    """The blocks of a Hugging Face model with a head, input to output (see the module docstring).

    Raises:
        LayoutError: if the backbone holds no layer stack.
    """
    base, base_path = _backbone(model)
    owned = _parameter_names(model)
    stacks = find_stacks(base, getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    places = _Places(stacks, [[] for _ in stacks], [[] for _ in stacks])
    _place(base, "", places, top=True, own_backbone=base is model, owned=_relative(owned, base_path))
    return _blocks(base, base_path, places)


def find_stacks(base: nn.Module, encoder_decoder: bool = False) -> list[str]:
    """Paths (below ``base``) of the layer stacks that make its depth, input to output.

    Raises:
        LayoutError: if ``base`` holds no ``ModuleList`` of layers.
    """
    candidates = _candidates(base, minimum=2) or _candidates(base, minimum=1)
    if not candidates:
        raise LayoutError(f"{type(base).__name__} holds no nn.ModuleList of layers: no depth to discover")
    order = [name for name, _ in base.named_modules()]
    size = {path: _numel(base.get_submodule(path)) for path in candidates}
    chosen = [max(candidates, key=lambda p: (size[p], -order.index(p)))]
    if encoder_decoder:
        side = chosen[0].split(".")[0]
        other = [p for p in candidates if p.split(".")[0] != side]
        if other:
            chosen.append(max(other, key=lambda p: (size[p], -order.index(p))))
    return sorted(chosen, key=order.index)


def _candidates(base: nn.Module, minimum: int) -> list[str]:
    """ModuleLists of at least ``minimum`` layers, not inside another such list."""
    found: list[str] = []
    for path, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < minimum:
            continue
        if any(path.startswith(f + ".") for f in found):
            continue
        layers = list(module)
        if all(_is_layer(layer) for layer in layers):
            found.append(path)
    return found


def _is_layer(module: nn.Module) -> bool:
    return any(True for _ in module.children()) and any(True for _ in module.parameters())


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _backbone(model: nn.Module) -> tuple[nn.Module, str]:
    """The base model and its path in ``model`` ("" when the model is its own base)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return model, ""
    path = next((name for name, m in model.named_modules() if m is base), None)
    if path is None:
        raise LayoutError(f"{type(model).__name__}.base_model is not one of its submodules")
    return base, path


def _parameter_names(model: nn.Module) -> list[str]:
    """Parameter names as ``named_parameters`` gives them: a tied tensor once, under its first name."""
    return [name for name, _ in model.named_parameters()]


def _relative(names: list[str], base_path: str) -> list[str]:
    if not base_path:
        return names
    return [n[len(base_path) + 1:] for n in names if n.startswith(base_path + ".")]


def _has_params(path: str, owned: list[str]) -> bool:
    return any(n == path or n.startswith(path + ".") for n in owned)


def _place(module: nn.Module, path: str, places: _Places, top: bool, own_backbone: bool, owned: list[str]) -> None:
    """Sort the children of a container of stacks into ``places`` (see the module docstring, step 2)."""
    items = [(name, True) for name, _ in module.named_children()]
    items += [(name, False) for name, _ in module.named_parameters(recurse=False)]
    holders = [i for i, (name, _) in enumerate(items) if _stacks_under(_join(path, name), places.stacks)]
    for i, (name, is_module) in enumerate(items):
        child = _join(path, name)
        if i in holders:
            if child not in places.stacks:
                _place(module.get_submodule(name), child, places, False, own_backbone, owned)
            continue
        if not _has_params(child, owned):
            continue
        later = [_join(path, items[h][0]) for h in holders if h > i]
        earlier = [_join(path, items[h][0]) for h in holders if h < i]
        _place_item(child, name, is_module, later, earlier, places, top, own_backbone)


def _place_item(child: str, name: str, is_module: bool, later: list[str], earlier: list[str], places: _Places,
                top: bool, own_backbone: bool) -> None:
    """One child beside the stack holders: before the next stack, after the previous one, or the head."""
    before = bool(later) or "embed" in name.lower() or not is_module  # direct parameters: embeddings-like
    if top and own_backbone and (not before or not is_module):
        return  # the head: what follows the stacks in a model that is its own backbone, or its own parameters
    if top and not before and name.lower().startswith("pool"):
        return  # the head: a pooler
    if top and name == _FEATURE_ENCODER and before:
        places.feature_encoder.append(child)
        return
    if before:
        holder = later[0] if later else earlier[-1]
        target = next(s for s in places.stacks if _stacks_under(holder, [s]))
        places.before[places.stacks.index(target)].append(child)
    else:
        holder = earlier[-1]
        target = [s for s in places.stacks if _stacks_under(holder, [s])][-1]
        places.after[places.stacks.index(target)].append(child)


def _stacks_under(path: str, stacks: list[str]) -> bool:
    return any(s == path or s.startswith(path + ".") for s in stacks)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _blocks(base: nn.Module, base_path: str, places: _Places) -> list[Block]:
    """Blocks from the placed items, full parameter-name prefixes, input to output."""
    full = (lambda p: f"{base_path}.{p}") if base_path else (lambda p: p)
    blocks: list[Block] = []
    if places.feature_encoder:
        blocks.append(Block("feature_encoder", tuple(full(p) for p in places.feature_encoder)))
    if places.before[0]:
        name = "feature_projection" if places.feature_encoder else "embeddings"
        blocks.append(Block(name, tuple(full(p) for p in places.before[0])))
    for s, stack in enumerate(places.stacks):
        n = len(base.get_submodule(stack))
        for i in range(n):
            extra = (places.before[s] if i == 0 and s > 0 else []) + (places.after[s] if i == n - 1 else [])
            blocks.append(Block(f"{stack}.{i}", (full(f"{stack}.{i}"),) + tuple(full(p) for p in extra)))
    return blocks


# --- detectors ------------------------------------------------------------------------------------------------

DETECTION_HEADS = ("class_labels_classifier", "bbox_predictor", "class_embed", "bbox_embed", "enc_score_head",
                   "enc_bbox_head", "denoising_class_embed")
"""Module names of Hugging Face detectors' prediction heads (class scores and box regression, per decoder layer in
Deformable DETR and RT-DETR, and the two-stage proposal heads), wherever the model registers them: RT-DETR keeps
its class heads inside the decoder, and the class heads' sizes follow the labels."""


def discover_detector_blocks(model: nn.Module) -> list[Block]:
    """The blocks of a Hugging Face object detector (``AutoModelForObjectDetection``), input to output.

    A detector with a convolutional ``backbone`` (DETR, Conditional/Deformable/DAB-DETR, Table Transformer,
    RT-DETR): ``stem`` (what the backbone runs before its stages), one block per backbone stage, then one
    block per transformer layer outside the backbone (the modules of a ``ModuleList`` that hold an attention
    module: the encoder's and the decoder's layers). Everything else in the backbone model (input
    projections, query embeddings, RT-DETR's multi-scale neck, final norms) rides with the transformer layer
    registered after it, or the last one; a name containing ``embed`` rides with the first. The prediction
    heads (``DETECTION_HEADS``) are the head, wherever they are registered. A detector without a ``backbone``
    (YOLOS, a ViT) is laid out as an encoder (``discover_blocks``).

    Raises:
        LayoutError: if the backbone has no stages or the model no transformer layer.
    """
    base, base_path = _backbone(model)
    backbone = getattr(base, "backbone", None)
    if backbone is None:
        return discover_blocks(model)
    full = (lambda p: f"{base_path}.{p}") if base_path else (lambda p: p)
    names = [full(n) for n in _relative(_parameter_names(model), base_path)]
    head = [n for n in _parameter_names(model) if n not in names or set(n.split(".")) & set(DETECTION_HEADS)]
    names = [n for n in names if n not in head]
    units = [full(f"backbone.{p}") for p in _backbone_stages(backbone)] + [full(p) for p in _attention_layers(base)]
    first_layer = len(units) - len(_attention_layers(base))
    if first_layer == len(units):
        raise LayoutError(f"{type(model).__name__} has no transformer layer outside its backbone")
    under = lambda name, unit: name.startswith(unit + ".")  # noqa: E731
    start = {u: next(i for i, n in enumerate(names) if under(n, u)) for u in units}
    riders: dict[str, list[str]] = {u: [] for u in units}
    stem: list[str] = []
    for i, name in enumerate(names):
        if any(under(name, u) for u in units):
            continue
        if i < start[units[0]]:
            stem.append(name)
        elif "embed" in name.lower() and i > start[units[0]] and not name.startswith(full("backbone.")):
            riders[units[first_layer]].append(name)
        else:
            riders[next((u for u in units if start[u] > i), units[-1])].append(name)
    blocks = [Block("stem", tuple(stem))] if stem else []
    for u in units:
        short = u[len(base_path) + 1:] if base_path else u
        blocks.append(Block(short, (u, *riders[u])))
    return blocks


def _backbone_stages(backbone: nn.Module) -> list[str]:
    """Paths (below ``backbone``) of its stages: the largest stack of layers (Hugging Face backbones), else the
    first children that are containers of parameter-holding modules, below any single wrapper (a timm
    ``features_only`` ResNet: ``layer1``..``layer4``, with ``conv1``/``bn1`` the stem; an EfficientNet: the
    members of its one ``blocks`` container)."""
    candidates = _candidates(backbone, minimum=2)
    if candidates:
        stack = max(candidates, key=lambda p: _numel(backbone.get_submodule(p)))
        return [f"{stack}.{i}" for i in range(len(backbone.get_submodule(stack)))]
    path, module = "", backbone
    while True:
        holders = [(n, m) for n, m in module.named_children() if _numel(m)]
        containers = [(n, m) for n, m in holders if any(_numel(c) for c in m.children())]
        if len(containers) != 1:
            break
        path, module = _join(path, containers[0][0]), containers[0][1]
    if len(containers) < 2:
        raise LayoutError(f"backbone {type(backbone).__name__} has no stages to freeze one by one")
    return [_join(path, n) for n, _ in containers]


def _attention_layers(base: nn.Module) -> list[str]:
    """Paths (below ``base``, outside its backbone and heads) of the transformer layers: the members of each
    ``ModuleList`` whose layers hold an attention module and no such list of their own."""
    def attends(m: nn.Module) -> bool:
        return any("attention" in type(s).__name__.lower() or "attn" in type(s).__name__.lower() for s in m.modules())

    lists = [p for p, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m)
             and not p.startswith("backbone") and not set(p.split(".")) & set(DETECTION_HEADS)
             and all(_is_layer(x) and attends(x) for x in m)]
    innermost = [p for p in lists if not any(q.startswith(p + ".") for q in lists)]
    return [f"{p}.{i}" for p in innermost for i in range(len(base.get_submodule(p)))]
