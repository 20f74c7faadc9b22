"""Search candidate models x freeze depths x learning rates with Ray Tune; promote the winners.

Locally:
    python jobs/search.py --config jobs/configs/text_search.yaml

On a cluster (the same command, submitted):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/search.py --config jobs/configs/text_search.yaml search.name=intents-1

Running again with the same search.name restores the search: finished trials are not run again.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, under ray job submit

from ptm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
