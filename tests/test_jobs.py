"""The job entrypoint: bad configs fail fast with the key named; `ray job submit` runs it unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def test_bad_config_exits_2_naming_the_key_without_starting_ray():
    proc = subprocess.run(
        [sys.executable, "jobs/finetune.py", "--config", "jobs/configs/text_quickstart.yaml", "optim.lr=-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "ptm-ray finetune: error: optim.lr=-1.0 must be > 0" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_ray_job_submit_runs_the_finetune_job(ray_cluster, tiny_text, tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="token")  # the cluster was started with token auth on
    overrides = tiny_overrides(tiny_text["bert"], tmp_path, "submitted", train__epochs=2, scaling__num_workers=1)
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", ray_cluster, "--working-dir", str(ROOT), "--",
         "python", "jobs/finetune.py", "--config", "jobs/configs/text_quickstart.yaml", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "succeeded" in out
    assert "best checkpoint:" in out
    assert list((tmp_path / "runs" / "submitted").glob("checkpoint_*/ptm_ray.json"))
