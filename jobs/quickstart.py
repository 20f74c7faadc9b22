"""The quickstart: fine-tune, compare with from-scratch, search, promote, deploy, predict and report.

    python jobs/quickstart.py [--out ~/ptm_ray_quickstart] [--keep-serving]

Runs on a local Ray started for it (or the cluster it is submitted to with ``ray job submit``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, under ray job submit

from ptm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))
