"""Connecting to Ray: the cluster a job was submitted to, or a local one on loopback."""

from __future__ import annotations

import os

__all__ = ["init_ray"]


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to Ray once per process.

    Under ``ray job submit`` (or with ``RAY_ADDRESS`` set) this joins that cluster. Otherwise it starts a
    local Ray bound to 127.0.0.1 with the dashboard on 127.0.0.1:8265, so nothing listens on other
    interfaces. Keeping the dashboard on matters: Tune's placement-group cleanup relies on it.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # the dashboard's Train view
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
    )
