"""Config loading: every shipped YAML parses; bad keys, types and values are refused by dotted key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ptm_ray.config import (config_from_dict, config_to_dict, format_overrides, load_config, parse_freeze_depth,
                            with_overrides)
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
    # every key the file sets is loaded as written (a loader that drops or mangles a key, or lets a default win,
    # fails here; load_config's own checks cannot see that)
    loaded, overridden = config_to_dict(cfg), {o.partition("=")[0] for o in overrides}
    for group, values in yaml.safe_load(path.read_text()).items():
        for key, written in values.items():
            if f"{group}.{key}" not in overridden:
                assert loaded[group][key] == _as_loaded(key, written), f"{path.name}: {group}.{key}"
    plan = plan_run(cfg)  # the data and the freeze depth check out against the real model
    # the plan freezes what the config asks of this model (a plan that ignored freeze_depth would pass 0 <= k <= n)
    assert plan.num_blocks > 0 and plan.freeze_blocks == parse_freeze_depth(cfg.model.freeze_depth, plan.num_blocks)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def _as_loaded(key: str, written: object) -> object:
    """What load_config makes of a YAML value: "3e-5" (a string to PyYAML) a float, feature_cache's on/off a word."""
    if key == "feature_cache" and isinstance(written, bool):
        return "on" if written else "off"
    if isinstance(written, str) and re.fullmatch(r"[-+]?\d*\.?\d+[eE][-+]?\d+", written):
        return float(written)
    return written


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


# --- validation, value by value (pure: no model is loaded) -------------------------------------------------
# Each bad value is checked against the whole message, so a check that names the wrong key, tests the wrong
# field, or is off by one at its boundary fails here; each boundary value that must pass is loaded too.

@pytest.mark.parametrize("override, message", [
    ("model.max_length=0", "model.max_length=0 must be > 0"),
    ("train.epochs=0", "train.epochs=0 must be > 0"),
    ("train.batch_size=0", "train.batch_size=0 must be > 0"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps=0 must be > 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be > 0"),
    ("optim.head_lr=0", "optim.head_lr=0.0 must be > 0"),
    ("search.num_samples=0", "search.num_samples=0 must be > 0"),
    ("search.grace_period=0", "search.grace_period=0 must be > 0"),
    ("search.max_concurrent_trials=0", "search.max_concurrent_trials=0 must be > 0"),
    ("search.top_k=0", "search.top_k=0 must be > 0"),
    ("search.trial_cpus=0", "search.trial_cpus=0.0 must be > 0"),
    ("search.reduction_factor=1", "search.reduction_factor=1 must be >= 2"),
    ("serve.max_batch_size=0", "serve.max_batch_size=0 must be > 0"),
    ("serve.max_replicas=0", "serve.max_replicas=0 must be > 0"),
    ("serve.target_ongoing_requests=0", "serve.target_ongoing_requests=0.0 must be > 0"),
    ("serve.max_items=0", "serve.max_items=0 must be > 0"),
    ("serve.max_body_bytes=0", "serve.max_body_bytes=0 must be > 0"),
    ("serve.top_k=0", "serve.top_k=0 must be > 0"),
    ("serve.port=0", "serve.port=0 must be > 0"),
    ("serve.max_new_tokens=0", "serve.max_new_tokens=0 must be > 0"),
    ("serve.max_num_beams=0", "serve.max_num_beams=0 must be > 0"),
    ("serve.max_boxes=0", "serve.max_boxes=0 must be > 0"),
    ("serve.min_replicas=-1", "serve.min_replicas=-1 must lie in 0..serve.max_replicas=2"),
    ("serve.min_replicas=3", "serve.min_replicas=3 must lie in 0..serve.max_replicas=2"),
    ("serve.host=0.0.0.0", "serve.host=0.0.0.0 exposes the endpoints beyond this machine: set serve.api_key_env "
                           "or serve.api_key_file so every route but health needs a bearer token"),
    ("serve.proxy_location=Nowhere", "serve.proxy_location='Nowhere' must be EveryNode or HeadOnly"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm=-1.0 must be >= 0"),
    ("train.early_stopping_patience=-1", "train.early_stopping_patience=-1 must be >= 0"),
    ("train.early_stopping_min_delta=-0.1", "train.early_stopping_min_delta=-0.1 must be >= 0"),
    ("train.max_steps_per_epoch=-1", "train.max_steps_per_epoch=-1 must be >= 0"),
    ("train.shuffle_buffer=-1", "train.shuffle_buffer=-1 must be >= 0"),
    ("scaling.max_failures=-1", "scaling.max_failures=-1 must be >= 0"),
    ("scaling.resources_per_worker={CPU: -1}", "scaling.resources_per_worker.CPU=-1.0 must be >= 0"),
    ("optim.layer_decay=0", "optim.layer_decay=0.0 must lie in (0, 1]"),
    ("optim.warmup_ratio=1.0", "optim.warmup_ratio=1.0 must lie in [0, 1)"),
    ("optim.warmup_ratio=-0.1", "optim.warmup_ratio=-0.1 must lie in [0, 1)"),
    ("data.hflip=1.5", "data.hflip=1.5 must lie in [0, 1]"),
    ("data.hflip=-0.5", "data.hflip=-0.5 must lie in [0, 1]"),
    ("data.max_seconds=0", "data.max_seconds must be > 0 and data.image_size >= 0"),
    ("data.image_size=-1", "data.max_seconds must be > 0 and data.image_size >= 0"),
    ("data.val_fraction=0", "data.val_fraction=0.0 must lie in (0, 1)"),
    ("data.val_fraction=1", "data.val_fraction=1.0 must lie in (0, 1)"),
    ("model.name=", "model.name is required, e.g. model.name=minilm-l6 or model.name=hf:/path/to/model"),
    ("data.train=", "data.train is required: a CSV, JSONL or Parquet file of labelled examples"),
    ("model.freeze_depth=1.5", "model.freeze_depth=1.5 as a fraction must lie in [0, 1]; use an int for a block count"),
    ("model.task=poetry", "model.task='poetry' is not a known task; known: classification, detection, multilabel, "),
    ("train.feature_cache=maybe", "train.feature_cache='maybe' is not allowed; choose one of auto, on, off"),
    ("search.algorithm=bayes", "search.algorithm='bayes' is not allowed; choose one of random, grid, tpe"),
    # types: a union names each allowed type, None as null; dict values and list items are named by key/index
    ("model.freeze_depth=[1]", "model.freeze_depth must be int or float or str, got [1]"),
    ("optim.head_lr=fast", "optim.head_lr must be float or null, got 'fast'"),
    ("scaling.resources_per_worker={CPU: many}", "scaling.resources_per_worker.CPU must be float, got 'many'"),
    ("serve.models=[{name: a}, 3]", "serve.models[1] must be dict, got 3"),
    ("model.kwargs=5", "model.kwargs must be dict, got 5"),
    ("train.use_gpu=true", "unknown config key train.use_gpu; allowed in this group: epochs, batch_size, "),
])
def test_each_bad_value_is_refused_with_its_own_message(override, message):
    with pytest.raises(ValueError) as e:
        load_config(None, BASE + [override])
    assert str(e.value).startswith(message)


def test_boundary_values_are_accepted():
    cfg = load_config(None, BASE + [
        "scaling.num_workers=1", "serve.min_replicas=0", "search.reduction_factor=2", "optim.layer_decay=1.0",
        "optim.warmup_ratio=0", "data.hflip=1.0", "data.max_seconds=0.5", "data.image_size=0", "data.val_fraction=0.99",
        "scaling.resources_per_worker={CPU: 0.5, GPU: 0}", "model.freeze_depth=1.0", "optim.weight_decay=0",
        "optim.max_grad_norm=0", "train.early_stopping_patience=0", "train.early_stopping_min_delta=0",
        "train.max_steps_per_epoch=0", "train.shuffle_buffer=0", "scaling.max_failures=0", "optim.head_lr=1e-6",
        "serve.proxy_location=HeadOnly"])
    assert (cfg.scaling.num_workers, cfg.serve.min_replicas, cfg.search.reduction_factor) == (1, 0, 2)
    assert (cfg.data.max_seconds, cfg.scaling.resources_per_worker) == (0.5, {"CPU": 0.5, "GPU": 0.0})
    assert cfg.model.freeze_depth == 1.0 and cfg.optim.head_lr == pytest.approx(1e-6)
    assert load_config(None, BASE + ["serve.min_replicas=2", "serve.max_replicas=2"]).serve.min_replicas == 2
    smallest = ["serve.max_batch_size=1", "serve.max_replicas=1", "serve.target_ongoing_requests=0.5",
                "serve.max_items=1", "serve.max_body_bytes=1", "serve.top_k=1", "serve.port=1", "serve.max_new_tokens=1",
                "serve.max_num_beams=1", "serve.max_boxes=1", "search.trial_cpus=0.1", "optim.lr=1e-9"]
    serve = load_config(None, BASE + smallest).serve
    assert (serve.max_batch_size, serve.max_replicas, serve.target_ongoing_requests, serve.max_boxes) == (1, 1, 0.5, 1)


@pytest.mark.parametrize("host, key", [("localhost", ""), ("::1", ""), ("0.0.0.0", "serve.api_key_env=MY_KEY"),
                                       ("0.0.0.0", "serve.api_key_file=/run/key")])
def test_loopback_hosts_need_no_key_and_others_take_either_key(host, key):
    cfg = load_config(None, BASE + [f"serve.host={host}"] + ([key] if key else []))
    assert cfg.serve.host == host


def test_metric_and_mode_defaults_follow_the_task_and_the_metric_name():
    cfg = load_config(None, BASE)
    assert (cfg.train.metric, cfg.train.mode) == ("val_accuracy", "max")  # classification's own
    for metric, mode in [("val_loss", "min"), ("val_cer", "min"), ("val_perplexity", "min"), ("val_f1", "max")]:
        cfg = load_config(None, BASE + [f"train.metric={metric}"])
        assert (cfg.train.metric, cfg.train.mode) == (metric, mode)  # an explicit metric is kept, its mode derived
    cfg = load_config(None, BASE + ["train.metric=val_loss", "train.mode=max"])
    assert cfg.train.mode == "max"  # an explicit mode is kept


def test_yaml_on_off_is_read_as_a_feature_cache_setting():
    # YAML 1.1 reads a bare on/off as a boolean; the loader turns it back into the setting's word
    assert load_config(None, BASE + ["train.feature_cache=on"]).train.feature_cache == "on"
    assert load_config(None, BASE + ["train.feature_cache=off"]).train.feature_cache == "off"


def test_override_parsing_keeps_equals_signs_in_values_and_rejects_scalars_as_groups():
    cfg = load_config(None, BASE + ["model.name=hf:/models/run=3", "serve.models=[{name: a, versions: "
                                    "[{version: 1, weight: 90}, {version: 2, weight: 10}]}]"])
    assert cfg.model.name == "hf:/models/run=3"  # split at the first '=' only
    assert cfg.serve.models == [{"name": "a", "versions": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]}]
    with pytest.raises(ValueError, match=r"^override optim.lr.x: lr is not a group$"):
        load_config(None, BASE + ["optim.lr=1e-3", "optim.lr.x=1"])
    with pytest.raises(ValueError, match=r"^override '=3' must look like group.key=value$"):
        load_config(None, BASE + ["=3"])


def test_yaml_groups_must_be_mappings(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- data\n")
    with pytest.raises(ValueError, match=r"list.yaml must hold a mapping of groups, got list$"):
        load_config(listed)
    bad_group = tmp_path / "group.yaml"
    bad_group.write_text("model: [minilm-l6]\n")
    with pytest.raises(ValueError, match=r"^model must be a mapping, got \['minilm-l6'\]$"):
        load_config(bad_group)
    with pytest.raises(ValueError, match=r"^config must be a mapping, got \['x'\]$"):
        config_from_dict(["x"])
    empty_group = tmp_path / "empty.yaml"
    empty_group.write_text("model:\n  name: minilm-l6\ndata:\n  train: t.csv\noptim:\n")
    assert load_config(empty_group).optim == load_config(None, BASE).optim  # an empty group keeps the defaults


def test_with_overrides_and_format_overrides_round_trip():
    cfg = load_config(None, BASE)
    trial = {"optim.lr": 3e-5, "model.freeze_depth": "all", "optim.head_lr": None, "train.epochs": 4,
             "scaling.resources_per_worker": {"CPU": 0.5}, "data.validation": "v.csv", "data.hflip": 0.5,
             "train.feature_cache": "off"}
    changed = with_overrides(cfg, trial)
    assert [getattr(getattr(changed, k.split(".")[0]), k.split(".")[1]) for k in trial] == list(trial.values())
    assert cfg.optim.lr == 5e-5 and cfg.train.epochs == 3  # the original is untouched
    strings = format_overrides(trial)
    assert strings[:4] == ["optim.lr=3.0e-05", "model.freeze_depth=all", "optim.head_lr=null", "train.epochs=4"]
    assert load_config(None, BASE + strings) == changed  # a trial re-runs from the command line as it ran
    # containers stay on one line, in flow style, nested ones too (block style would span lines)
    models = [{"name": "a", "versions": [{"version": 1, "weight": 90}]}]
    assert format_overrides({"serve.models": models, "scaling.resources_per_worker": {"CPU": 0.5, "GPU": 1}}) == [
        "serve.models=[{name: a, versions: [{version: 1, weight: 90}]}]",
        "scaling.resources_per_worker={CPU: 0.5, GPU: 1}"]
    with pytest.raises(ValueError, match=r"^optim.lr=-1.0 must be > 0$"):
        with_overrides(cfg, {"optim.lr": -1.0})  # validated like load_config


def test_parse_freeze_depth_edges_and_messages():
    assert parse_freeze_depth(0.0, 7) == 0 and parse_freeze_depth(7, 7) == 7 and parse_freeze_depth(0.99, 7) == 6
    with pytest.raises(ValueError, match=r"^model.freeze_depth must be an int, a fraction in \(0, 1\] or 'all', "
                                         r"got True$"):
        parse_freeze_depth(True, 7)  # a bool is not a block count
    with pytest.raises(ValueError, match=r"^search.space must be an int, a fraction in \(0, 1\] or 'all', got 'half'$"):
        parse_freeze_depth("half", 7, key="search.space")
    with pytest.raises(ValueError, match=r"^model.freeze_depth=1.5 as a fraction must lie in \[0, 1\]$"):
        parse_freeze_depth(1.5, 7)
    with pytest.raises(ValueError, match=r"^model.freeze_depth=-0.5 as a fraction must lie in \[0, 1\]$"):
        parse_freeze_depth(-0.5, 7)
    with pytest.raises(ValueError, match=r"^model.freeze_depth=8 is beyond the model's depth: it has 7 blocks, so use "
                                         r"0..7 \(or a fraction, or 'all'\)$"):
        parse_freeze_depth(8, 7)
    with pytest.raises(ValueError, match=r"^model.freeze_depth=-1 is beyond the model's depth"):
        parse_freeze_depth(-1, 7)


def test_an_override_that_is_not_yaml_names_the_key_and_how_to_quote():
    # bug guarded: yaml's ParserError with its "in <unicode string>, line 1, column 6" page reached the user
    with pytest.raises(ValueError, match=r"^override data.train=a: b: c: the value is not valid YAML \(mapping values "
                                         r"are not allowed here\); quote a string .* data.train='\"a: b: c\"'$"):
        load_config(None, ["data.train=a: b: c"])
    with pytest.raises(ValueError, match=r"^override optim.lr=\[1e-3: the value is not valid YAML"):
        load_config(None, ["data.train=x", "optim.lr=[1e-3"])
