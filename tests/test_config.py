"""Config loading: every shipped YAML parses; bad keys, types and values are refused by dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptm_ray.config import config_from_dict, config_to_dict, load_config, parse_freeze_depth
from ptm_ray.train import plan_run

from conftest import TRAIN_CSV, VAL_CSV, require_espeak

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("jobs", "configs").glob("*.yaml"))
BASE = [f"model.name=minilm-l6", f"data.train={TRAIN_CSV}"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_plans(path, tmp_path):
    overrides = []
    if path.name == "vision_digits.yaml":  # its folders are written by the quickstart (or by hand, as it says)
        from ptm_ray.datasets.digits import make_digits_split

        train, val = make_digits_split(tmp_path, 5)
        overrides = [f"data.train={train}", f"data.validation={val}"]
    if path.name == "detection_shapes.yaml":  # its data is written by python -m ptm_ray.datasets.shapes
        from ptm_ray.datasets.shapes import make_shapes

        shapes = make_shapes(tmp_path, num_train=4, num_val=2, image_size=64)
        overrides = [f"data.train={shapes['train']}", f"data.validation={shapes['val']}"]
    if path.name == "speech_sentences.yaml":  # its data is written by python -m ptm_ray.datasets.spoken_sentences
        from ptm_ray.datasets.spoken_sentences import make_spoken_sentences

        require_espeak()
        sentences = make_spoken_sentences(tmp_path, num_train=8, num_val=4)
        overrides = [f"data.train={sentences['train']}", f"data.validation={sentences['validation']}"]
    if path.name in ("t5_replies.yaml", "gpt2_replies.yaml"):  # a hub id or local folder; here a tiny one
        from ptm_ray.tiny import make_tiny_text_model

        family = "t5" if path.name.startswith("t5") else "gpt2"
        overrides = [f"model.name=hf:{make_tiny_text_model(family, tmp_path / family, ['where is my order'])}"]
    cfg = load_config(path, overrides)
    assert cfg.model.name and cfg.data.train
    plan = plan_run(cfg)  # the data and the freeze depth check out against the real model
    assert 0 <= plan.freeze_blocks <= plan.num_blocks
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides_are_dotted_and_typed():
    cfg = load_config(None, BASE + ["optim.lr=3e-5", "scaling.num_workers=3", "model.freeze_depth=all",
                                    "scaling.resources_per_worker={CPU: 2, GPU: 1}", "data.validation=null"])
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.scaling.num_workers == 3
    assert cfg.model.freeze_depth == "all"
    assert cfg.scaling.resources_per_worker == {"CPU": 2.0, "GPU": 1.0}
    assert cfg.data.validation is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1e-3", "unknown config key optim.lrr; allowed in this group: lr, head_lr"),
        ("modell.name=x", "unknown config key modell"),
        ("optim.lr=fast", "optim.lr must be float, got 'fast'"),
        ("optim.lr=0", "optim.lr=0.0 must be > 0"),
        ("optim.lr=-1e-4", "optim.lr=-0.0001 must be > 0"),
        ("scaling.num_workers=0", "scaling.num_workers=0 must be >= 1"),
        ("scaling.num_workers=1.5", "scaling.num_workers must be int, got 1.5"),
        ("train.mode=up", "train.mode='up' is not allowed; choose one of max, min"),
        ("model.freeze_depth=most", "model.freeze_depth='most' must be an int, a fraction in (0, 1] or 'all'"),
        ("model.freeze_depth=-1", "model.freeze_depth=-1 must be >= 0"),
        ("model.freeze_depth=1.5", "model.freeze_depth=1.5 as a fraction must lie in [0, 1]"),
        ("data.train=", "data.train is required"),
        ("optim.layer_decay=1.2", "optim.layer_decay=1.2 must lie in (0, 1]"),
        ("train.use_gpu=true", "unknown config key train.use_gpu"),
        ("optim", "override 'optim' must look like group.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError) as e:
        load_config(None, BASE + [override])
    assert message in str(e.value)


def test_bad_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("model:\n  name: minilm-l6\n  freeze: 2\n")
    with pytest.raises(ValueError, match="unknown config key model.freeze;"):
        load_config(bad)


def test_freeze_depth_beyond_the_model_is_refused_before_ray():
    cfg = load_config(None, BASE + [f"data.validation={VAL_CSV}", "model.freeze_depth=8"])
    with pytest.raises(ValueError, match=r"model.freeze_depth=8 is beyond the model's depth: it has 7 blocks"):
        plan_run(cfg)


def test_missing_data_file_is_refused_before_ray(tmp_path):
    cfg = load_config(None, ["model.name=minilm-l6", f"data.train={tmp_path / 'nope.csv'}"])
    with pytest.raises(ValueError, match=r"data.train: file .*nope.csv does not exist"):
        plan_run(cfg)


def test_unknown_model_lists_what_is_known():
    cfg = load_config(None, ["model.name=bert-base-uncased", f"data.train={TRAIN_CSV}"])
    with pytest.raises(ValueError, match=r"not a known model: use one of the short names \['efficientnet-lite0', 'minilm-l3', 'minilm-l6'\]"):
        plan_run(cfg)


def test_parse_freeze_depth():
    assert parse_freeze_depth(0, 7) == 0
    assert parse_freeze_depth(3, 7) == 3
    assert parse_freeze_depth("all", 7) == 7
    assert parse_freeze_depth(0.5, 7) == 3
    assert parse_freeze_depth(1.0, 7) == 7
