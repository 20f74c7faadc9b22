"""Fine-tune a pretrained model with data-parallel Ray Train workers.

Locally (starts a Ray on 127.0.0.1 for the run):
    python jobs/finetune.py --config jobs/configs/text_quickstart.yaml optim.lr=3e-5

On a cluster (the same command, submitted):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/finetune.py --config jobs/configs/text_quickstart.yaml optim.lr=3e-5
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, under ray job submit

from ptm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
