"""The command line's fast paths: help, version, config list and the default config answer without torch,
Ray or transformers; `config show` prints a resolved, documented config that reads back to itself."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import ptm_ray
from ptm_ray.cli import main
from ptm_ray.config import Config, load_config
from ptm_ray.config_docs import field_docs
from ptm_ray.configs import config_path, shipped_configs

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "transformers", "timm", "torchvision", "torchaudio")

# Runs each command line in one fresh interpreter, then names the heavy packages it imported.
_PROBE = """
import sys
from ptm_ray.cli import main
for argv in {commands!r}:
    try:
        main(argv)
    except SystemExit:
        pass
print("IMPORTED:", sorted(m for m in {heavy!r} if m in sys.modules))
"""


def test_help_version_and_config_commands_do_not_import_heavy_packages():
    # (``config show --config F`` validates the config like a job, and validation asks the task registry,
    # whose tasks import torch: it is not among these fast paths)
    commands = [["--help"], ["--version"], ["config", "list"], ["config", "show"]]
    commands += [[name, "--help"] for name in ("finetune", "search", "deploy", "quickstart", "report", "config",
                                                    "predict", "evaluate")]
    commands += [["config", "list", "--help"], ["config", "show", "--help"]]
    probe = _PROBE.format(commands=commands, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("usage: ptm-ray") == 11  # every --help answered
    assert f"ptm-ray {ptm_ray.__version__} (torch " in proc.stdout
    assert proc.stdout.rstrip().endswith("IMPORTED: []"), proc.stdout[-500:]


def test_config_show_prints_every_field_with_its_doc_and_reads_back(capsys, tmp_path):
    overrides = ["optim.lr=3e-5", "scaling.resources_per_worker={CPU: 2}", "data.validation=null"]
    assert main(["config", "show", "--config", "text_quickstart", *overrides]) == 0
    shown = capsys.readouterr().out
    assert "# Learning rate of the backbone (the unfrozen blocks).\n  lr: 3.0e-05  # default: 5.0e-05\n" in shown
    assert "  freeze_depth: 3  # default: 0\n" in shown  # from the file
    assert "  epochs: " in shown and "  port: 8000\n" in shown  # defaults the file does not set
    saved = tmp_path / "shown.yaml"
    saved.write_text(shown)
    assert load_config(saved) == load_config(config_path("text_quickstart"), overrides)


def test_every_config_field_has_a_one_line_doc():
    docs = field_docs()
    hints = typing.get_type_hints(Config)
    missing = [f"{group.name}.{field.name}" for group in dataclasses.fields(Config)
               for field in dataclasses.fields(hints[group.name]) if not docs[hints[group.name].__name__].get(field.name)]
    assert not missing, f"config fields without a docstring under them in ptm_ray/config.py: {missing}"
    assert docs["TrainConfig"]["epochs"] == "Most epochs to run (early stopping may end sooner)."
    assert "\n" not in docs["ModelConfig"]["task"] and docs["ModelConfig"]["task"].endswith("`text_generation` (GPT-2).")


def test_config_show_without_a_config_prints_the_defaults(capsys):
    assert main(["config", "show"]) == 0
    shown = capsys.readouterr().out
    assert "  name: ''\n" in shown and "  lr: 5.0e-05\n" in shown and "# default:" not in shown


def test_shipped_configs_are_package_data_and_jobs_configs_points_at_them(capsys):
    shipped = shipped_configs()
    assert set(shipped) == {p.stem for p in (ROOT / "jobs" / "configs").glob("*.yaml")}
    assert all(p.parent == ROOT / "ptm_ray" / "configs" for p in shipped.values())
    assert main(["config", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"\n{name} " in "\n" + listed for name in shipped)
    assert "text_quickstart          The quickstart: real pretrained MiniLM-L6" in listed
    # a name, a name with .yaml and a path all give the same file; an unknown one lists what exists
    assert config_path("serve") == config_path("serve.yaml") == shipped["serve"]
    assert config_path(ROOT / "jobs" / "configs" / "serve.yaml").resolve() == shipped["serve"]
    with pytest.raises(ValueError, match=r"config file nope\.yaml does not exist.*text_quickstart"):
        config_path("nope.yaml")


def test_a_bad_config_name_fails_with_the_shipped_names(capsys):
    assert main(["finetune", "--config", "text_quickstar"]) == 2
    assert "ptm-ray finetune: error: config file text_quickstar does not exist" in capsys.readouterr().err
