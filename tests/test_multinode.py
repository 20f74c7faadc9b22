"""A real local multi-node cluster (cluster/local.sh): `ray job submit` runs the fine-tuning job unchanged,
its two data-parallel workers on two different nodes; a bad config fails the job with the error in its logs;
a search, its registry and the deployment from it live on object storage (a real S3-compatible server)."""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port, tiny_overrides
from ptm_ray.checkpoint import load_artifact
from ptm_ray.inference import predict

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
API_KEY_ENV = "PTM_RAY_TEST_API_KEY"


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory, s3_server):
    """Head (0 CPUs) + 2 worker nodes (1 CPU each) on 127.0.0.1, started and stopped by cluster/local.sh."""
    state = Path(tempfile.mkdtemp(prefix="ptmc", dir="/tmp"))  # short: Ray's unix socket paths must fit 107 bytes
    base = _free_port_base(nodes=3)
    # every node's processes get the API key and the object store's AWS variables in their environment, as pods
    # do from Kubernetes Secrets
    env = dict(os.environ, PTM_RAY_CLUSTER_DIR=str(state), PTM_RAY_GCS_PORT=str(free_port()),
               PTM_RAY_DASHBOARD_PORT=str(free_port()), PTM_RAY_PORT_BASE=str(base), RAY=RAY,
               **s3_server, **{API_KEY_ENV: secrets.token_urlsafe(24)})
    env.pop("RAY_ADDRESS", None)
    script = str(ROOT / "cluster" / "local.sh")
    try:
        t0 = time.time()
        started = subprocess.run([script, "start", "2", "1"], env=env, capture_output=True, text=True, timeout=300)
        logs = "".join(f"\n--- {log.name}:\n{log.read_text()[-2000:]}" for log in sorted(state.glob("*.log")))
        assert started.returncode == 0, started.stdout + started.stderr + logs
        print(f"local cluster start: {time.time() - t0:.1f} s")
        yield f"http://127.0.0.1:{env['PTM_RAY_DASHBOARD_PORT']}", env, started.stdout
    finally:  # stop also after a failed start: never leave our processes behind
        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr


def _free_port_base(nodes: int) -> int:
    """A base for cluster/local.sh's agent ports (node i takes base+i, base+100+i, base+200+i), every one of them
    free now, below the kernel's ephemeral range (32768 up), where no process gets a port without asking for it
    by number: a base taken from a free ephemeral port (rounded down to the thousand) once found the head's
    agent port held, and every job submit failed with "No available agent"."""
    rng = random.Random()
    while True:
        base = rng.randrange(20, 32) * 1000  # above Ray's worker ports (10002-19999)
        ports = [base + offset + i for offset in (0, 100, 200) for i in range(nodes)]
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("", port))  # every address: the agents bind the node's own address, not loopback only
            return base
        except OSError:
            continue


def _submit(address: str, env: dict, args: list[str]) -> subprocess.CompletedProcess:
    for _ in range(6):  # a just-started head may not have its job agent yet: Ray answers "try again"
        proc = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                               "python", *args], cwd=ROOT, env=dict(env, RAY_AUTH_MODE="token"), capture_output=True,
                              text=True, timeout=900)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(5)
    return proc


def test_submitted_job_trains_on_both_worker_nodes(local_cluster, tiny_text, tmp_path):
    address, env, started = local_cluster
    assert "head + 2 workers" in started
    overrides = tiny_overrides(tiny_text["bert"], tmp_path, "multinode", train__epochs=2)
    t0 = time.time()
    # --verbose: the workers' own "rank N on node X" lines reach the job's log only in verbose mode
    proc = _submit(address, env, ["jobs/finetune.py", "--verbose", "--config", "jobs/configs/text_quickstart.yaml",
                                  *overrides])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "best checkpoint:" in out
    nodes = set(re.findall(r"rank \d on node ([0-9a-f]{8})", out))
    assert len(nodes) == 2, f"training workers ran on {nodes}"  # the head has no CPUs: one worker per node
    # warned: a local path on a multi-node cluster (head + 2 workers). The echoed command holds "storage.path"
    # whether or not a warning was printed, so the check is on the warning's own words.
    assert (f"warning: storage.path={tmp_path / 'runs'} is a local path but the cluster has 3 nodes: checkpoints "
            "written on one node are not visible on the others") in out
    print(f"job submit to finish: {time.time() - t0:.1f} s")


def test_a_bad_config_fails_the_job_with_the_error_in_its_logs(local_cluster):
    address, env, _ = local_cluster
    proc = _submit(address, env, ["jobs/finetune.py", "--config", "jobs/configs/text_quickstart.yaml",
                                  "scaling.num_workers=0"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "scaling.num_workers=0 must be >= 1" in out
    assert "failed" in out.lower()  # the job status, as `ray job submit` reports it


def test_search_then_deploy_on_object_storage_serve_predictions_over_http(local_cluster, tiny_text, tmp_path,
                                                                          s3_server, monkeypatch):
    """The README's cluster sequence after fine-tuning, as submitted jobs with every file on S3: search (trial
    checkpoints on s3://, promotion to an s3:// registry), deploy from that registry, predict over HTTP."""
    import pyarrow.fs

    from ptm_ray.model_store import ModelStore

    address, env, _ = local_cluster
    for key, value in s3_server.items():  # this process reads the bucket too
        monkeypatch.setenv(key, value)
    prefix, port = f"s3://ptm-ray/{tmp_path.name}", free_port()
    registry = f"{prefix}/registry"
    space = "search.space={model.freeze_depth: {grid: [0, 1]}, optim.lr: {loguniform: [1.0e-3, 3.0e-3]}}"
    base = tiny_overrides(tiny_text["bert"], tmp_path, "unused", train__epochs=2, scaling__num_workers=1,
                          storage__path=f"{prefix}/runs")
    proc = _submit(address, env, ["jobs/search.py", "--config", "jobs/configs/text_search.yaml", *base, space,
                                  "search.num_samples=1", "search.name=submitted", f"search.registry={registry}",
                                  "search.registry_name=intents", "search.grace_period=2"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "promoted to the model registry:" in out
    promoted = ModelStore(registry).get("intents")
    assert promoted.version == 1 and promoted.path == f"{registry}/intents/v1"
    # the winner was a trial checkpoint on the bucket, named by its URI (Ray reports it without the scheme)
    source = promoted.lineage["source_checkpoint"]
    assert source.startswith(f"{prefix}/runs/submitted/")
    s3, inner = pyarrow.fs.FileSystem.from_uri(source)
    assert s3.get_file_info(f"{inner}/ptm_ray.json").type == pyarrow.fs.FileType.File
    # the frozen-embeddings trial kept its feature cache on the bucket, committed (meta.json)
    caches = s3.get_file_info(pyarrow.fs.FileSelector(f"ptm-ray/{tmp_path.name}/runs/submitted/trials/feature_cache"))
    assert [c.type for c in caches] == [pyarrow.fs.FileType.Directory]
    assert s3.get_file_info(f"{caches[0].path}/meta.json").type == pyarrow.fs.FileType.File
    assert not (tmp_path / "runs").exists()  # nothing went to a local folder instead

    try:
        _deploy_and_predict(address, env, registry, port, tmp_path)
    finally:  # the app would keep CPUs of this 2-CPU cluster: a training job run after it could never start
        stopped = subprocess.run([str(Path(sys.executable).parent / "serve"), "shutdown", "--address", address, "--yes"],
                                 env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def _deploy_and_predict(address: str, env: dict, registry: str, port: int, tmp_path: Path) -> None:
    import requests

    proc = _submit(address, env, ["jobs/deploy.py", "--config", "jobs/configs/serve.yaml", f"serve.registry={registry}",
                                  "serve.models=[{name: intents}]", f"serve.port={port}", "serve.proxy_location=HeadOnly",
                                  "serve.num_cpus=0.25", "serve.min_replicas=1", "serve.ingress_replicas=1",
                                  f"serve.api_key_env={API_KEY_ENV}", f"serve.config_out={tmp_path / 'serve_config.yaml'}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    key = env[API_KEY_ENV]
    # the key reached the ingress through its own environment: the config (and the file written from it) names
    # only the variable, never the key
    assert API_KEY_ENV in (tmp_path / "serve_config.yaml").read_text()
    assert key not in (tmp_path / "serve_config.yaml").read_text() and key not in out
    # the job has ended; the application lives on in the cluster
    url = f"http://127.0.0.1:{port}/v1/models/intents/predict"
    for headers in ({}, {"Authorization": f"Bearer {key[:-1]}"}):
        refused = requests.post(url, json={"inputs": ["where is my parcel"]}, headers=headers, timeout=60)
        assert refused.status_code == 401 and "API key" in refused.json()["error"], refused.text
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200  # liveness needs no key
    auth = {"Authorization": f"Bearer {key}"}
    answer = requests.post(url, json={"inputs": ["where is my parcel"]}, headers=auth, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "intents" and body["version"] == 1
    described = requests.get(f"http://127.0.0.1:{port}/v1/models/intents", headers=auth, timeout=30).json()
    assert described["versions"][0]["labels"] == load_artifact(f"{registry}/intents/v1").labels
    # the prediction made on the cluster is the promoted checkpoint's own, made here offline (a label merely in
    # the label list passed before)
    offline = predict(load_artifact(f"{registry}/intents/v1"), ["where is my parcel"])[0]
    assert body["predictions"][0]["label"] == offline["label"]
    assert body["predictions"][0]["probability"] == pytest.approx(offline["probability"], abs=1e-4)
