"""Small datasets bundled with ptm_ray (made by the project, see each ``make_*.py``)."""

from pathlib import Path

__all__ = ["bundled_path"]

_HERE = Path(__file__).parent


def bundled_path(name: str) -> Path:
    """Absolute path of a bundled data file, e.g. ``bundled_path("support_intents_train.csv")``."""
    path = _HERE / name
    if not path.exists():
        known = sorted(p.name for p in _HERE.iterdir() if p.suffix in {".csv", ".jsonl", ".parquet"})
        raise ValueError(f"no bundled dataset {name!r}; bundled: {known}")
    return path
