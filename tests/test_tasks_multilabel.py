"""Multi-label classification (model.task=multilabel): label parsing, metrics against scikit-learn, data
errors, a local training step for image and audio families, and the text path on Ray end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from sklearn.metrics import f1_score

from ptm_ray.checkpoint import load_artifact, read_meta
from ptm_ray.config import load_config
from ptm_ray.datasets.support_multilabel import make_support_multilabel
from ptm_ray.inference import predict
from ptm_ray.model_store import ModelStore
from ptm_ray.models import resolve_model
from ptm_ray.tasks import WorkerContext, task_for
from ptm_ray.tasks.multilabel import BINS, _counts_at, _label_set, multilabel_f1, tuned_thresholds
from ptm_ray.train import fit, plan_run
from ptm_ray.tune import run_search
from ptm_ray.worker import scores_of_raw_inputs

from conftest import free_port


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, str]:
    train, val = make_support_multilabel(tmp_path_factory.mktemp("multilabel"))
    return {"train": str(train), "validation": str(val)}


def _overrides(model: str, data: dict[str, str], root: Path, name: str, *extra: str) -> list[str]:
    return [f"model.name={model}", "model.task=multilabel", "model.max_length=48", "model.freeze_depth=all",
            f"data.train={data['train']}", f"data.validation={data['validation']}", "data.label_column=labels",
            "optim.lr=1e-2", "optim.scheduler=constant", "optim.warmup_ratio=0.0", "train.batch_size=8",
            "train.epochs=4", "scaling.num_workers=2", f"storage.path={root / 'runs'}", f"storage.name={name}", *extra]


# --- pure parts -------------------------------------------------------------------------------------------


def test_label_cells_parse_as_lists_or_joined_strings():
    assert _label_set("billing|refund", "|", "x") == ["billing", "refund"]
    assert _label_set(" billing | refund ", "|", "x") == ["billing", "refund"]
    assert _label_set(["a", "b"], "|", "x") == ["a", "b"]
    assert _label_set(np.array(["a"], dtype=object), "|", "x") == ["a"]
    assert _label_set("", "|", "x") == [] and _label_set(None, "|", "x") == []  # an input with no label
    assert _label_set(3, "|", "x") == ["3"]  # CSV columns of single numbers arrive as ints
    with pytest.raises(ValueError, match=r"where: expected labels joined by '\|' or a list of strings, got \['a', 3\]"):
        _label_set(["a", 3], "|", "where")
    # (a pattern of "a||b" unescaped would match any message: "||" is an empty alternative)
    with pytest.raises(ValueError, match=r"^where: empty label in 'a\|\|b' \(labels joined by '\|', none empty\)$"):
        _label_set("a||b", "|", "where")


def _histograms(scores: np.ndarray, truth: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    bins = np.minimum((scores * BINS).astype(int), BINS - 1)
    positive = torch.zeros(scores.shape[1], BINS, dtype=torch.long)
    negative = torch.zeros(scores.shape[1], BINS, dtype=torch.long)
    for label in range(scores.shape[1]):
        positive[label] = torch.from_numpy(np.bincount(bins[truth[:, label] == 1, label], minlength=BINS))
        negative[label] = torch.from_numpy(np.bincount(bins[truth[:, label] == 0, label], minlength=BINS))
    return positive, negative


def test_f1_from_histograms_equals_scikit_learn_on_thresholded_scores():
    rng = np.random.default_rng(0)
    truth = (rng.random((300, 6)) < 0.3).astype(int)
    truth[:, 5] = 0  # a label that never occurs
    scores = np.clip(0.6 * truth + 0.5 * rng.random((300, 6)), 0, 0.999)
    positive, negative = _histograms(scores, truth)
    for threshold in (0.2, 0.5, 0.73):
        predicted = (scores >= threshold).astype(int)
        bins = torch.full((6,), round(threshold * BINS))
        got = multilabel_f1(*_counts_at(positive, negative, bins))
        present = [label for label in range(6) if truth[:, label].any() or predicted[:, label].any()]
        assert got["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro"))
        assert got["macro_f1"] == pytest.approx(f1_score(truth[:, present], predicted[:, present], average="macro"))


def test_tuned_thresholds_are_each_labels_best_f1():
    rng = np.random.default_rng(1)
    truth = (rng.random((200, 3)) < 0.4).astype(int)
    scores = np.clip(0.3 * truth + 0.7 * rng.random((200, 3)), 0, 0.999)
    positive, negative = _histograms(scores, truth)
    chosen = tuned_thresholds(positive, negative)
    for label in range(3):
        best = max(f1_score(truth[:, label], scores[:, label] >= k / BINS) for k in range(1, BINS))
        picked = f1_score(truth[:, label], scores[:, label] >= chosen[label].item() / BINS)
        assert picked == pytest.approx(best)  # a buggy argmax or an off-by-one bin index picks a worse one
    assert tuned_thresholds(torch.zeros(1, BINS, dtype=torch.long), negative[:1]).tolist() == [BINS // 2]


# --- data errors ------------------------------------------------------------------------------------------


def test_bad_label_cells_name_the_file_row_and_column(tiny_text, tmp_path, texts):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in [{"text": "hi", "tags": None}, {"text": "ho", "tags": 0.5}]) + "\n")
    cfg = load_config(None, [f"model.name=hf:{tiny_text['bert']}", "model.task=multilabel", f"data.train={train}",
                             "data.label_column=tags"])
    with pytest.raises(ValueError, match=r"data.train: .*train.jsonl row 2, column 'tags': expected labels"):
        plan_run(cfg)

    val = tmp_path / "val.csv"
    val.write_text("text,labels\nwhere is it,order_status\nhello,order_status|teleport\n")
    cfg = load_config(None, _overrides(f"hf:{tiny_text['bert']}", {"train": texts["train"], "validation": str(val)},
                                       tmp_path, "x"))
    with pytest.raises(ValueError, match=r"data.validation: .*val.csv row 2, column 'labels': labels \['teleport'\] "
                                         r"do not occur in the training data"):
        plan_run(cfg)
    with pytest.raises(ValueError, match="model.task_options.threshold"):
        load_config(None, _overrides("minilm-l6", texts, tmp_path, "x", "model.task_options={threshold: 2x}"))


# --- image and audio families: one local training step ----------------------------------------------------


def _manifest(tmp_path: Path, rows: list[tuple[str, str]]) -> str:
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "labels"), *rows])
    return str(path)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_image_and_audio_families_learn_label_sets(kind, tmp_path, digits_dir, speech_dir, tiny_audio):
    """The same task file trains a timm and a wav2vec 2.0 head: the loss on a fixed batch falls."""
    if kind == "image":
        files = sorted(Path(digits_dir).glob("*/*.png"))[::40][:24]
        rows = [(str(f), f"digit{f.parent.name}|{'even' if int(f.parent.name) % 2 == 0 else 'odd'}") for f in files]
        model = ["model.name=timm:test_resnet", "model.weights=none", "data.image_size=32"]
    else:
        files = sorted(Path(speech_dir).glob("*/*.wav"))[::15][:24]
        rows = [(str(f), f"{f.parent.name}|{'short' if len(f.parent.name) <= 3 else 'long'}") for f in files]
        model = [f"model.name=hf:{tiny_audio['wav2vec2']}", "data.max_seconds=1.0"]
    cfg = load_config(None, [*model, "model.task=multilabel", f"data.train={_manifest(tmp_path, rows)}",
                             "data.label_column=labels", "data.val_fraction=0.25"])
    plan = plan_run(cfg)  # the data checks and the head for this family
    task = task_for("multilabel")
    family, ref = resolve_model(cfg.model)
    torch.manual_seed(0)
    net = family.build(ref, plan.labels, cfg.model, task.head)
    preprocessor = family.preprocessor(ref, net, cfg)
    ctx = WorkerContext(family, preprocessor, plan.labels, cfg, torch.device("cpu"),
                        scores_of_raw_inputs(family, preprocessor, torch.device("cpu")))
    batch = {"input": np.array([Path(f).read_bytes() for f, _ in plan.data.train_files[:8]], dtype=object),
             "label": np.array([labels for _, labels in plan.data.train_files[:8]], dtype=object)}
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    net.eval()  # no dropout, fixed BatchNorm statistics: the loss on the same batch must fall
    losses = []
    for _ in range(8):
        loss, stats = task.train_step(ctx, net, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert stats[1].item() == 8 and losses[-1] < 0.7 * losses[0], losses
    metrics = task.evaluate(ctx, net, [batch], lambda: torch.autocast("cpu", enabled=False))
    assert set(metrics) == {"val_loss", "val_micro_f1", "val_macro_f1"} and 0 < metrics["val_micro_f1"] <= 1


# --- text on Ray: train, resume, search, promote, serve ----------------------------------------------------


def test_multilabel_trains_resumes_searches_and_serves(ray_cluster, texts, tmp_path):
    """Real MiniLM-L6 as a frozen feature extractor (its outputs cached once) with a multi-label head."""
    from ray import serve

    from ptm_ray.serve import deploy

    first = fit(load_config(None, _overrides("minilm-l6", texts, tmp_path, "ml", "train.epochs=3")))
    f1 = [h["val_micro_f1"] for h in first.history]
    # predicting every label scores about 0.3 micro-F1 here and predicting none 0: the head must beat both
    assert f1[-1] > 0.6 and f1[-1] > f1[0], f1
    assert first.best_metrics["feature_cache_bytes"] > 0  # the cache serves multi-label heads too
    # resumed on one worker: a resumed run may change its worker count, and keeps every finished epoch
    resumed = fit(load_config(None, _overrides("minilm-l6", texts, tmp_path, "ml", "train.epochs=4",
                                               "scaling.num_workers=1")))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4] and resumed.history[:3] == first.history
    assert resumed.history[3]["resumed_from_epoch"] == 3

    space = "{model.task_options.threshold: {grid: [0.5, tune]}}"
    cfg = load_config(None, _overrides("minilm-l6", texts, tmp_path, "unused", "train.epochs=2",
                                       "scaling.num_workers=1", f"search.space={space}", "search.name=ml-search",
                                       f"search.registry={tmp_path / 'registry'}", "search.registry_name=ml",
                                       "search.scheduler=fifo", "search.top_k=1"))
    result = run_search(cfg)
    assert len(result.leaderboard) == 2 and result.metric == "val_micro_f1"
    histories = {("tune" in r.overrides): read_meta(r.checkpoint)["history"] for r in result.leaderboard}
    for tuned, fixed in zip(histories[True], histories[False]):
        assert tuned["train_loss"] == fixed["train_loss"]  # the threshold changes no training step ...
        assert tuned["val_macro_f1"] >= fixed["val_macro_f1"]  # ... and each label's tuned F1 is its best

    registry = ModelStore(str(tmp_path / "registry"))
    artifact = load_artifact(registry.get("ml").path)
    thresholds = artifact.meta["task_state"].get("thresholds")
    assert (thresholds is not None) == ("tune" in result.leaderboard[0].overrides)
    port = free_port()
    url, _ = deploy(load_config(None, ["data.train=unused", "model.name=minilm-l6", f"serve.registry={registry.root}",
                                       f"serve.port={port}", "serve.models=[{name: ml}]", "serve.num_cpus=0.1",
                                       "serve.min_replicas=1", "serve.max_replicas=1"]))
    try:
        inputs = ["where is my order #12345 and I want a refund", "how do I change my password"]
        served = requests.post(f"{url}/v1/models/ml/predict", json={"inputs": inputs}, timeout=60)
        assert served.status_code == 200, served.text
        assert served.json()["predictions"] == predict(artifact, inputs)
        assert "order_status" in served.json()["predictions"][0]["labels"]
        every = requests.post(f"{url}/v1/models/ml/predict", json={"inputs": inputs, "parameters": {"threshold": 0.0}},
                              timeout=60).json()["predictions"]
        assert all(sorted(p["labels"]) == sorted(artifact.labels) for p in every)  # threshold 0 takes every label
        for body, message in [({"inputs": inputs, "parameters": {"threshold": 1.5}}, "threshold"),
                              ({"inputs": inputs, "top_k": 2}, "top_k is not a top-level option of multilabel")]:
            bad = requests.post(f"{url}/v1/models/ml/predict", json=body, timeout=60)
            assert bad.status_code == 422 and message in bad.json()["error"], bad.text
    finally:
        serve.shutdown()
