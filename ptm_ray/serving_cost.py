"""What a checkpoint costs to serve: its single-input latency (p50) on this machine and its parameter count.

The search measures each trial's best checkpoint after the trials finish, on the driver, one checkpoint at a
time, with the same ``ptm_ray.inference.predict`` a Serve replica runs, so the leaderboard can rank by score
under a latency or size budget (``search.max_latency_ms``, ``search.max_params``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["ServingCost", "measure"]


@dataclass
class ServingCost:
    latency_ms_p50: float
    params: int


def measure(checkpoint: str, sample: Any, repeats: int = 15) -> ServingCost:
    """Load ``checkpoint`` (CPU) and time ``repeats`` single-input predictions of ``sample`` after two warm-ups."""
    import torch

    from ptm_ray.checkpoint import load_artifact
    from ptm_ray.inference import predict

    artifact = load_artifact(checkpoint)
    params = sum(p.numel() for p in artifact.model.parameters())
    with torch.inference_mode():
        for _ in range(2):
            predict(artifact, [sample])
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            predict(artifact, [sample])
            seconds.append(time.perf_counter() - started)
    return ServingCost(round(statistics.median(seconds) * 1000, 2), params)
