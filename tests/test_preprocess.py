"""Preprocessing in Ray Data beside the trainers (``data.preprocess``): the same batches and metrics as
preprocessing in the workers, no hang with two workers on this 2-CPU node, resume, and what ``auto`` picks."""

from __future__ import annotations

import pytest
import torch

from ptm_ray.config import load_config
from ptm_ray.models import resolve_model
from ptm_ray.preprocess import preprocess_splits
from ptm_ray.tasks import task_for
from ptm_ray.train import fit

from conftest import VAL_CSV, tiny_overrides

ONE_WORKER = {"scaling__num_workers": 1, "scaling__resources_per_worker": "{CPU: 1}", "train__epochs": 2}


def _image_config(digits_dir, tmp_path, name: str, preprocess: str, *extra: str):
    return load_config(None, ["model.name=timm:test_efficientnet", "model.weights=none", f"data.train={digits_dir}",
                              "data.image_size=32", "data.validation=null", "data.val_fraction=0.2",
                              "train.batch_size=32", "optim.lr=3e-3", "optim.scheduler=constant",
                              "optim.warmup_ratio=0.0", "scaling.num_workers=1", "scaling.resources_per_worker={CPU: 1}",
                              "train.epochs=2", "train.max_steps_per_epoch=6", f"data.preprocess={preprocess}",
                              f"storage.path={tmp_path / 'runs'}", f"storage.name={name}", *extra])


def _preprocessor(cfg):
    family, ref = resolve_model(cfg.model)
    with torch.device("meta"):
        skeleton = family.build(ref, ["a", "b"], cfg.model, "classifier", pretrained=False)
    return family.preprocessor(ref, skeleton, cfg)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5"])
def test_text_rows_then_collate_equal_the_preprocessor(tiny_text, tmp_path, support_texts, kind):
    cfg = load_config(None, tiny_overrides(tiny_text[kind], tmp_path, "unused", model__max_length=12))
    preprocessor = _preprocessor(cfg)
    texts = support_texts[:7] + ["x", "a much longer text " * 10]  # shorter and longer than max_length
    expected = preprocessor(texts)
    got = preprocessor.collate(preprocessor.rows(texts))
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_image_rows_then_collate_equal_the_preprocessor(digits_dir, tmp_path):
    from pathlib import Path

    preprocessor = _preprocessor(_image_config(digits_dir, tmp_path, "unused", "auto"))
    images = [p.read_bytes() for p in sorted(Path(digits_dir).glob("*/*.png"))[:5]]
    assert torch.equal(preprocessor.collate(preprocessor.rows(images))["pixel_values"],
                       preprocessor(images)["pixel_values"])


def _assert_same_history(workers, ray_data) -> None:
    for a, b in zip(workers.history, ray_data.history, strict=True):
        for key in ("val_accuracy", "val_loss", "train_loss", "validation_rows"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (key, workers.history, ray_data.history)


def test_text_metrics_are_the_same_on_both_paths(ray_cluster, tiny_text, tmp_path, capsys):
    def run(preprocess):
        return fit(load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, preprocess, data__preprocess=preprocess,
                                                    train__max_steps_per_epoch=15, **ONE_WORKER)))

    workers = run("workers")
    assert "[ptm_ray] preprocessing in the training workers (data.preprocess=workers)" in capsys.readouterr().out
    ray_data = run("ray_data")
    assert ("[ptm_ray] preprocessing train and validation data in Ray Data tasks beside the workers "
            "(data.preprocess=ray_data)") in capsys.readouterr().out
    _assert_same_history(workers, ray_data)


def test_image_metrics_are_the_same_on_both_paths(ray_cluster, digits_dir, tmp_path):
    one_epoch = ("train.epochs=1", "train.max_steps_per_epoch=4")  # the equality needs no second epoch
    workers = fit(_image_config(digits_dir, tmp_path, "workers", "workers", *one_epoch))
    ray_data = fit(_image_config(digits_dir, tmp_path, "ray_data", "ray_data", *one_epoch))
    _assert_same_history(workers, ray_data)


def test_two_workers_preprocess_in_ray_data_on_a_two_cpu_node_and_resume(ray_cluster, tiny_text, tmp_path, capsys):
    val = tmp_path / "val33.csv"  # odd: every row still evaluated once across the two workers
    val.write_text("\n".join(open(VAL_CSV, newline="").read().splitlines()[:34]) + "\n")

    def run(epochs):
        return fit(load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "two", data__validation=str(val),
                                                    data__preprocess="ray_data", train__epochs=epochs,
                                                    train__max_steps_per_epoch=4)))

    # the two workers ask 1 CPU each of the session cluster's 2: the preprocessing tasks must still run
    first = run(2)
    assert "each of the 2 workers reserves 0.75 CPU instead of 1" in capsys.readouterr().out
    assert [h["validation_rows"] for h in first.history] == [33, 33]
    second = run(3)  # the same storage.name: resumes after epoch 2 with the checkpoint's preprocessor
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    assert second.history[2]["resumed_from_epoch"] == 2 and second.history[2]["validation_rows"] == 33


def test_a_bad_value_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"data.preprocess='gpu' is not allowed; choose one of auto, workers, ray_data"):
        load_config(None, ["data.preprocess=gpu"])


def _splits(cfg, spare=0.0, feature_cache=False, in_search=False):
    family, _ = resolve_model(cfg.model)
    splits, why, _ = preprocess_splits(cfg, task_for(cfg.model.task), family, lambda: _preprocessor(cfg),
                                       feature_cache, spare, in_search)
    return splits, why


def test_auto_preprocesses_text_in_ray_data_only_with_spare_cpus(tiny_text, tmp_path, digits_dir):
    text = load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "unused"))
    assert _splits(text, spare=0.0) == ([], "data.preprocess=auto: 0 CPU(s) beside the workers, under 2: the Ray "
                                            "Data tasks would take turns with the workers on the same cores")
    assert _splits(text, spare=6.0) == (["train", "validation"], "data.preprocess=auto: 6 CPU(s) beside the workers")
    assert _splits(text, spare=6.0, feature_cache=True)[0] == []
    assert _splits(text, spare=6.0, in_search=True)[0] == []
    images = _image_config(digits_dir, tmp_path, "unused", "auto")
    assert _splits(images, spare=6.0) == ([], "data.preprocess=auto: decoded images would fill the object store "
                                              "ahead of the workers; data.preprocess=ray_data moves them anyway")
    augmented = _image_config(digits_dir, tmp_path, "unused", "ray_data", "data.augment=light")
    splits, why = _splits(augmented)
    assert splits == ["validation"] and "training images stay in the workers (data.augment=light" in why


def test_ray_data_where_a_run_cannot_is_refused_naming_why(tiny_text, tmp_path):
    generation = load_config(None, tiny_overrides(tiny_text["t5"], tmp_path, "unused", model__task="text2text",
                                                  data__preprocess="ray_data"))
    with pytest.raises(ValueError, match=r"data.preprocess=ray_data is not available for this run: "
                                         r"model.task=text2text preprocesses in its own steps"):
        _splits(generation, spare=6.0)
    text = load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "unused", data__preprocess="ray_data"))
    with pytest.raises(ValueError, match=r"the feature cache looks its rows up by their raw input "
                                         r"\(train.feature_cache=off turns it off\)"):
        _splits(text, feature_cache=True)
    auto = load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "unused", data__preprocess="auto"))
    assert _splits(auto, spare=6.0, feature_cache=True)[:2] == (  # auto says why, with no advice to change anything
        [], "data.preprocess=auto: the feature cache looks its rows up by their raw input")
    assert _splits(text)[0] == ["train", "validation"]  # asked for: no spare CPUs needed


def test_multilabel_metrics_are_the_same_on_both_paths(ray_cluster, tiny_text, tmp_path):
    from ptm_ray.datasets.support_multilabel import make_support_multilabel

    train, val = make_support_multilabel(tmp_path / "data")

    def run(preprocess):
        return fit(load_config(None, [f"model.name=hf:{tiny_text['bert']}", "model.task=multilabel", "model.max_length=32",
                                      f"data.train={train}", f"data.validation={val}", "data.label_column=labels",
                                      "optim.lr=1e-3", "optim.scheduler=constant", "optim.warmup_ratio=0.0",
                                      "train.batch_size=8", "train.epochs=2", "train.max_steps_per_epoch=8",
                                      "scaling.num_workers=1", "scaling.resources_per_worker={CPU: 1}",
                                      f"data.preprocess={preprocess}", f"storage.path={tmp_path / 'runs'}",
                                      f"storage.name={preprocess}"]))

    workers, ray_data = run("workers"), run("ray_data")
    for a, b in zip(workers.history, ray_data.history, strict=True):
        for key in ("val_micro_f1", "val_loss", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (key, workers.history, ray_data.history)


def test_a_search_refuses_ray_data_before_any_trial(tiny_text, tmp_path):
    from ptm_ray.tune import validate_search

    cfg = load_config(None, tiny_overrides(tiny_text["bert"], tmp_path, "unused", data__preprocess="ray_data")
                      + ["search.space={optim.lr: {grid: [1.0e-3, 3.0e-4]}}"])
    with pytest.raises(ValueError, match="data.preprocess=ray_data is not available in a search"):
        validate_search(cfg)
