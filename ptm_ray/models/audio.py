"""Speech models: ``hf:`` waveform encoders (wav2vec 2.0, HuBERT, WavLM, Data2VecAudio, UniSpeech, SEW, ...)
and DeepSpeech (``torchaudio:deepspeech``).

Heads: ``classifier`` (pooled over time) and ``ctc`` (per output frame, for speech recognition).

Blocks, input to output. ``hf:`` models (discovered, ``ptm_ray.models.layout``): the convolutional feature
encoder, the feature projection (with the positional convolution and encoder norm), then each transformer
layer; the projector and classifier are the head. DeepSpeech: fc1, fc2, fc3, the bidirectional RNN, fc4;
its output layer, re-sized to the labels and averaged over time, is the head.

Both share one preprocessor: decode (soundfile), mix to mono, resample to the model's rate, crop or
zero-pad to ``data.max_seconds``, and normalise per clip where the model expects it.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ptm_ray.config import Config, ModelConfig
from ptm_ray.freeze import Block
from ptm_ray.models.base import Family, ModelRef, Preprocessor, announce_new_head
from ptm_ray.models.hf import HFFamily
from ptm_ray.seq_metrics import CTC_PAD, CTC_UNK, CTC_WORD_DELIMITER
from ptm_ray.models.hf_types import refuse_head
from ptm_ray.models.layout import discover_blocks

__all__ = ["AudioPreprocessor", "DeepSpeechClassifier", "DeepSpeechFamily", "HFAudioFamily", "decode_audio"]

_CACHEABLE = frozenset({"wav2vec2", "hubert"})  # whose prefix/suffix split is implemented and checked


def decode_audio(data: bytes, sampling_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Encoded audio (wav, flac, ogg) -> mono float32 at ``sampling_rate``, at most ``max_seconds`` long.

    The clip is cut to ``max_seconds`` before it is resampled, so a long upload costs no more than the part
    the model keeps. A rate whose ratio to ``sampling_rate`` reduces to huge integers (a header claiming
    44,099 Hz against 16 kHz asks torchaudio for a 44,099 x 16,000 polyphase kernel: minutes of work) is
    resampled as the nearest 100 Hz, a pitch change no model hears.

    Raises:
        ValueError: if the bytes do not decode or hold no samples.
    """
    import soundfile
    import torchaudio.functional

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as clip:
            rate = clip.samplerate
            frames = -1 if max_seconds is None else int(math.ceil(max_seconds * rate))
            samples = clip.read(frames, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"not decodable as audio: {e}") from None
    if samples.shape[0] == 0:
        raise ValueError("audio has no samples (zero length)")
    mono = torch.from_numpy(samples.mean(axis=1))
    if rate != sampling_rate:
        mono = torchaudio.functional.resample(mono, _resampling_rate(rate, sampling_rate), sampling_rate)
    return mono.numpy()


def _resampling_rate(rate: int, target: int) -> int:
    """``rate``, or the nearest 100 Hz when ``rate/target`` reduces to a fraction too fine to resample cheaply."""
    if rate // math.gcd(rate, target) <= 1000:
        return rate
    return max(100, round(rate / 100) * 100)


class AudioPreprocessor(Preprocessor):
    """Encoded audio clips -> fixed-length waveforms at the model's sampling rate."""

    def __init__(self, sampling_rate: int, max_seconds: float, normalize: bool, attention_mask: bool) -> None:
        self.sampling_rate = sampling_rate
        self.max_seconds = max_seconds
        self.normalize = normalize
        self.attention_mask = attention_mask

    def __call__(self, clips: list[bytes], train: bool = False) -> dict[str, torch.Tensor]:
        length = int(self.sampling_rate * self.max_seconds)
        values = torch.zeros(len(clips), length)
        mask = torch.zeros(len(clips), length, dtype=torch.long)
        for i, clip in enumerate(clips):
            wave = torch.from_numpy(decode_audio(clip, self.sampling_rate, self.max_seconds))[:length]
            if self.normalize:  # zero mean, unit variance per clip, as Wav2Vec2FeatureExtractor does
                wave = (wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + 1e-7)
            values[i, : len(wave)] = wave
            mask[i, : len(wave)] = 1
        return {"input_values": values, "attention_mask": mask} if self.attention_mask else {"input_values": values}

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "audio", "sampling_rate": self.sampling_rate, "max_seconds": self.max_seconds,
                "normalize": self.normalize, "attention_mask": self.attention_mask}
        (path / "preprocessor.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: Path) -> "AudioPreprocessor":
        meta = json.loads((path / "preprocessor.json").read_text())
        return cls(meta["sampling_rate"], meta["max_seconds"], meta["normalize"], meta["attention_mask"])


class HFAudioFamily(HFFamily):
    """``hf:`` wav2vec 2.0 and HuBERT: ``AutoModelForAudioClassification`` (classifier) or ``AutoModelForCTC``
    (ctc: its ``lm_head`` sized to the character vocabulary, ``<pad>`` = the blank first)."""

    name = "hf-audio"
    modality = "audio"
    preprocessor_class = AudioPreprocessor
    auto_classes = {"classifier": "AutoModelForAudioClassification", "ctc": "AutoModelForCTC"}
    ddp_find_unused_parameters = True  # LayerDrop skips whole encoder layers in some training steps
    cache_sequence_features = ()

    def configure(self, config: Any, head: str, labels: list[str], cfg: ModelConfig) -> None:
        refuse_head(self.name, config, head, cfg)
        if head == "ctc":  # labels: the CTC vocabulary, <pad> (the blank) first
            config.vocab_size, config.pad_token_id = len(labels), 0
            config.ctc_loss_reduction, config.ctc_zero_infinity = "mean", True
        else:
            super().configure(config, head, labels, cfg)

    def save_ecosystem_files(self, model: nn.Module, preprocessor: Preprocessor, labels: list[str],
                             path: Path) -> None:
        """A ``Wav2Vec2FeatureExtractor`` preprocessing as ``AudioPreprocessor`` does (rate, per-clip normalisation,
        attention mask); for a CTC head a ``Wav2Vec2Processor`` adding the character tokenizer of ``labels``
        (``<pad>`` = the blank first, ``|`` between words), so the ASR pipeline decodes as ptm_ray does."""
        from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

        extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=preprocessor.sampling_rate, padding_value=0.0,
                                             do_normalize=preprocessor.normalize,
                                             return_attention_mask=preprocessor.attention_mask)
        if not type(model).__name__.endswith("ForCTC"):
            extractor.save_pretrained(path)
            return
        path.mkdir(parents=True, exist_ok=True)
        (path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(labels)}, ensure_ascii=False))
        tokenizer = Wav2Vec2CTCTokenizer(str(path / "vocab.json"), unk_token=CTC_UNK, pad_token=CTC_PAD,
                                         word_delimiter_token=CTC_WORD_DELIMITER, do_lower_case=False)
        Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(path)

    def blocks(self, model: nn.Module) -> list[Block]:
        return discover_blocks(model)

    def preprocessor(self, ref: ModelRef, model: nn.Module, cfg: Config) -> AudioPreprocessor:
        from transformers import AutoFeatureExtractor

        fe = AutoFeatureExtractor.from_pretrained(ref.location)
        # HF: models whose feature encoder uses group norm must not get an attention mask.
        use_mask = bool(getattr(fe, "return_attention_mask", False)) and getattr(model.config, "feat_extract_norm",
                                                                                "layer") == "layer"
        return AudioPreprocessor(fe.sampling_rate, cfg.data.max_seconds, bool(getattr(fe, "do_normalize", False)),
                                 use_mask)

    # --- Classifier, FrameClassifier ---------------------------------------------------------------
    def logits(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**inputs).logits

    def frame_lengths(self, model: nn.Module, inputs: dict[str, torch.Tensor], frames: int) -> torch.Tensor:
        """Valid output frames per clip: from the attention mask where the model takes one, else all frames."""
        mask = inputs.get("attention_mask")
        if mask is None:
            return torch.full((inputs["input_values"].shape[0],), frames, dtype=torch.long)
        return model._get_feat_extract_output_lengths(mask.sum(-1)).clamp(max=frames).long().cpu()

    # --- PrefixCache ------------------------------------------------------------------------------------
    # Two depths split cleanly: the feature encoder alone (block 1: what follows it, SpecAugment masking
    # and LayerDrop, runs in the suffix with the same random draws), and everything (the whole base model
    # is then in eval mode, so neither applies). In between, LayerDrop and masking act inside the prefix.
    def cache_unsupported(self, model: nn.Module, depth: int) -> str | None:
        """Why the prefix of ``depth`` blocks cannot be cached, or None."""
        config = model.config
        if config.model_type not in _CACHEABLE:
            return (f"cache not supported for hf-audio {config.model_type!r} (only {sorted(_CACHEABLE)}), "
                    "falling back to uncached")
        if depth not in (1, len(self.blocks(model))):
            return (f"hf-audio caches the feature encoder (depth 1) or every block (depth all), not depth {depth}: "
                    "LayerDrop and SpecAugment masking act inside that prefix during training")
        if getattr(config, "use_weighted_layer_sum", False) or getattr(config, "add_adapter", False):
            return "hf-audio with use_weighted_layer_sum or add_adapter: cache not supported"
        if getattr(config, "feat_extract_norm", "group") == "layer":
            return "hf-audio models fed an attention mask (feat_extract_norm=layer): cache not supported"
        return None

    def prefix_forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
        """Depth 1: the convolutional features; depth all: the last hidden state averaged over time."""
        base = model.base_model
        if depth == 1:
            return {"conv_features": base.feature_extractor(inputs["input_values"]).transpose(1, 2)}
        return {"pooled": base(inputs["input_values"]).last_hidden_state.mean(dim=1)}

    def suffix_logits(self, model: nn.Module, features: dict[str, torch.Tensor], depth: int) -> torch.Tensor:
        """What the model's forward runs after the prefix: projection, masking, encoder, projector, pooling."""
        if "pooled" in features:  # mean pooling commutes with the (linear) projector
            return model.classifier(model.projector(features["pooled"]))
        base = model.base_model
        projected = base.feature_projection(features["conv_features"])
        hidden = projected[0] if isinstance(projected, tuple) else projected  # wav2vec2 returns a pair
        hidden = base._mask_hidden_states(hidden)
        hidden = base.encoder(hidden).last_hidden_state
        return model.classifier(model.projector(hidden).mean(dim=1))


class DeepSpeechClassifier(nn.Module):
    """torchaudio's DeepSpeech over log-mel features, its output layer sized to the labels: mean-pooled over
    time for classification, per frame (``ctc=True``) for speech recognition."""

    def __init__(self, num_labels: int, n_mels: int = 40, n_hidden: int = 256, sample_rate: int = 16000,
                 ctc: bool = False) -> None:
        import torchaudio

        super().__init__()
        self.config = {"num_labels": num_labels, "n_mels": n_mels, "n_hidden": n_hidden, "sample_rate": sample_rate,
                       "ctc": ctc}
        with torch.device("cpu"):  # its filterbank is computed eagerly, also when the model is built on "meta"
            self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=400, hop_length=160, n_mels=n_mels)
        self.deepspeech = torchaudio.models.DeepSpeech(n_feature=n_mels, n_hidden=n_hidden, n_class=num_labels)

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        features = torch.log(self.mel(input_values) + 1e-6).transpose(1, 2).unsqueeze(1)  # (B, 1, T, n_mels)
        frames = self.deepspeech(features)  # (B, T, labels) log-probabilities
        return frames if self.config["ctc"] else frames.mean(dim=1)


class DeepSpeechFamily(Family):
    """``torchaudio:deepspeech``; weights from a local state dict (``model.weights``) or random."""

    name = "torchaudio"
    modality = "audio"
    heads = ("classifier", "ctc")
    preprocessor_class = AudioPreprocessor
    _HEAD = "deepspeech.out"

    def build(self, ref: ModelRef, labels: list[str], cfg: ModelConfig, head: str, pretrained: bool = True) -> nn.Module:
        if ref.location != "deepspeech":
            raise ValueError(f"model.name=torchaudio:{ref.location}: the torchaudio family knows 'deepspeech'")
        try:
            model = DeepSpeechClassifier(len(labels), **cfg.kwargs, ctc=head == "ctc")
        except TypeError as e:
            raise ValueError(f"model.kwargs={cfg.kwargs} do not fit DeepSpeech: {e}") from None
        if pretrained and ref.weights not in ("", "none"):
            _load_backbone(model, ref.weights, head_prefix=self._HEAD, name=cfg.name)
        return model

    def blocks(self, model: nn.Module) -> list[Block]:
        return [Block(name, (f"deepspeech.{name}",)) for name in ("fc1", "fc2", "fc3", "bi_rnn", "fc4")]

    def preprocessor(self, ref: ModelRef, model: nn.Module, cfg: Config) -> AudioPreprocessor:
        return AudioPreprocessor(model.config["sample_rate"], cfg.data.max_seconds, normalize=False, attention_mask=False)

    # --- Classifier, FrameClassifier ---------------------------------------------------------------
    def logits(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(inputs["input_values"])

    def frame_lengths(self, model: nn.Module, inputs: dict[str, torch.Tensor], frames: int) -> torch.Tensor:
        """Every clip is padded to ``data.max_seconds``: all frames count."""
        return torch.full((inputs["input_values"].shape[0],), frames, dtype=torch.long)

    def save(self, model: nn.Module, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "deepspeech.json").write_text(json.dumps(model.config))
        save_file(model.state_dict(), path / "model.safetensors")

    def load(self, path: Path) -> nn.Module:
        model = DeepSpeechClassifier(**json.loads((path / "deepspeech.json").read_text()))
        model.load_state_dict(load_file(path / "model.safetensors"))
        return model


def _load_backbone(model: nn.Module, weights: str, head_prefix: str, name: str) -> None:
    """Load a state dict (safetensors, or a torch file read with ``weights_only``); a head of another size is
    left freshly initialised, and ``announce_new_head`` says so."""
    path = Path(weights)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"model.weights={weights}: no such file")
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    changed = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
               if k.startswith(head_prefix) and k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in {c[0] for c in changed}}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith(head_prefix)] + list(unexpected)
    if bad:
        raise ValueError(f"model.weights={weights} does not match the architecture: {bad[:5]}")
    if changed:
        announce_new_head(name, changed[0][2][0], changed)
