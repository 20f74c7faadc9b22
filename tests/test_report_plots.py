"""The report's plots as drawn: the log axis of "score vs trainable parameters" has readable, non-overlapping
tick labels whatever the span of the trials' parameter counts; the data-efficiency axis labels only its points."""

from __future__ import annotations

import pytest

from ptm_ray.report import data_efficiency_figure, score_vs_cost_figure, short_number

# (rank, wall time s, trainable parameters, best score): the quickstart's search (MiniLM-L6/L3 half or all
# frozen: 148k to 5.5M), trials within one decade, and a head-only trial beside full fine-tuning (4 decades)
SEARCHES = {
    "quickstart": [(1, 123.0, 5_460_000, 0.9375), (2, 60.0, 148_000, 0.55), (3, 40.0, 3_700_000, 0.3),
                   (4, 30.0, 148_000, 0.2)],
    "one decade": [(1, 50.0, 11_200_000, 0.9), (2, 45.0, 13_000_000, 0.85), (3, 40.0, 21_000_000, 0.8),
                   (4, 30.0, 17_500_000, 0.7)],
    "four decades": [(1, 50.0, 3_080, 0.5), (2, 45.0, 1_800_000, 0.85), (3, 40.0, 22_700_000, 0.9),
                     (4, 30.0, 11_000, 0.6)],
}


def _labels(fig, axes: int) -> list:
    """The x tick labels a reader sees on ``fig.axes[axes]`` (drawn, non-empty, inside the limits)."""
    fig.canvas.draw()
    axis = fig.axes[axes].xaxis
    low, high = fig.axes[axes].get_xlim()
    return [t for t in axis.get_majorticklabels() + axis.get_minorticklabels()
            if t.get_visible() and t.get_text() and low <= t.get_position()[0] <= high]


@pytest.mark.parametrize("search", SEARCHES)
def test_trainable_parameter_ticks_are_labelled_without_overlap(search):
    import matplotlib.pyplot as plt

    rows = [{"rank": r, "wall_time_s": t, "trainable_params": p, "best_score": s} for r, t, p, s in SEARCHES[search]]
    fig = score_vs_cost_figure(rows, "val_accuracy")
    try:
        labels = _labels(fig, 1)
        renderer = fig.canvas.get_renderer()
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
        low, high = fig.axes[1].get_xlim()
        assert len(boxes) >= 2, [t.get_text() for t in labels]
        gaps = [right.x0 - left.x1 for left, right in zip(boxes, boxes[1:])]
        assert min(gaps) > 2, ([t.get_text() for t in labels], gaps)  # pixels between neighbouring labels
        points = [p for _, _, p, _ in SEARCHES[search]]
        assert low < min(points) and max(points) < high  # every trial inside the axes, not on its frame
    finally:
        plt.close(fig)


def test_short_numbers():
    assert [short_number(x) for x in (3, 1500, 200_000, 1e6, 2.5e7, 3e9)] == ["3", "1.5k", "200k", "1M", "25M", "3G"]


def test_data_efficiency_ticks_are_the_sweep_points_only():
    import matplotlib.pyplot as plt

    fig = data_efficiency_figure([(20, 0.717, 0.523), (5, 0.32, 0.123)], "val_accuracy", "digits")
    try:
        assert [t.get_text() for t in _labels(fig, 0)] == ["5", "20"]
    finally:
        plt.close(fig)


def test_the_serving_latency_panel_appears_when_the_search_measured_it():
    import matplotlib.pyplot as plt

    rows = [{"rank": 1, "wall_time_s": 30.0, "trainable_params": 200_000, "best_score": 0.9, "latency_ms_p50": 12.0},
            {"rank": 2, "wall_time_s": 20.0, "trainable_params": 100_000, "best_score": 0.8, "latency_ms_p50": 14.0},
            {"rank": 3, "wall_time_s": 10.0, "trainable_params": 50_000, "best_score": 0.7, "latency_ms_p50": 4.0}]
    fig = score_vs_cost_figure(rows, "val_accuracy")
    try:
        assert len(fig.axes) == 3 and fig.axes[2].get_xlabel() == "serving latency, p50 of one input (ms)"
        front = [line for line in fig.axes[2].get_lines() if line.get_label() == "Pareto front"][0]
        assert list(front.get_xdata()) == [4.0, 12.0]  # rank 2 is slower and worse than rank 1: off the front
    finally:
        plt.close(fig)
    without = score_vs_cost_figure([{k: v for k, v in r.items() if k != "latency_ms_p50"} for r in rows], "val_accuracy")
    try:
        assert len(without.axes) == 2  # a leaderboard from before latency was measured
    finally:
        plt.close(without)
