"""The quickstart: the whole product on one machine, with real pretrained weights and no network.

Stages, each a plain ptm_ray job on the same Ray:

1. fine-tune MiniLM-L6 on the bundled support intents (learning curves, early stopping);
2. the same run from random initialisation (pretrained vs from scratch, same data and budget);
3. EfficientNet-Lite0 (ImageNet weights) vs the same network from scratch on few labelled digits per
   class (data efficiency);
4. a Ray Tune search over two text candidates x freeze depths x learning rates, the winner promoted to
   the model registry;
5. the winner deployed on Ray Serve, a few live HTTP predictions and a latency measurement;
6. the HTML report (``ptm_ray.report``) over everything above.

Everything lands in one folder: ``runs/``, ``search/``, ``registry/``, ``serve_config.yaml``,
``study.json`` (what the report reads) and ``report.html``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptm_ray._optional import require_extra
from ptm_ray.config import Config, load_config, with_overrides
from ptm_ray.configs import config_path

__all__ = ["QuickstartConfigs", "run_quickstart"]

EXAMPLES = ["where is my parcel, it was due yesterday", "I want my money back for this broken kettle",
            "how do I change the password on my account", "please cancel my subscription"]


@dataclass
class QuickstartConfigs:
    """The YAML config of each stage and extra dotted overrides per stage (tests shrink them)."""

    text: str = str(config_path("text_quickstart"))  # the shipped configs (ptm_ray/configs, jobs/configs)
    search: str = str(config_path("quickstart_search"))
    vision: str = str(config_path("vision_digits"))
    serve: str = str(config_path("serve"))
    overrides: dict[str, list[str]] = field(default_factory=dict)  # keys: text, search, vision, serve
    shots: tuple[int, ...] = (5, 20)  # labelled digits per class in the data-efficiency sweep


def _stage_configs(out: Path, c: QuickstartConfigs, port: int) -> dict[str, Any]:
    """Every stage's config, loaded and checked before Ray starts (a bad key fails in a second)."""
    from ptm_ray.datasets.digits import make_digits_split

    require_extra("matplotlib", "report", "the quickstart's report")  # before an hour of work, not after

    runs = out / "runs"
    mlruns = f"tracking.uri={(out / 'mlruns').as_uri()}"  # one MLflow store for every stage
    text = load_config(c.text, [f"storage.path={runs}", "storage.name=text-pretrained", mlruns,
                                *c.overrides.get("text", [])])
    vision = []
    for shots in c.shots:
        train, val = make_digits_split(out / "digits", shots)
        base = load_config(c.vision, [f"data.train={train}", f"data.validation={val}", f"storage.path={runs}",
                                      mlruns, *c.overrides.get("vision", [])])
        for init, weights in (("pretrained", base.model.weights), ("scratch", "none")):
            vision.append((shots, init, with_overrides(base, {"model.weights": weights,
                                                              "storage.name": f"digits-{shots}-{init}"})))
    search = load_config(c.search, [f"storage.path={out}", "search.name=search", f"search.registry={out / 'registry'}",
                                    mlruns, *c.overrides.get("search", [])])
    # the shipped serve.yaml keeps two replicas of everything and two hops (one process may die without a lost
    # request); the one-machine demo needs one replica, and one hop serves it fastest
    serve = load_config(c.serve, [f"serve.registry={out / 'registry'}", f"serve.port={port}",
                                  f"serve.models=[{{name: {search.search.registry_name or 'search'}}}]",
                                  "serve.min_replicas=1", "serve.ingress_replicas=1", "serve.one_hop=true",
                                  f"serve.config_out={out / 'serve_config.yaml'}", *c.overrides.get("serve", [])])
    scratch = with_overrides(text, {"model.weights": "none", "model.freeze_depth": 0, "storage.name": "text-scratch"})
    return {"text": text, "scratch": scratch, "vision": vision, "search": search, "serve": serve}


def _measure_endpoint(url: str, model: str, n: int = 30) -> dict[str, Any]:
    """Predictions for the example inputs, then ``n`` sequential one-input requests timed end to end."""
    import requests

    endpoint = f"{url}/v1/models/{model}/predict"
    answer = requests.post(endpoint, json={"inputs": EXAMPLES}, timeout=60)
    answer.raise_for_status()
    predictions = [{"input": text, "label": p["label"], "probability": p["probability"]}
                   for text, p in zip(EXAMPLES, answer.json()["predictions"])]
    latencies = []
    for i in range(n):
        started = time.perf_counter()
        requests.post(endpoint, json={"inputs": [EXAMPLES[i % len(EXAMPLES)]]}, timeout=60).raise_for_status()
        latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    return {"url": url, "model": model, "version": answer.json()["version"], "predictions": predictions,
            "latency_ms": {"n": n, "p50": statistics.median(latencies), "p95": latencies[int(0.95 * (n - 1))],
                           "mean": statistics.fmean(latencies)}}


class _Study:
    """What the report reads, filled stage by stage: runs, comparisons, timings; prints stage headers."""

    def __init__(self, metric: str, stages: int) -> None:
        self.record: dict[str, Any] = {"title": "ptm_ray quickstart", "metric": metric, "runs": [], "timings_s": {},
                                       "main_run": "text-pretrained"}
        self.stages, self.started = stages, time.perf_counter()

    def stage(self, i: int, title: str) -> None:
        print(f"\n[quickstart {i}/{self.stages}] {title}  (t={time.perf_counter() - self.started:.0f}s)", flush=True)

    def timed(self, key: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        value = fn(*args)
        self.record["timings_s"][key] = time.perf_counter() - t0
        return value

    def fit(self, experiment: str, runs: list[tuple[str, str, Config, dict[str, Any]]]) -> None:
        """Train a stage's runs, each ``(timing key, name, config, what the study records with it)``: those on
        one worker as the trials of one Tune experiment ``experiment`` (``fit_in_trials``: one process trains
        them all), the others one by one with ``fit`` (a Ray Train worker group each)."""
        from ptm_ray.train import fit
        from ptm_ray.tune import fit_in_trials

        single = [run for run in runs if run[2].scaling.num_workers == 1]
        done = {}
        if single:
            key = single[0][0] if len(single) == 1 else f"{experiment}: {len(single)} runs in Tune trials"
            results = self.timed(key, fit_in_trials, [cfg for _, _, cfg, _ in single], experiment)
            done = {name: result for (_, name, _, _), result in zip(single, results)}
        for key, name, cfg, _ in runs:
            if name not in done:
                done[name] = self.timed(key, fit, cfg)
        for _, name, cfg, extra in runs:
            self.record["runs"].append({"name": name, "path": done[name].run_path, "model": cfg.model.name,
                                        "weights": cfg.model.weights or "pretrained", **extra})


def run_quickstart(out: str | Path, configs: QuickstartConfigs | None = None, port: int = 8000) -> dict[str, Any]:
    """Run every stage into ``out`` and write ``study.json`` and ``report.html`` there; returns the study."""
    from ptm_ray.report import write_report
    from ptm_ray.runtime import init_ray

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfgs = _stage_configs(out, configs or QuickstartConfigs(), port)
    study = _Study(cfgs["text"].train.metric, stages=5)
    init_ray()
    _transfer_stages(study, cfgs)
    promoted = _search_stage(study, cfgs["search"])
    _serve_stage(study, cfgs["serve"], promoted)
    study.stage(5, "report")
    study.record["total_s"] = time.perf_counter() - study.started
    study.record["tracking"] = _tracking_commands(cfgs["text"], out)
    (out / "study.json").write_text(json.dumps(study.record, indent=2))
    study.record["report"] = str(write_report(out))
    return study.record


def _tracking_commands(cfg: Config, out: Path) -> list[str]:
    """How to open the quickstart's MLflow runs and TensorBoard events (those that were written)."""
    from ptm_ray.tracking import mlflow_uri, tracking_wanted

    lines = []
    if tracking_wanted(cfg, "mlflow"):
        lines.append(f"MLflow:      MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {mlflow_uri(cfg)}")
    if tracking_wanted(cfg, "tensorboard"):
        lines.append(f"TensorBoard: tensorboard --logdir {out}")
    return lines


def _transfer_stages(study: _Study, cfgs: dict[str, Any]) -> None:
    """Pretrained vs from scratch on text, then on few digits per class (the data-efficiency sweep)."""
    text: Config = cfgs["text"]
    study.stage(1, f"fine-tune {text.model.name} on {Path(text.data.train).name}, then the same from scratch")
    study.fit("text", [("text fine-tune", "text-pretrained", text, {}),
                       ("text from scratch", "text-scratch", cfgs["scratch"], {})])
    study.record["comparisons"] = [{"task": "support intents (text)", "pretrained": "text-pretrained",
                                    "scratch": "text-scratch"}]
    vision = cfgs["vision"]
    study.stage(2, f"{vision[0][2].model.name} vs from scratch on {sorted({s for s, _, _ in vision})} digits per class")
    sweep: dict[int, dict[str, Any]] = {}
    runs = []
    for shots, init, cfg in vision:
        name = f"digits-{shots}-{init}"
        runs.append((f"digits {shots}/class {init}", name, cfg, {"shots": shots}))
        sweep.setdefault(shots, {"shots": shots})[init] = name
    study.fit("digits", runs)
    study.record["data_efficiency"] = {"task": "handwritten digits (images)", "runs": list(sweep.values())}


def _search_stage(study: _Study, search: Config) -> list[Any]:
    """The search over candidates, depths and learning rates; returns the promoted versions."""
    from ptm_ray.tune import format_leaderboard, run_search

    study.stage(3, f"search {', '.join(search.search.space)} (Ray Tune, ASHA)")
    result = study.timed("search", run_search, search)
    print(format_leaderboard(result.leaderboard, result.metric))
    study.record["search"] = {"path": result.experiment_path}
    study.record["promoted"] = [{"name": m.name, "version": m.version, "path": m.path} for m in result.promoted]
    if not result.promoted:
        raise RuntimeError(f"the search at {result.experiment_path} produced no checkpoint to promote")
    return result.promoted


def _serve_stage(study: _Study, serve_cfg: Config, promoted: list[Any]) -> None:
    """The winner on Ray Serve: live predictions and a latency measurement over HTTP."""
    from ptm_ray.serve import deploy

    study.stage(4, f"deploy {promoted[0].name} v{promoted[0].version} on Ray Serve")
    url, config_path = study.timed("deploy", deploy, serve_cfg)
    served = study.timed("predict + latency", _measure_endpoint, url, promoted[0].name)
    study.record["serve"] = served | {"serve_config": str(config_path)}
    for p in served["predictions"]:
        print(f"  {p['input']!r:50} -> {p['label']} ({p['probability']:.2f})")
    lat = served["latency_ms"]
    print(f"  latency over {lat['n']} requests: p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms")
