"""The quickstart end to end (reduced: tiny models, two epochs) and the report it writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, tiny_overrides
from ptm_ray.quickstart import QuickstartConfigs, run_quickstart
from ptm_ray.report import pareto_front

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("claims", "learning-curves", "leaderboard", "cost", "pretrained-vs-scratch", "data-efficiency", "serving")


def test_pareto_front_keeps_only_undominated_points():
    # (cost, score): the 2nd is dominated by the 1st (costlier, worse), the 4th by the 3rd
    points = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.9), (4.0, 0.8), (5.0, 0.95)]
    assert pareto_front(points) == [0, 2, 4]


@pytest.fixture(scope="module")
def quickstart(ray_cluster, tiny_text, tmp_path_factory):
    from ray import serve

    out = tmp_path_factory.mktemp("quickstart")
    common = [o for o in tiny_overrides(tiny_text["bert"], out, "unused", train__epochs=2, scaling__num_workers=1)
              if not o.startswith("storage.")]
    space = (f"search.space={{model.name: {{grid: ['hf:{tiny_text['bert']}', 'hf:{tiny_text['roberta']}']}}, "
             "model.freeze_depth: {grid: [0.5]}, optim.lr: {loguniform: [1.0e-3, 3.0e-3]}}")
    configs = QuickstartConfigs(
        overrides={
            "text": common,
            "search": [*common, space, "search.grace_period=2"],
            "vision": ["model.name=timm:test_resnet", "model.weights=none", "data.image_size=32", "optim.lr=3e-3",
                       "train.epochs=2", "train.batch_size=8", "scaling.resources_per_worker={CPU: 1}"],
            "serve": ["serve.num_cpus=0.1", "serve.max_replicas=1"],
        },
        shots=(2, 4),
    )
    study = run_quickstart(out, configs, port=free_port())
    yield out, study
    serve.shutdown()


def test_reduced_quickstart_runs_every_stage(quickstart):
    out, study = quickstart
    assert {r["name"] for r in study["runs"]} == {"text-pretrained", "text-scratch", "digits-2-pretrained",
                                                  "digits-2-scratch", "digits-4-pretrained", "digits-4-scratch"}
    for run in study["runs"]:
        assert list(Path(run["path"]).glob("checkpoint_*/ptm_ray.json")), run
    assert (Path(study["search"]["path"]) / "leaderboard.csv").is_file()
    assert study["promoted"][0]["version"] == 1
    assert (out / "registry" / study["promoted"][0]["name"] / "v1" / "lineage.json").is_file()
    labels = set(json.loads((out / "registry" / study["promoted"][0]["name"] / "v1" / "ptm_ray.json").read_text())["labels"])
    assert len(study["serve"]["predictions"]) == 4
    assert all(p["label"] in labels and 0 < p["probability"] <= 1 for p in study["serve"]["predictions"])
    latency = study["serve"]["latency_ms"]
    assert latency["n"] == 30 and 0 < latency["p50"] <= latency["p95"]
    assert json.loads((out / "study.json").read_text())["runs"] == study["runs"]


def test_quickstart_report_has_every_section_with_plots_and_judged_claims(quickstart):
    out, study = quickstart
    page = (out / "report.html").read_text()
    for anchor in SECTIONS:
        assert f'id="{anchor}"' in page, anchor
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}">', page)) == 6  # curves x2, depth, cost, pretrained vs scratch, data efficiency
    held = re.findall(r'<td class="(yes|no)">', page)
    assert len(held) == 3  # higher accuracy, reduced training time (text), data efficiency (digits)
    assert "src=\"http" not in page  # self-contained: nothing loaded from elsewhere


def test_report_command_on_a_search_folder_and_on_a_bad_path(quickstart, tmp_path):
    _, study = quickstart
    target = tmp_path / "search.html"
    proc = subprocess.run([sys.executable, "-m", "ptm_ray.cli", "report", study["search"]["path"], "--out", str(target)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    page = target.read_text()
    assert 'id="leaderboard"' in page and 'id="cost"' in page and 'id="claims"' not in page
    proc = subprocess.run([sys.executable, "-m", "ptm_ray.cli", "report", str(tmp_path / "nothing")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "nothing: not a study (study.json), a search (leaderboard.csv) or a run folder" in proc.stderr
