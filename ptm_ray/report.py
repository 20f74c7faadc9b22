"""The transfer report: one self-contained HTML file (plots embedded as PNG) explaining why the winner won.

    ptm-ray report <study folder | search folder | run folder> [--out report.html]

A *study* is what the quickstart writes (``study.json``): fine-tuning runs, pretrained vs from-scratch
pairs, a data-efficiency sweep, a search and the served model's measured latency. A search folder (with
``leaderboard.csv``) or a single run folder (with ``checkpoint_*`` folders) gives the sections it can.
Every number in the report is read from those files; the claims section says, with them, whether
pretraining gave higher accuracy, data efficiency and reduced training time in this run.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from ptm_ray._optional import require_extra
from ptm_ray.checkpoint import read_meta

__all__ = ["Study", "claims", "load_study", "pareto_front", "run_history", "write_report"]

Study = dict[str, Any]


def run_history(run_path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-epoch metrics of a run folder and the metadata of its checkpoint with the longest history.

    Raises:
        ValueError: when the folder holds no ptm_ray checkpoint.
    """
    metas = [read_meta(p) for p in sorted(Path(run_path).glob("checkpoint_*")) if (p / "ptm_ray.json").is_file()]
    if not metas:
        raise ValueError(f"{run_path}: no ptm_ray checkpoint (checkpoint_*/ptm_ray.json) in this run folder")
    meta = max(metas, key=lambda m: len(m["history"]))
    return meta["history"], meta


def load_study(path: str | Path) -> Study:
    """The study at ``path``: a quickstart folder, a search folder or a single run folder.

    Raises:
        ValueError: naming the path and what was expected there.
    """
    path = Path(path).expanduser()
    if (path / "study.json").is_file():
        study = json.loads((path / "study.json").read_text())
    elif (path / "leaderboard.csv").is_file():
        study = {"title": f"Search {path.name}", "search": {"path": str(path)}}
    elif any(path.glob("checkpoint_*")):
        study = {"title": f"Run {path.name}", "runs": [{"name": path.name, "path": str(path)}], "main_run": path.name}
    else:
        raise ValueError(f"{path}: not a study (study.json), a search (leaderboard.csv) or a run folder "
                         "(checkpoint_*/); pass the folder a ptm-ray job printed")
    study["folder"] = str(path)
    return study


def _leaderboard(search_path: str) -> list[dict[str, Any]]:
    with open(Path(search_path) / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("best_score", "wall_time_s", "lr", "head_lr", "latency_ms_p50"):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
        for key in ("rank", "trainable_params", "best_epoch", "epochs_run", "params"):
            row[key] = int(float(row[key])) if row.get(key) not in (None, "") else None
        row["history"], row["depth_fraction"] = [], None
        if row.get("checkpoint") and (Path(row["checkpoint"]) / "ptm_ray.json").is_file():
            row["history"] = run_history(Path(row["checkpoint"]).parent)[0]  # the trial's run folder
            first = row["history"][0]
            row["depth_fraction"] = first["frozen_blocks"] / first["num_blocks"]
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and score (higher), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _best(history: list[dict[str, Any]], metric: str, mode: str = "max") -> dict[str, Any]:
    scored = [h for h in history if h.get(metric) is not None]
    return (max if mode == "max" else min)(scored, key=lambda h: h[metric])


def _time_to_reach(history: list[dict[str, Any]], metric: str, target: float) -> float | None:
    """Training seconds (summed epoch times) until ``metric`` first reaches ``target``; None if never."""
    spent = 0.0
    for h in history:
        spent += h.get("epoch_time_s", 0.0)
        if h[metric] >= target:
            return spent
    return None


def claims(study: Study, histories: dict[str, list[dict[str, Any]]]) -> list[dict[str, str]]:
    """Whether pretraining gave higher accuracy, data efficiency and reduced training time, with numbers."""
    metric = study.get("metric", "val_accuracy")
    out = []
    for pair in study.get("comparisons", []):
        pre, scratch = histories[pair["pretrained"]], histories[pair["scratch"]]
        p, s = _best(pre, metric), _best(scratch, metric)
        out.append({
            "claim": f"higher accuracy ({pair['task']})",
            "held": "yes" if p[metric] > s[metric] else "no",
            "evidence": f"best {metric}: pretrained {p[metric]:.3f} (epoch {p['epoch']}) vs from scratch "
                        f"{s[metric]:.3f} (epoch {s['epoch']}), same data, epochs and optimizer",
        })
        t_scratch = _time_to_reach(scratch, metric, s[metric])
        t_pre = _time_to_reach(pre, metric, s[metric])
        if t_pre is None:
            held, evidence = "no", f"pretrained never reached from-scratch's best {metric} {s[metric]:.3f}"
        else:
            held = "yes" if t_pre < t_scratch else "no"
            evidence = (f"time to reach from-scratch's best {metric} {s[metric]:.3f}: pretrained {t_pre:.1f} s "
                        f"vs from scratch {t_scratch:.1f} s of training ({t_scratch / max(t_pre, 1e-9):.1f}x)")
        out.append({"claim": f"reduced training time ({pair['task']})", "held": held, "evidence": evidence})
    sweep = study.get("data_efficiency")
    if sweep:
        rows = _sweep_points(sweep, histories, metric)
        most = max(rows)
        enough = [shots for shots, p, _ in rows if p >= most[2] and shots < most[0]]
        held = all(p > s for _, p, s in rows)
        evidence = "; ".join(f"{shots}/class: pretrained {p:.3f} vs scratch {s:.3f}" for shots, p, s in sorted(rows))
        if enough:
            evidence += (f". Pretrained with {min(enough)} examples per class matches or beats from scratch with "
                         f"{most[0]} ({most[2]:.3f})")
        out.append({"claim": f"data efficiency ({sweep['task']})", "held": "yes" if held else "no",
                    "evidence": evidence})
    return out


def _sweep_points(sweep: dict[str, Any], histories: dict[str, list[dict[str, Any]]],
                  metric: str) -> list[tuple[int, float, float]]:
    """(examples per class, best pretrained score, best from-scratch score) per run pair of the sweep."""
    return [(r["shots"], _best(histories[r["pretrained"]], metric)[metric], _best(histories[r["scratch"]], metric)[metric])
            for r in sweep["runs"]]


# --- plots --------------------------------------------------------------------------------------------------

def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _learning_curves(history: list[dict[str, Any]], metric: str, title: str) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    best = _best(history, metric)
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation loss")
    metric_ax.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    metric_ax.plot(epochs, [h[metric] for h in history], "o-", label=f"validation {metric.removeprefix('val_')}")
    for ax in (loss_ax, metric_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axvline(best["epoch"], color="green", ls="--", lw=1, label=f"best epoch ({best['epoch']})")
        if history[-1].get("stop_reason") == "early_stopping":
            ax.axvline(history[-1]["epoch"], color="red", ls=":", lw=1.5, label=f"early stop ({history[-1]['epoch']})")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    loss_ax.set_title(f"{title}: loss")
    metric_ax.set_title(f"{title}: {metric}")
    return _png(fig)


def _score_vs_depth(rows: list[dict[str, Any]], metric: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for model in sorted({r["model"] for r in rows}):
        points = sorted((r["depth_fraction"], r["best_score"]) for r in rows
                        if r["model"] == model and r["depth_fraction"] is not None and r["best_score"] is not None)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o", ms=7, label=model.split("/")[-1])
    ax.set_xlabel("fraction of the model's blocks frozen (0 = full fine-tuning, 1 = feature extraction)")
    ax.set_ylabel(f"best {metric}")
    ax.set_title("validation score vs freeze depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _score_vs_cost(rows: list[dict[str, Any]], metric: str) -> str:
    return _png(score_vs_cost_figure(rows, metric))


def score_vs_cost_figure(rows: list[dict[str, Any]], metric: str):
    """Each trial's best score against its wall time, its trainable parameters (log axis) and, when the search
    measured it, its serving latency (p50 of one input), with the Pareto front of each."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["best_score"] is not None]
    panels = [("wall_time_s", "trial wall time (s)"), ("trainable_params", "trainable parameters")]
    if any(r.get("latency_ms_p50") for r in rows):
        panels.append(("latency_ms_p50", "serving latency, p50 of one input (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), layout="constrained")
    for ax, (key, label) in zip(axes, panels):
        points = [(float(r.get(key) or 0), r["best_score"]) for r in rows]
        front = pareto_front(points)
        ax.scatter([p[0] for p in points], [p[1] for p in points], c="grey", label="trials")
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "o-", c="crimson", label="Pareto front")
        for r, (x, y) in zip(rows, points):
            ax.annotate(f"#{r['rank']}", (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(f"best {metric}")
        ax.margins(x=0.08, y=0.12)  # room for the rank labels at the edges
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _readable_log_axis(axes[1], [float(r["trainable_params"] or 0) for r in rows])
    fig.suptitle("validation score vs training and serving cost")
    return fig


def _readable_log_axis(ax, values: list[float]) -> None:
    """A log x axis whose tick labels never overlap: padded limits, ticks at 1-2-3-5, 1-2-5, 1-3 or 1 per
    decade as the span widens, labelled 200k / 5M, and no minor-tick labels (matplotlib's default labels
    minor ticks as 2x10^5, 3x10^5, ..., which run into each other when the data spans a decade or two)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v > 0]
    if not positive:
        return
    low, high = min(positive) / 1.6, max(positive) * 1.6
    decades = math.log10(high / low)
    subs = (1.0, 2.0, 3.0, 5.0) if decades <= 1 else (1.0, 2.0, 5.0) if decades <= 2 else (
        (1.0, 3.0) if decades <= 3.5 else (1.0,))
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: short_number(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def short_number(x: float) -> str:
    """``1500`` -> ``1.5k``, ``2e7`` -> ``20M``: tick labels that stay short."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:g}{suffix}"
    return f"{x:g}"


def _pretrained_vs_scratch(pre: list[dict], scratch: list[dict], metric: str, task: str) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for history, label in ((pre, "pretrained"), (scratch, "from scratch")):
        ax.plot([h["epoch"] for h in history], [h[metric] for h in history], "o-", label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: pretrained vs from scratch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _data_efficiency(points: list[tuple[int, float, float]], metric: str, task: str) -> str:
    return _png(data_efficiency_figure(points, metric, task))


def data_efficiency_figure(points: list[tuple[int, float, float]], metric: str, task: str):
    """Best pretrained and from-scratch scores per number of labelled examples per class (log axis, one tick
    per sweep point)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    points = sorted(points)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="pretrained")
    ax.plot([p[0] for p in points], [p[2] for p in points], "s--", label="from scratch")
    ax.set_xscale("log")
    ax.set_xticks([p[0] for p in points], [str(p[0]) for p in points])
    ax.xaxis.set_minor_formatter(NullFormatter())  # else matplotlib labels minor ticks too (6x10^0 beside 5)
    ax.set_xlabel("labelled training examples per class")
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"{task}: data efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# --- HTML ---------------------------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<h2 id="{anchor}">{html.escape(title)}</h2>\n{body}\n'


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:0.5em 0}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
        ".yes{color:#0a7a2f;font-weight:bold}.no{color:#b00020;font-weight:bold}img{max-width:100%}")


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of the study, search or run at ``path``; returns the report's path.

    Sections appear where the study has what they need: ``learning-curves`` always; ``leaderboard``,
    ``freeze-depth`` and ``cost`` for a search; ``pretrained-vs-scratch`` and ``data-efficiency`` for
    those runs; ``serving`` once deployed; ``claims`` when there is something to judge them by.
    """
    require_extra("matplotlib", "report", "the report's plots").use("Agg")
    study = load_study(path)
    metric = study.get("metric", "val_accuracy")
    histories = {r["name"]: run_history(r["path"])[0] for r in study.get("runs", [])}
    board = _leaderboard(study["search"]["path"]) if study.get("search") else []
    sections = [_claims_section(study, histories), _curves_section(study, histories, board, metric),
                *_search_sections(board, metric), *_transfer_sections(study, histories, metric),
                _serving_section(study.get("serve")), _timings_section(study.get("timings_s"))]
    title = html.escape(study.get("title", "ptm_ray report"))
    document = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style>"
                f"</head><body><h1>{title}</h1><p>From <code>{html.escape(study['folder'])}</code>.</p>"
                + "".join(sections) + "</body></html>")
    target = Path(out).expanduser() if out else Path(study["folder"]) / "report.html"
    target.write_text(document)
    return target


def _claims_section(study: Study, histories: dict[str, list[dict[str, Any]]]) -> str:
    judged = claims(study, histories)
    if not judged:
        return ""
    rows = "".join(f'<tr><td style="text-align:left">{html.escape(c["claim"])}</td>'
                   f'<td class="{c["held"]}">{c["held"]}</td>'
                   f'<td style="text-align:left">{html.escape(c["evidence"])}</td></tr>' for c in judged)
    return _section("claims", "Did pretraining help? (measured in this run)",
                    f"<table><tr><th>claim</th><th>held</th><th>numbers</th></tr>{rows}</table>")


def _curves_section(study: Study, histories: dict[str, list[dict[str, Any]]], board: list[dict[str, Any]],
                    metric: str) -> str:
    curves = []
    if study.get("main_run"):
        curves.append(_learning_curves(histories[study["main_run"]], metric, study["main_run"]))
    if board and board[0]["history"]:
        curves.append(_learning_curves(board[0]["history"], metric, f"search winner {board[0]['trial_id']}"))
    if not curves:
        return ""
    return _section("learning-curves", "Learning curves",
                    "<p>Train and validation loss and metric per epoch; the dashed line marks the best epoch (the "
                    "checkpoint kept), a dotted red line where early stopping stopped.</p>" + "".join(curves))


def _search_sections(board: list[dict[str, Any]], metric: str) -> list[str]:
    if not board:
        return []
    header = ["rank", "trial", "model", "freeze", "lr", "head lr", "trainable", f"best {metric}", "@epoch",
              "epochs", "wall s", "p50 ms", "params", "stop"]
    rows = [[r["rank"], r["trial_id"], r["model"].split("/")[-1], r["freeze_depth"], f"{r['lr']:.2e}",
             f"{(r['head_lr'] or r['lr']):.2e}", f"{r['trainable_params'] or 0:,}",
             "-" if r["best_score"] is None else f"{r['best_score']:.4f}", r["best_epoch"] or "-",
             r["epochs_run"], f"{r['wall_time_s']:.1f}",
             "-" if r.get("latency_ms_p50") is None else f"{r['latency_ms_p50']:.1f}",
             "-" if r.get("params") is None else f"{r['params']:,}", r["stop_reason"]] for r in board]
    return [_section("leaderboard", "Leaderboard (ranked by each trial's best epoch)",
                     _table(header, rows) + _score_vs_depth(board, metric)),
            _section("cost", "Score vs training and serving cost", "<p>Red: the Pareto front, the trials no other "
                     "trial beats on both score and cost.</p>" + _score_vs_cost(board, metric))]


def _transfer_sections(study: Study, histories: dict[str, list[dict[str, Any]]], metric: str) -> list[str]:
    sections = []
    if study.get("comparisons"):
        body = "".join(_pretrained_vs_scratch(histories[c["pretrained"]], histories[c["scratch"]], metric, c["task"])
                       for c in study["comparisons"])
        sections.append(_section("pretrained-vs-scratch", "Pretrained vs from scratch (same data and budget)", body))
    sweep = study.get("data_efficiency")
    if sweep:
        sections.append(_section("data-efficiency", "Score vs labelled examples per class",
                                 _data_efficiency(_sweep_points(sweep, histories, metric), metric, sweep["task"])))
    return sections


def _serving_section(served: dict[str, Any] | None) -> str:
    if not served:
        return ""
    lat = served["latency_ms"]
    body = (f"<p>{html.escape(served['model'])} at <code>{html.escape(served['url'])}</code>: "
            f"{lat['n']} sequential single-input requests over HTTP, p50 {lat['p50']:.1f} ms, "
            f"p95 {lat['p95']:.1f} ms, mean {lat['mean']:.1f} ms.</p>")
    body += _table(["input", "top label", "probability"],
                   [[p["input"], p["label"], f"{p['probability']:.3f}"] for p in served["predictions"]])
    return _section("serving", "Served model", body)


def _timings_section(timings: dict[str, float] | None) -> str:
    if not timings:
        return ""
    rows = [[stage, f"{seconds:.1f}"] for stage, seconds in timings.items()]
    return _section("timings", "Where the time went", _table(["stage", "seconds"], rows))
