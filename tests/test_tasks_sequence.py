"""Sequence tasks end to end on tiny real architectures: speech recognition (CTC), text2text (T5), text
generation (GPT-2). Each trains data-parallel with its metric improving, resumes, is ranked by a search in
its metric's direction, and is served with the same output as offline."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

import pytest
import requests

from ptm_ray.checkpoint import load_artifact, read_meta
from ptm_ray.config import load_config
from ptm_ray.datasets import bundled_path
from ptm_ray.model_registry import ModelRegistry
from ptm_ray.train import fit, plan_run
from ptm_ray.tune import run_search

from conftest import free_port

REPLIES_TRAIN = str(bundled_path("support_replies_train.csv"))
REPLIES_VAL = str(bundled_path("support_replies_val.csv"))
LM_TRAIN = str(bundled_path("support_replies_lm_train.csv"))
LM_VAL = str(bundled_path("support_replies_lm_val.csv"))


def _column(path: str, column: str) -> list[str]:
    with open(path) as f:
        return [row[column] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> dict[str, str]:
    """Tiny T5 and GPT-2 whose tokenizers cover the support replies' words."""
    from ptm_ray.tiny import make_tiny_text_model

    root = tmp_path_factory.mktemp("tiny_lm")
    texts = _column(REPLIES_TRAIN, "input") + _column(REPLIES_TRAIN, "target")
    return {family: str(make_tiny_text_model(family, root / family, texts)) for family in ("t5", "gpt2")}


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> dict[str, Path]:
    from ptm_ray.datasets.spoken_sentences import make_spoken_sentences

    return make_spoken_sentences(tmp_path_factory.mktemp("sentences"), num_train=96, num_val=32)


def _overrides(tmp_path: Path, name: str, **values: object) -> list[str]:
    base: dict[str, object] = {"optim.scheduler": "constant", "optim.warmup_ratio": 0.0, "scaling.num_workers": 2,
                               "scaling.resources_per_worker": "{CPU: 1}", "storage.path": str(tmp_path / "runs"),
                               "storage.name": name, "train.shuffle_buffer": 64}
    base.update({k.replace("__", "."): v for k, v in values.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _t5(tiny_lm, tmp_path, name, **extra):
    values = dict(model__name=f"hf:{tiny_lm['t5']}", model__task="text2text", model__max_length=24,
                  data__train=REPLIES_TRAIN, data__validation=REPLIES_VAL, data__text_column="input",
                  data__target_column="target", optim__lr=3e-3, train__batch_size=16, train__epochs=4)
    return _overrides(tmp_path, name, **(values | extra))


def _gpt2(tiny_lm, tmp_path, name, **extra):
    values = dict(model__name=f"hf:{tiny_lm['gpt2']}", model__task="text_generation", model__max_length=96,
                  data__train=LM_TRAIN, data__validation=LM_VAL, optim__lr=3e-3, train__batch_size=16, train__epochs=3)
    return _overrides(tmp_path, name, **(values | extra))


def _asr(model: str, sentences, tmp_path, name, **extra):
    values = dict(model__name=model, model__task="speech_recognition", data__train=str(sentences["train"]),
                  data__validation=str(sentences["validation"]), data__target_column="transcript",
                  data__max_seconds=2.0, optim__lr=3e-3, train__batch_size=8, train__epochs=6)
    return _overrides(tmp_path, name, **(values | extra))


def _best_improved(history: list[dict], metric: str, mode: str) -> bool:
    first, values = history[0][metric], [h[metric] for h in history]
    return (max(values) > first) if mode == "max" else (min(values) < first)


def test_sequence_tasks_pick_their_own_metric_and_heads(tiny_lm, sentences, tiny_audio, tmp_path):
    t5 = load_config(None, _t5(tiny_lm, tmp_path, "x"))
    assert (t5.train.metric, t5.train.mode) == ("val_chrf", "max")
    asr = load_config(None, _asr("torchaudio:deepspeech", sentences, tmp_path, "x"))
    assert (asr.train.metric, asr.train.mode) == ("val_wer", "min")
    plan = plan_run(asr)  # the vocabulary of the training transcripts sizes the CTC head
    assert plan.labels[:3] == ["<pad>", "<unk>", "|"] and set("opentheredoor") <= set(plan.labels)
    bad = load_config(None, _asr(f"hf:{tiny_lm['t5']}", sentences, tmp_path, "x"))
    with pytest.raises(ValueError, match="model.task=speech_recognition is not available for model.name=hf:"):
        plan_run(bad)
    gpt2_as_t5 = load_config(None, _t5(tiny_lm, tmp_path, "x", model__name=f"hf:{tiny_lm['gpt2']}"))
    with pytest.raises(ValueError, match="text2text needs an encoder-decoder model"):
        plan_run(gpt2_as_t5)
    missing = load_config(None, _t5(tiny_lm, tmp_path, "x", data__target_column="reply"))
    with pytest.raises(ValueError, match="has no column 'reply' \\(data.target_column\\)"):
        plan_run(missing)
