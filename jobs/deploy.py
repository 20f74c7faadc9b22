"""Deploy registry models on Ray Serve behind an autoscaling HTTP API; writes a `serve deploy` config too.

On a running cluster (Serve outlives the job):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/deploy.py --config jobs/configs/serve.yaml

Locally (the job's own Ray lives as long as this process, hence --block):
    python jobs/deploy.py --config jobs/configs/serve.yaml --block
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, under ray job submit

from ptm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["deploy", *sys.argv[1:]]))
