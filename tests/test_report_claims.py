"""The report's claim judging (did pretraining help?) and its Pareto front, on hand-made histories whose verdicts
and numbers are worked out by hand here (pure functions: no runs, no plots)."""

from __future__ import annotations


from ptm_ray.report import _best, _time_to_reach, claims, pareto_front


def _history(*rows: tuple[float | None, float | None], metric: str = "val_accuracy") -> list[dict]:
    """Epochs 1..n of (metric value, epoch seconds); a None time leaves epoch_time_s out (older runs)."""
    out = []
    for epoch, (value, seconds) in enumerate(rows, start=1):
        h = {"epoch": epoch, metric: value}
        if seconds is not None:
            h["epoch_time_s"] = seconds
        out.append(h)
    return out


def test_pretrained_better_and_faster_is_judged_yes_with_its_numbers():
    histories = {
        "pre": _history((0.6, 10.0), (0.9, 10.0)),
        "scratch": _history((0.3, 12.0), (0.7, 12.0), (0.5, 12.0)),  # best epoch 2, not the last
    }
    study = {"comparisons": [{"task": "intents", "pretrained": "pre", "scratch": "scratch"}]}
    assert claims(study, histories) == [
        {"claim": "higher accuracy (intents)", "held": "yes",
         "evidence": "best val_accuracy: pretrained 0.900 (epoch 2) vs from scratch 0.700 (epoch 2), same data, "
                     "epochs and optimizer"},
        # scratch reaches its best 0.7 after 24 s; pretrained passes 0.7 at its 2nd epoch, after 20 s
        {"claim": "reduced training time (intents)", "held": "yes",
         "evidence": "time to reach from-scratch's best val_accuracy 0.700: pretrained 20.0 s vs from scratch 24.0 s "
                     "of training (1.2x)"},
    ]


def test_ties_and_a_pretrained_run_that_never_gets_there_are_judged_no():
    histories = {
        "tie_pre": _history((0.5, 5.0)), "tie_scratch": _history((0.5, 5.0)),  # equal is not better, nor faster
        "low_pre": _history((0.2, 1.0), (0.4, 1.0), metric="val_f1"),
        "low_scratch": _history((0.5, 9.0), metric="val_f1"),
    }
    tie = {"comparisons": [{"task": "t", "pretrained": "tie_pre", "scratch": "tie_scratch"}]}
    assert [(c["held"], c["evidence"]) for c in claims(tie, histories)] == [
        ("no", "best val_accuracy: pretrained 0.500 (epoch 1) vs from scratch 0.500 (epoch 1), same data, epochs and "
               "optimizer"),
        ("no", "time to reach from-scratch's best val_accuracy 0.500: pretrained 5.0 s vs from scratch 5.0 s of "
               "training (1.0x)")]
    never = {"metric": "val_f1", "comparisons": [{"task": "t", "pretrained": "low_pre", "scratch": "low_scratch"}]}
    assert claims(never, histories) == [
        {"claim": "higher accuracy (t)", "held": "no",
         "evidence": "best val_f1: pretrained 0.400 (epoch 2) vs from scratch 0.500 (epoch 1), same data, epochs and "
                     "optimizer"},
        {"claim": "reduced training time (t)", "held": "no",
         "evidence": "pretrained never reached from-scratch's best val_f1 0.500"},
    ]


def test_missing_epoch_times_count_as_zero_seconds():
    histories = {"pre": _history((0.8, None)), "scratch": _history((0.4, 3.0), (0.6, 3.0))}
    study = {"comparisons": [{"task": "t", "pretrained": "pre", "scratch": "scratch"}]}
    time_claim = claims(study, histories)[1]
    # 6 s / (0 s, floored at 1e-9 s so the ratio is defined)
    assert time_claim["held"] == "yes"
    assert time_claim["evidence"].endswith("pretrained 0.0 s vs from scratch 6.0 s of training (6000000000.0x)")


def test_data_efficiency_is_judged_over_every_size_and_names_the_smallest_that_matches():
    histories = {
        "p2": _history((0.6, 1.0)), "s2": _history((0.3, 1.0)),  # 0.6 equals scratch's best at 8/class: it matches
        "p4": _history((0.65, 1.0)), "s4": _history((0.4, 1.0)),
        "p8": _history((0.7, 1.0), (0.8, 1.0)), "s8": _history((0.6, 1.0), (0.5, 1.0)),
    }
    sweep = {"task": "digits", "runs": [{"shots": 8, "pretrained": "p8", "scratch": "s8"},  # any order
                                        {"shots": 2, "pretrained": "p2", "scratch": "s2"},
                                        {"shots": 4, "pretrained": "p4", "scratch": "s4"}]}
    assert claims({"data_efficiency": sweep}, histories) == [{
        "claim": "data efficiency (digits)", "held": "yes",
        "evidence": "2/class: pretrained 0.600 vs scratch 0.300; 4/class: pretrained 0.650 vs scratch 0.400; "
                    "8/class: pretrained 0.800 vs scratch 0.600. Pretrained with 2 examples per class matches or "
                    "beats from scratch with 8 (0.600)"}]


def test_data_efficiency_with_a_tie_is_no_and_names_no_smaller_size():
    histories = {"p2": _history((0.4, 1.0)), "s2": _history((0.4, 1.0)),  # a tie at 2/class: not better
                 "p8": _history((0.7, 1.0)), "s8": _history((0.6, 1.0))}
    sweep = {"task": "digits", "runs": [{"shots": 2, "pretrained": "p2", "scratch": "s2"},
                                        {"shots": 8, "pretrained": "p8", "scratch": "s8"}]}
    # 8/class itself beats scratch's best at 8 but is not a *smaller* set, so no "matches with fewer" sentence
    assert claims({"data_efficiency": sweep, "comparisons": []}, histories) == [{
        "claim": "data efficiency (digits)", "held": "no",
        "evidence": "2/class: pretrained 0.400 vs scratch 0.400; 8/class: pretrained 0.700 vs scratch 0.600"}]
    assert claims({"data_efficiency": None}, histories) == [] and claims({}, histories) == []


def test_best_skips_unscored_epochs_in_either_direction():
    history = [{"epoch": 1, "val_wer": 0.5}, {"epoch": 2, "val_wer": None}, {"epoch": 3}, {"epoch": 4, "val_wer": 0.3},
               {"epoch": 5, "val_wer": 0.4}]
    assert _best(history, "val_wer", mode="min")["epoch"] == 4
    assert _best(history, "val_wer")["epoch"] == 1  # max by default
    assert _best(history, "val_wer", mode="max")["epoch"] == 1


def test_time_to_reach_sums_epoch_times_until_the_target_is_first_reached():
    history = _history((0.2, 1.5), (0.5, 2.0), (0.4, 4.0), (0.9, 8.0))
    assert _time_to_reach(history, "val_accuracy", 0.5) == 3.5  # reached exactly at epoch 2
    assert _time_to_reach(history, "val_accuracy", 0.45) == 3.5
    assert _time_to_reach(history, "val_accuracy", 0.2) == 1.5
    assert _time_to_reach(history, "val_accuracy", 0.95) is None
    assert _time_to_reach(_history((0.1, None), (0.7, 2.0)), "val_accuracy", 0.7) == 2.0


def test_pareto_front_orders_by_cost_and_drops_ties_and_dominated_points():
    # (cost, score). At cost 1 the better score wins; (5, 0.9) only ties (3, 0.9) at a higher cost: dominated.
    points = [(3.0, 0.9), (1.0, 0.5), (2.0, 0.4), (1.0, 0.6), (5.0, 0.9), (6.0, 0.95)]
    assert pareto_front(points) == [3, 0, 5]
    assert pareto_front([(2.0, -1.0)]) == [0]  # a negative score (e.g. -loss) is still on the front
    assert pareto_front([]) == []
