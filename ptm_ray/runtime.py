"""Connecting to Ray: the cluster a job was submitted to, or a local one on loopback."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

__all__ = ["init_ray", "start_local_ray"]

_STARTED_HERE: set[str] = set()  # addresses of local clusters this process started


def start_local_ray(**kwargs: Any) -> str:
    """Start a Ray on 127.0.0.1 for this process and return its GCS address.

    The GCS port is chosen here and ``RAY_ADDRESS`` exported before Ray starts, so every Ray process
    inherits it: lookups that go through the State API without an address (Ray Train's
    placement-group cleaner, for one) then find this cluster even when another Ray runs on the same
    machine. Without it they refuse to choose, and a search whose trials ASHA stopped kept their CPUs.
    Ray Train's preemption watcher is off on it unless ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` says otherwise.
    """
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    # Ray Train's preemption watcher (an actor each run, polling whether the autoscaler drains a node) has no
    # work on a one-node Ray on this machine: not starting it saved 1-2 s of every two-worker fit here
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = address
    # Ray keeps idle worker processes up to one per CPU and kills the others after 1 s idle. With Train workers
    # holding the CPUs, every epoch's Ray Data tasks then started a Python process and imported their modules
    # again (about 2 s per pipeline here). Keeping twice as many as CPUs (at least 8) for a minute cut
    # test_preprocess and test_data_stream from 256 to 229 s; a setting of the user's own wins.
    raylet = {"RAY_num_workers_soft_limit": str(max(8, 2 * (kwargs.get("num_cpus") or os.cpu_count() or 1))),
              "RAY_idle_worker_killing_time_threshold_ms": "60000"}
    raylet = {k: v for k, v in raylet.items() if k not in os.environ}
    os.environ.update(raylet)
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
    finally:
        for key in ("RAY_GCS_SERVER_PORT", *raylet):
            os.environ.pop(key, None)
    _STARTED_HERE.add(address)
    return address


def init_ray(num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Connect to Ray once per process.

    Under ``ray job submit`` (or with ``RAY_ADDRESS`` set) this joins that cluster. Otherwise it starts a
    local Ray bound to 127.0.0.1 with the dashboard on 127.0.0.1:8265, so nothing listens on other
    interfaces. Keeping the dashboard on matters: Tune's placement-group cleanup relies on it; short
    commands that only read data (``ptm-ray evaluate``) start without it (``dashboard=False``). The workers'
    output reaches this process's console only in verbose mode (``ptm_ray.console``).
    """
    import ray

    from ptm_ray.console import logs_dir, quiet_driver, ray_init_options

    quiet_driver()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # the dashboard's Train view
    address = os.environ.get("RAY_ADDRESS")
    if address and address not in _STARTED_HERE:
        ray.init(address=address, **ray_init_options())
        where = f"joined the Ray cluster at {address}"
    elif dashboard:
        start_local_ray(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **ray_init_options())
        where = "started a local Ray on 127.0.0.1"
    else:
        start_local_ray(num_cpus=num_cpus, include_dashboard=False, **ray_init_options())
        where = "started a local Ray on 127.0.0.1 (no dashboard)"
    url = ray._private.worker.get_dashboard_url()  # no public accessor
    dashboard_text = f"dashboard http://{url}; " if url else ""
    # stderr: a status line, kept out of output another program reads (``ptm-ray evaluate --json``)
    print(f"[ptm_ray] {where}; {dashboard_text}full logs in {logs_dir()}", file=sys.stderr, flush=True)
