"""The temporary folder a benchmark runs in, removed when the benchmark ends.

A benchmark's runs leave checkpoints, feature caches and Ray Tune experiments behind: one ``bench_search.py``
run left 7.7 GB, and two days of benchmark runs left 36 GB in ``/tmp``, which filled this machine's disk. ``PTM_RAY_BENCH_KEEP=1`` keeps the folder
(its path is printed) to look into after the run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A new folder under the system's temporary directory, removed at exit unless ``PTM_RAY_BENCH_KEEP=1``."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("PTM_RAY_BENCH_KEEP") == "1":
        print(f"[bench] working folder kept (PTM_RAY_BENCH_KEEP=1): {root}", flush=True)
    else:
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root
