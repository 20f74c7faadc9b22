"""Weights whose head has another size (someone's fine-tuned model, re-fine-tuned on other labels): the head is
replaced with one line saying so, the backbone keeps the saved weights; in a build, through ``fit`` with the
feature cache on and off, and in a search trial."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptm_ray.checkpoint import load_artifact
from ptm_ray.config import ModelConfig, load_config
from ptm_ray.console import logs_dir
from ptm_ray.models import resolve_model
from ptm_ray.train import fit

from conftest import tiny_overrides

INTENTS = 8  # labels of the bundled support_intents data


def _head_line(name: str, labels: int, shapes: str) -> str:
    return f"[ptm_ray] {name}: its head has another size, replaced with a freshly initialised one for {labels} " \
           f"outputs: {shapes}"


@pytest.fixture(scope="module")
def bert_two_labels(tiny_text, tmp_path_factory) -> str:
    """The tiny BERT fine-tuned elsewhere for 2 labels: a BertForSequenceClassification folder with its tokenizer."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = tmp_path_factory.mktemp("bert_two_labels")
    torch.manual_seed(0)
    BertForSequenceClassification.from_pretrained(tiny_text["bert"], num_labels=2).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_text["bert"]).save_pretrained(path)
    return str(path)


def _wav2vec2_with_head(path: Path, head: str, outputs: int) -> dict[str, torch.Tensor]:
    """A tiny wav2vec 2.0 saved with a classifier (or CTC) head of ``outputs``; returns its saved state."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16, 16), conv_kernel=(10, 8, 4), conv_stride=(5, 8, 4),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=8,
                            num_labels=outputs, vocab_size=outputs)
    torch.manual_seed(0)
    model = (Wav2Vec2ForCTC if head == "ctc" else Wav2Vec2ForSequenceClassification)(config)
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=False).save_pretrained(path)
    return load_file(path / "model.safetensors")


def _assert_backbone_kept(model: torch.nn.Module, saved: dict[str, torch.Tensor], head: tuple[str, ...]) -> None:
    state = model.state_dict()
    backbone = [k for k in saved if not k.startswith(head)]
    assert len(backbone) > 20
    for key in backbone:
        assert torch.equal(state[key], saved[key]), key


def test_bert_with_a_two_label_head_builds_for_eight(bert_two_labels, capsys):
    cfg = ModelConfig(name=f"hf:{bert_two_labels}")
    family, ref = resolve_model(cfg)
    model = family.build(ref, [f"l{i}" for i in range(INTENTS)], cfg, "classifier")
    out = capsys.readouterr()
    line = _head_line(cfg.name, INTENTS, "classifier.bias (2,) -> (8,), classifier.weight (2, 64) -> (8, 64)")
    assert out.out.count("its head has another size") == 1 and line in out.out.splitlines()
    assert "MISMATCH" not in out.out + out.err  # transformers' load-report table is replaced by the line
    assert model.classifier.weight.shape == (INTENTS, 64) and model.config.num_labels == INTENTS
    _assert_backbone_kept(model, load_file(Path(bert_two_labels) / "model.safetensors"), ("classifier.",))
    # the same number of labels keeps the saved head, silently
    same = family.build(ref, ["a", "b"], cfg, "classifier")
    assert "its head has another size" not in capsys.readouterr().out
    assert torch.equal(same.classifier.weight, load_file(Path(bert_two_labels) / "model.safetensors")["classifier.weight"])


@pytest.mark.parametrize("head, saved_outputs, new_outputs, tensor, width", [
    ("classifier", 2, 10, "classifier", 8),
    ("ctc", 12, 30, "lm_head", 32),
])
def test_wav2vec2_head_of_another_size_is_replaced(tmp_path, capsys, head, saved_outputs, new_outputs, tensor, width):
    saved = _wav2vec2_with_head(tmp_path, head, saved_outputs)
    cfg = ModelConfig(name=f"hf:{tmp_path}", task="speech_recognition" if head == "ctc" else "classification")
    family, ref = resolve_model(cfg)
    labels = ["<pad>"] + [chr(ord("a") + i) for i in range(new_outputs - 1)]
    model = family.build(ref, labels, cfg, head)
    shapes = f"{tensor}.bias ({saved_outputs},) -> ({new_outputs},), " \
             f"{tensor}.weight ({saved_outputs}, {width}) -> ({new_outputs}, {width})"
    assert _head_line(cfg.name, new_outputs, shapes) in capsys.readouterr().out.splitlines()
    assert getattr(model, tensor).weight.shape == (new_outputs, width)
    _assert_backbone_kept(model, saved, (f"{tensor}.",))


def test_a_body_of_another_shape_is_an_error_not_a_new_head(bert_two_labels, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(bert_two_labels)
    config.intermediate_size = 96  # the weights' feed-forward layers are 128 wide
    config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").symlink_to(Path(bert_two_labels) / "model.safetensors")
    cfg = ModelConfig(name=f"hf:{tmp_path}")
    family, ref = resolve_model(cfg)
    with pytest.raises(ValueError, match=r"tensors below the head have other shapes .*intermediate\.dense"):
        family.build(ref, ["a", "b", "c"], cfg, "classifier")


def test_timm_weights_with_a_head_of_another_size(tmp_path, capsys):
    import timm

    torch.manual_seed(0)
    saved = timm.create_model("resnet10t", num_classes=2).state_dict()
    save_file(saved, tmp_path / "two.safetensors")
    cfg = ModelConfig(name="timm:resnet10t", weights=str(tmp_path / "two.safetensors"))
    family, ref = resolve_model(cfg)
    model = family.build(ref, ["a", "b", "c", "d"], cfg, "classifier")
    shapes = "fc.bias (2,) -> (4,), fc.weight (2, 512) -> (4, 512)"
    assert _head_line(cfg.name, 4, shapes) in capsys.readouterr().out.splitlines()
    assert model.fc.weight.shape == (4, 512)
    _assert_backbone_kept(model, saved, ("fc.",))
    same = family.build(ref, ["a", "b"], cfg, "classifier")  # a head of the same size is kept (timm alone drops it)
    assert "its head has another size" not in capsys.readouterr().out
    assert torch.equal(same.fc.weight, saved["fc.weight"])


def _head_lines(name: str, since: float) -> int:
    """How many Ray processes printed the new-head line for ``name`` in logs written since ``since``
    (logs/worker-*.out of this session)."""
    needle = f"[ptm_ray] {name}: its head has another size"
    return sum(p.read_text(errors="replace").count(needle) for p in Path(logs_dir()).glob("worker-*.out")
               if p.stat().st_mtime >= since)


@pytest.mark.parametrize("cache", ["off", "on"])
def test_fit_re_fine_tunes_a_two_label_bert_on_eight_intents(ray_cluster, bert_two_labels, tmp_path, capfd, cache):
    import time

    name = f"hf:{bert_two_labels}"
    started = time.time()
    capfd.readouterr()
    cfg = load_config(None, tiny_overrides(bert_two_labels, tmp_path, f"refit-{cache}", model__freeze_depth="all",
                                           train__feature_cache=cache, train__epochs=1, scaling__num_workers=1))
    result = fit(cfg)
    assert (result.history[-1]["feature_cache_bytes"] > 0) == (cache == "on")
    # the Train worker built the model; with the cache on, the driver built it too (it builds the cache itself
    # on a single node without GPUs), printing the line on its own console, not in a worker's log
    assert _head_lines(name, started) == 1
    driver_lines = [line for line in capfd.readouterr().out.splitlines()
                    if line.startswith(f"[ptm_ray] {name}: its head has another size")]
    assert len(driver_lines) == (1 if cache == "on" else 0), driver_lines
    artifact = load_artifact(result.best_checkpoint)
    assert artifact.model.classifier.weight.shape == (INTENTS, 64) and len(artifact.labels) == INTENTS
    # every block frozen: the blocks are the saved ones, bit for bit (the pooler rides with the head and trains)
    saved = load_file(Path(bert_two_labels) / "model.safetensors")
    _assert_backbone_kept(artifact.model, saved, ("classifier.", "bert.pooler."))
    assert not torch.equal(artifact.model.bert.pooler.dense.weight, saved["bert.pooler.dense.weight"])


def test_a_search_trial_re_fine_tunes_a_two_label_bert(ray_cluster, bert_two_labels, tmp_path):
    from ptm_ray.tune import run_search

    overrides = tiny_overrides(bert_two_labels, tmp_path, "unused", train__epochs=1, scaling__num_workers=1,
                               scaling__resources_per_worker="{CPU: 0.5}")
    overrides += ["search.space={optim.lr: {grid: [1.0e-3]}}", "search.name=refit", "search.trial_cpus=0.5",
                  "search.scheduler=fifo", f"search.registry={tmp_path / 'registry'}", "search.registry_name=refit"]
    before = _head_lines(f"hf:{bert_two_labels}", since=0.0)
    result = run_search(load_config(None, overrides))
    assert _head_lines(f"hf:{bert_two_labels}", since=0.0) - before == 1
    (version,) = result.promoted
    assert load_artifact(version.path).model.classifier.weight.shape == (INTENTS, 64)
