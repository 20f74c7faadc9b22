"""LoRA beside freezing (``model.lora``, ``ptm_ray.lora``): targets above the frozen blocks, training changes only
adapters and head, merged checkpoints serve as plain models, resume restores the exact state, a search over
ranks, and clear errors for bad settings. Tiny real BERT/GPT-2 models."""

from __future__ import annotations

import contextlib
import csv
import shutil
from pathlib import Path

import pytest
import torch

from ptm_ray.checkpoint import load_artifact, load_train_state
from ptm_ray.config import load_config
from ptm_ray.freeze import freeze, parameter_counts
from ptm_ray.inference import predict
from ptm_ray.lora import adapter_state, apply_lora, load_adapter_state, lora_targets, merged_copy
from ptm_ray.models import resolve_model
from ptm_ray.train import fit, plan_run, prepare_data

from conftest import VAL_CSV, check_classification_predictions, tiny_overrides

LABELS = ["a", "b", "c"]
H, I = 64, 128  # the tiny BERT's hidden and intermediate sizes (ptm_ray.tiny)
ADAPTERS_PER_LAYER = 4 * (4 * (H + H) + (H + I) + (I + H))  # rank 4 on q, k, v, attention output, intermediate, output
POOLER = H * H + H
BERT_LAYER = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"]


def _model(model_dir: str, *overrides: str):
    """A tiny model built as a run builds it, its family and its blocks."""
    cfg = load_config(None, [f"model.name=hf:{model_dir}", "data.train=unused.csv", *overrides])
    family, ref = resolve_model(cfg.model)
    torch.manual_seed(0)
    model = family.build(ref, LABELS, cfg.model, "classifier")
    return cfg, family, model, family.blocks(model)


@pytest.mark.parametrize("depth, layers", [(0, [0, 1]), (1, [0, 1]), (2, [1])])
def test_default_targets_are_every_linear_layer_above_the_frozen_blocks(tiny_text, depth, layers):
    cfg, _, model, blocks = _model(tiny_text["bert"], "model.lora.r=4")
    assert [b.name for b in blocks] == ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    assert lora_targets(model, blocks, depth, cfg.model.lora) == [
        f"bert.encoder.layer.{i}.{name}" for i in layers for name in BERT_LAYER]


def test_named_targets_and_gpt2_conv1d(tiny_text):
    cfg, _, model, blocks = _model(tiny_text["bert"], "model.lora.r=4", "model.lora.target_modules=[query, value]")
    assert lora_targets(model, blocks, 2, cfg.model.lora) == ["bert.encoder.layer.1.attention.self.query",
                                                              "bert.encoder.layer.1.attention.self.value"]
    cfg, _, model, blocks = _model(tiny_text["gpt2"], "model.lora.r=4", "model.freeze_depth=2")
    assert lora_targets(model, blocks, 2, cfg.model.lora) == [
        f"transformer.h.1.{name}" for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    freeze(model, blocks, 2)
    apply_lora(model, blocks, 2, cfg.model.lora)  # GPT-2's Conv1D needs fan_in_fan_out: set, so no warning
    assert model.transformer.h[1].attn.c_attn.fan_in_fan_out


def test_freeze_k_plus_lora_trains_adapters_above_k_and_the_whole_head(tiny_text):
    cfg, _, model, blocks = _model(tiny_text["bert"], "model.lora.r=4", "model.freeze_depth=2")
    before = parameter_counts(model)[1]
    freeze(model, blocks, 2)
    apply_lora(model, blocks, 2, cfg.model.lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapters = [f"bert.encoder.layer.1.{name}.lora_{ab}.default.weight" for name in BERT_LAYER for ab in "AB"]
    head = ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
    assert trainable == adapters + head
    assert parameter_counts(model) == (ADAPTERS_PER_LAYER + POOLER + H * 3 + 3, before + ADAPTERS_PER_LAYER)


def test_merged_copy_predicts_as_the_adapted_model_and_is_plain(tiny_text):
    cfg, _, model, blocks = _model(tiny_text["bert"], "model.lora.r=4")
    wrapper = apply_lora(model, blocks, 0, cfg.model.lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapters change the output
                param.normal_()
    batch = {"input_ids": torch.randint(1, 90, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    merged = merged_copy(wrapper).eval()
    adapted = model.eval()(**batch).logits
    assert type(merged).__name__ == "BertForSequenceClassification" and not hasattr(merged, "peft_config")
    assert not any("lora" in n or "base_layer" in n for n in merged.state_dict())
    assert torch.allclose(merged(**batch).logits, adapted, atol=1e-5)
    assert any("lora_A" in n for n, _ in model.named_parameters())  # the training model keeps its adapters


def test_adapter_state_round_trips_and_refuses_a_changed_lora(tiny_text):
    cfg, _, model, blocks = _model(tiny_text["bert"], "model.lora.r=4")
    apply_lora(model, blocks, 1, cfg.model.lora)
    state = adapter_state(model)
    cfg8, _, other, _ = _model(tiny_text["bert"], "model.lora.r=8")
    apply_lora(other, blocks, 1, cfg8.model.lora)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected or of another shape \['bert.encoder.layer.0.attention"
                                         r".output.dense.lora_A.default.weight'"):
        load_adapter_state(other, state)
    cfg_q, _, other, _ = _model(tiny_text["bert"], "model.lora.r=4", "model.lora.target_modules=[query]")
    apply_lora(other, blocks, 1, cfg_q.model.lora)
    with pytest.raises(ValueError, match=r"the checkpoint's LoRA state does not fit model.lora: missing \[\], "
                                         r"unexpected or of another shape \['bert.encoder.layer.0.attention.output.dense"):
        load_adapter_state(other, state)


@pytest.mark.parametrize("override, message", [
    ("model.lora.r=-4", r"model.lora.r=-4 must be >= 0"),
    ("model.lora.r=2.5", r"model.lora.r must be int, got 2.5"),
    ("model.lora.alpha=0", r"model.lora.alpha=0.0 must be > 0"),
    ("model.lora.dropout=1.5", r"model.lora.dropout=1.5 must lie in \[0, 1\)"),
    ("model.lora.rank=8", r"unknown config key model.lora.rank; allowed in this group: r, alpha, dropout, target_modules"),
    ("model.lora=8", r"model.lora must be a mapping, got 8"),
    ("model.lora.target_modules=query", r"model.lora.target_modules must be list, got 'query'"),
])
def test_bad_lora_settings_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["model.name=minilm-l6", "data.train=x.csv", override])


@pytest.mark.parametrize("overrides, message", [
    (["model.freeze_depth=all"], r"model.lora.r=4 with model.freeze_depth freezing all 3 blocks leaves no block"),
    (["model.lora.target_modules=[q_proj]"], r"model.lora.target_modules=\['q_proj'\] matches no linear or convolution "
                                             r"layer in the unfrozen blocks \(embeddings..encoder.layer.1\); their layer "
                                             r"names: dense, key, query, value"),
])
def test_lora_with_nothing_to_adapt_is_refused_before_ray(tiny_text, tmp_path, overrides, message):
    cfg = load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "bad", model__lora__r=4) + overrides)
    with pytest.raises(ValueError, match=message):
        plan_run(cfg)


class _LocalSession:
    """The one worker of a run in this test process (the ``Session`` protocol), checkpoints kept in a folder."""

    rank, world_size, device, run_name = 0, 1, torch.device("cpu"), "lora-local"

    def __init__(self, datasets: dict, out: Path, restore: Path | None = None) -> None:
        self.datasets, self.out, self.restore = datasets, out, restore

    def restored(self):
        return contextlib.nullcontext(self.restore)

    def dataset(self, name: str):
        return self.datasets[name]

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            shutil.copytree(checkpoint, self.out / f"epoch{metrics['epoch']}")

    def prepare_model(self, module, ddp_kwargs):
        return module


def test_lora_training_changes_only_adapters_and_head_and_resume_restores_the_exact_state(ray_cluster, tiny_text,
                                                                                          tmp_path):
    from ptm_ray.config import config_to_dict
    from ptm_ray.worker import checkpoint_and_report, record_epoch, setup_worker, train_one_epoch, validate

    cfg = load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "local", model__lora__r=4,
                                           model__freeze_depth=1, scaling__num_workers=1, optim__lr=1e-2,
                                           train__max_steps_per_epoch=6))
    data = prepare_data(cfg)
    loop = {"cfg": config_to_dict(cfg), "labels": data.summary.labels, "num_train_rows": data.datasets["train"].count()}
    worker = setup_worker(loop, _LocalSession(data.datasets, tmp_path))
    before = {n: p.detach().clone() for n, p in worker.model.named_parameters()}
    metrics = record_epoch(worker, 0, train_one_epoch(worker, 0), validate(worker))
    changed = {n for n, p in worker.model.named_parameters() if not torch.equal(p, before[n])}
    # every base weight (embeddings, adapted layers' own weights, norms) is bit-identical; adapters B and head moved
    assert {n for n in changed if "lora_" not in n} == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                                         "classifier.weight", "classifier.bias"}
    assert {n for n in before if "lora_B" in n} <= changed
    assert metrics["trainable_params"] == parameter_counts(worker.model)[0] == 2 * ADAPTERS_PER_LAYER + POOLER + H * 8 + 8
    checkpoint_and_report(worker, metrics)

    saved = tmp_path / "epoch1"
    state = load_train_state(saved)
    assert state["lora_state"].keys() == {n for n, p in worker.model.named_parameters() if p.requires_grad} | {
        n for n, _ in worker.model.named_buffers()}
    resumed = setup_worker(loop, _LocalSession(data.datasets, tmp_path, restore=saved))
    assert resumed.first_epoch == 1
    expected = worker.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.model.state_dict().items())
    assert resumed.model.state_dict().keys() == expected.keys()
    mine, theirs = resumed.optimizer.state_dict(), worker.optimizer.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    assert all(torch.equal(a[key], b[key]) for i, a in mine["state"].items() for b in [theirs["state"][i]] for key in a)
    assert resumed.scheduler.state_dict() == worker.scheduler.state_dict()

    # the checkpoint's model/ is plain and merged: it predicts as the adapted model does
    artifact = load_artifact(saved)
    assert not any("lora" in n for n in artifact.model.state_dict())
    batch = artifact.batch(["where is my order", "i want a refund please"])
    worker.model.eval()
    with torch.no_grad():
        assert torch.allclose(artifact.model(**batch).logits, worker.model(**batch).logits, atol=1e-5)

    # and variant/ holds exactly what trained: on a shared pretrained base it predicts as the adapted model does
    from safetensors.torch import load_file

    from ptm_ray.variants import SharedBase

    trained = load_file(str(saved / "variant" / "weights.safetensors"))
    assert trained.keys() == {n for n, p in worker.model.named_parameters() if p.requires_grad}
    view = SharedBase(cfg, "cpu").load(saved)
    with torch.no_grad():
        assert torch.allclose(view(**batch).logits, worker.model(**batch).logits, atol=1e-5)


def test_lora_on_two_workers_with_a_feature_cache_serves_merged_and_resumes(ray_cluster, tiny_text, tmp_path):
    overrides = dict(model__lora__r=4, model__freeze_depth=2, train__feature_cache="on", data__validation=VAL_CSV,
                     train__epochs=2, optim__lr=1e-2)
    result = fit(load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "lora", **overrides)))
    assert result.best_metrics["feature_cache_bytes"] > 0  # the frozen prefix ran once; adapters sit above it
    assert result.best_metrics["trainable_params"] == ADAPTERS_PER_LAYER + POOLER + H * 8 + 8
    best = Path(result.best_checkpoint)
    adapted = sorted(n for n in load_train_state(best)["lora_state"] if "lora_" in n)
    assert adapted == sorted(f"bert.encoder.layer.1.{n}.lora_{ab}.default.weight" for n in BERT_LAYER for ab in "AB")

    # validation ran on cached features through the adapters; the merged plain model scores the same rows alike
    artifact = load_artifact(best)
    rows = list(csv.DictReader(open(VAL_CSV)))
    predictions = predict(artifact, [r["text"] for r in rows], top_k=3)
    accuracy = sum(p["label"] == r["label"] for p, r in zip(predictions, rows)) / len(rows)
    assert accuracy == pytest.approx(result.best_metrics["val_accuracy"], abs=1e-9)
    check_classification_predictions(artifact, [r["text"] for r in rows[:20]], predictions[:20])

    # the merged weights are the pretrained ones plus exactly the adapters' update; nothing else moved
    pretrained = artifact.family.build(resolve_model(artifact.config.model)[1], artifact.labels, artifact.config.model,
                                       "classifier").state_dict()
    merged, lora = artifact.model.state_dict(), load_train_state(best)["lora_state"]
    for name, value in merged.items():
        layer = name.removesuffix(".weight")
        if f"{layer}.lora_A.default.weight" in lora:
            delta = lora[f"{layer}.lora_B.default.weight"] @ lora[f"{layer}.lora_A.default.weight"] * (16.0 / 4)
            assert torch.allclose(value, pretrained[name] + delta, atol=1e-6), name
        elif not name.startswith(("bert.pooler", "classifier")):
            assert torch.equal(value, pretrained[name]), name

    again = fit(load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "lora", **(overrides | {"train__epochs": 3}))))
    assert [h["epoch"] for h in again.history] == [1, 2, 3] and again.history[:2] == result.history
    assert again.history[2]["resumed_from_epoch"] == 2


def test_a_search_over_lora_ranks_ranks_plain_checkpoints_with_trainable_params(ray_cluster, tiny_text, tmp_path):
    from ptm_ray.tune import format_leaderboard, run_search

    base = tiny_overrides(tiny_text["bert"], tmp_path, "unused", train__epochs=1, scaling__num_workers=1,
                          scaling__resources_per_worker="{CPU: 0.5}", model__freeze_depth=1)
    search = {"search.space": "{model.lora.r: {grid: [0, 4]}}", "search.name": "ranks", "search.trial_cpus": 0.5,
              "search.scheduler": "fifo", "search.top_k": 2, "search.registry": str(tmp_path / "registry"),
              "search.registry_name": "intents"}
    result = run_search(load_config(None, base + [f"{k}={v}" for k, v in search.items()]))
    rows = {row.lora_r: row for row in result.leaderboard}
    assert rows.keys() == {0, 4}
    _, _, model, blocks = _model(tiny_text["bert"])
    freeze(model, blocks, 1)
    assert rows[0].trainable_params == parameter_counts(model)[0] - (H * 3 + 3) + (H * 8 + 8)
    assert rows[4].trainable_params == 2 * ADAPTERS_PER_LAYER + POOLER + H * 8 + 8
    assert rows[0].params == rows[4].params == parameter_counts(model)[1] - (H * 3 + 3) + (H * 8 + 8)  # merged: plain
    table = format_leaderboard(result.leaderboard, result.metric).splitlines()
    assert table[0].split()[4] == "lora_r" and {line.split()[4] for line in table[1:]} == {"0", "4"}
    assert len(result.promoted) == 2
    for version in result.promoted:
        artifact = load_artifact(version.path)
        assert not any("lora" in n for n in artifact.model.state_dict())
        check_classification_predictions(artifact, ["where is my order #12345"], predict(artifact, ["where is my order #12345"]))
