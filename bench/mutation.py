"""Mutation testing of the pure modules: how many deliberately broken versions the fast unit tests catch.

mutmut (``[tool.mutmut]`` in pyproject.toml says what is mutated and which tests run) makes small changes
to the code (``<`` to ``<=``, ``+`` to ``-``, a constant changed, a call argument dropped, ...) and reruns
the unit tests that call the changed function against each. A mutant is *killed* when a test fails (or it
runs past its time limit, as an off-by-one in a loop bound can); one that passes every test *survived*:
either the tests miss a real bug or the change is equivalent (the same behaviour). The score per module
is killed / (killed + survived + no tests). Only fast, pure tests run (no Ray cluster, no training), so the
whole run fits a 2-core machine; it is not part of ``make test``.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/mutation.py [--workers 2] [--module freeze ...] [--survivors]
                                                        [--survivors-only]

``mutants/`` (ignored by git) holds mutmut's copy of the code; ``.venv/bin/python -m mutmut show NAME``
prints the diff of one mutant afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> functions whose mutants count (None: the whole module; methods as ``Class.method``). Only the report's
# claim logic is in scope (the rest of report.py draws plots and writes HTML), and of the tasks their loss, metric,
# prediction-format and request-option code: reading data files and running real models is what the Ray tests do.
_CLASSIFICATION = ("_logits_and_targets", "train_step", "train_metrics", "evaluate", "details", "scores", "format",
                   "describe", "request_options")
SCOPE: dict[str, tuple[str, ...] | None] = {
    "freeze": None,
    "config": None,
    "seq_metrics": None,
    "detection_metrics": None,
    "report": ("claims", "pareto_front", "_time_to_reach", "_best"),
    "tasks.base": ("parse_options", "loss_stats", *(f"Task.{m}" for m in (
        "unsupported_by", "task_options", "train_metrics", "describe", "request_options"))),
    "tasks.classification": ("classification_metrics", "format_prediction",
                             *(f"ClassificationTask.{m}" for m in _CLASSIFICATION)),
    "tasks.multilabel": ("_label_set", "multilabel_f1", "_counts_at", "tuned_thresholds", *(f"MultiLabelTask.{m}" for m in (
        "_targets", "train_step", "evaluate", "state", "scores", "format", "describe", "request_options"))),
    "tasks.speech": ("encode_transcripts", "decode_ids", *(f"SpeechRecognitionTask.{m}" for m in (
        "_loss_and_log_probs", "train_step", "evaluate", "describe"))),
    "tasks.detection": ("_format", "_target_json", "_targets", *(f"DetectionTask.{m}" for m in (
        "train_step", "evaluate", "describe", "request_options"))),
    "tasks.generation": ("_request_options", "_LanguageModelTask.train_step", "_LanguageModelTask.request_options",
                         "_LanguageModelTask.describe", "Text2TextTask._loss", "Text2TextTask.evaluate",
                         "TextGenerationTask._loss", "TextGenerationTask.evaluate"),
}
KILLED, TIMEOUT, SURVIVED, NO_TESTS = {1, 3}, {36, 24, -24, 152, 255}, {0}, {5, 33}


def _mangled(function: str) -> str:
    """mutmut's name of a function's mutants: ``x_<function>``, methods ``xǁ<Class>ǁ<method>``."""
    if "." in function:
        cls, method = function.split(".")
        return f"xǁ{cls}ǁ{method}"
    return f"x_{function}"


def mutant_globs(modules: list[str]) -> list[str]:
    """mutmut names mutants ``ptm_ray.<module>.<mangled function>__mutmut_<n>``."""
    globs = []
    for module in modules:
        functions = SCOPE[module]
        if functions is None:
            globs.append(f"ptm_ray.{module}.*")
        else:
            globs += [f"ptm_ray.{module}.{_mangled(f)}__mutmut_*" for f in functions]
    return globs


def in_scope(module: str, mutant: str) -> bool:
    functions = SCOPE[module]
    mangled = mutant.removeprefix(f"ptm_ray.{module}.").rsplit("__mutmut_", 1)[0]
    return functions is None or mangled in {_mangled(f) for f in functions}


def results(modules: list[str]) -> dict[str, dict[str, list[str]]]:
    """module -> {killed, timeout, survived, no tests, other} -> mutant names, read from mutmut's meta files."""
    out = {}
    for module in modules:
        meta = json.loads((ROOT / "mutants" / "ptm_ray" / f"{module.replace('.', '/')}.py.meta").read_text())
        groups: dict[str, list[str]] = {"killed": [], "timeout": [], "survived": [], "no tests": [], "other": []}
        for name, code in meta["exit_code_by_key"].items():
            if not in_scope(module, name):
                continue
            group = ("killed" if code in KILLED else "timeout" if code in TIMEOUT else "survived" if code in SURVIVED
                     else "no tests" if code in NO_TESTS else "other")
            groups[group].append(name)
        out[module] = groups
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    parser.add_argument("--module", nargs="+", choices=list(SCOPE), default=list(SCOPE))
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants by name")
    parser.add_argument("--survivors-only", action="store_true",
                        help="retest only the last run's survivors (after sharpening a test); default: a fresh run")
    args = parser.parse_args()

    os.chdir(ROOT)  # mutmut reads pyproject.toml and writes mutants/ in the current folder
    if args.survivors_only:
        names = [n for groups in results(args.module).values() for n in groups["survived"]]
        if not names:
            sys.exit("no survivors to retest")
    else:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        names = mutant_globs(args.module)
    # mutmut puts its mutated copy first on the path itself. It forks each mutant's test run from a process
    # that already ran torch: with OpenMP's thread pool alive at the fork, the children spin until their CPU
    # limit and every mutant of a torch-using function reads as a (false) timeout kill. One thread avoids it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.workers),
                          *names], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if not (ROOT / "mutants" / "ptm_ray").is_dir() or run.returncode not in (0, 1):
        sys.exit(f"mutmut run failed (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")

    print(f"{'module':<22}{'mutants':>8}{'killed':>8}{'timeout':>8}{'survived':>9}{'no tests':>9}{'score':>8}")
    found = results(args.module)
    for module, groups in found.items():
        total = sum(len(v) for v in groups.values())
        caught = len(groups["killed"]) + len(groups["timeout"])
        score = caught / total if total else float("nan")
        print(f"{module:<22}{total:>8}{len(groups['killed']):>8}{len(groups['timeout']):>8}"
              f"{len(groups['survived']):>9}{len(groups['no tests']):>9}{score:>8.1%}")
        if groups["other"]:
            print(f"  {len(groups['other'])} with another status (segfault, suspicious): {groups['other'][:5]}")
    print(f"mutmut run took {elapsed:.0f} s with {args.workers} workers")
    if args.survivors:
        for module, groups in found.items():
            for name in groups["survived"] + groups["no tests"]:
                print(name)


if __name__ == "__main__":
    main()
