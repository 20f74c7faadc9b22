"""The benchmarks (``bench/``) are not run by the suite, so a rename in ptm_ray can break one unnoticed (a
function-level import of a moved helper broke ``bench_feature_cache.py`` part (b) that way). This checks, without
running them, that every ``from ptm_ray... import name`` in a benchmark, at any depth, names something that
exists, and that every ``ptm_ray`` module a benchmark imports is there."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def _ptm_ray_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) for each ptm_ray import in ``path``; name None for ``import ptm_ray.x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ptm_ray":
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names if alias.name.split(".")[0] == "ptm_ray"]
    return found


def test_the_benchmarks_are_found():
    assert {"bench_search.py", "bench_feature_cache.py", "bench_data_scale.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_what_a_benchmark_imports_from_ptm_ray_exists(script: Path):
    missing = []
    for line, module, name in _ptm_ray_imports(script):
        try:
            imported = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{script.name}:{line}: import {module}: {e}")
            continue
        if name is not None and not hasattr(imported, name):
            try:  # a submodule not imported by its package's __init__
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)
