"""R1 on a real multi-node cluster with object storage: a Train worker killed mid-run, the run resumed from S3.

    .venv/bin/python bench/cluster_kill.py [--epochs 6]

Starts a local S3-compatible server (moto's server mode, 127.0.0.1) and a local multi-node Ray cluster
(``cluster/local.sh``: a head with no CPUs and two one-CPU worker nodes, token auth on), whose processes get only
the standard AWS variables, as pods get them from a Secret. It then submits the same two-worker fine-tune of a
tiny BERT on the bundled intents twice with ``ray job submit``, every checkpoint on ``s3://``: once undisturbed,
once with a Train worker process SIGKILLed as soon as the run's first checkpoint is on the bucket
(``scaling.max_failures=2``). The second must finish every epoch, resumed from that checkpoint, with a best
score within 1 point of the first. Not part of the test suite (it takes minutes); ``tests/test_multinode.py``
runs the search/promote/deploy sequence on the same kind of cluster and bucket.

The last line: ``cluster_kill: finished=<bool> resumed_from=<epoch> best_delta_pts=<float> ok=<bool>``.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
BUCKET = "ptm-ray-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(log: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with the bucket ``BUCKET``, and the AWS variables that point at it."""
    import boto3

    port = _free_port()
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.2)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench", aws_secret_access_key="bench",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return server, env


def _submit(address: str, env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess:
    for _ in range(6):  # a just-started head may not have its job agent yet
        proc = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                               "python", *args], cwd=ROOT, env=dict(env, RAY_AUTH_MODE="token"), capture_output=True,
                              text=True, timeout=1800)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(5)
    return proc


def _checkpoint_on_bucket(prefix: str) -> bool:
    return bool(_checkpoints(prefix))


def _checkpoints(prefix: str) -> list[str]:
    """Names of the checkpoint folders of a run on the bucket, oldest first."""
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(prefix)
    found = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    return sorted(i.base_name for i in found if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def _train_workers_of(gcs_port: str) -> list[int]:
    """Pids of Ray Train worker processes of this benchmark's cluster (their environment names its GCS)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline.startswith(b"ray::RayTrainWorker") and f"RAY_ADDRESS=127.0.0.1:{gcs_port}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def _kill_after_first_checkpoint(prefix: str, gcs_port: str, killed: list[tuple[int, float]]) -> None:
    deadline = time.time() + 900
    while time.time() < deadline and not _checkpoint_on_bucket(prefix):
        time.sleep(0.5)
    workers = _train_workers_of(gcs_port)
    if workers:
        os.kill(workers[0], signal.SIGKILL)  # a process of the cluster this script started
        killed.append((workers[0], time.time()))


def _best(out: str) -> dict:
    """The job's best checkpoint (from its last lines) read back from the bucket."""
    from ptm_ray.checkpoint import read_meta

    line = next(line for line in reversed(out.splitlines()) if line.startswith("best checkpoint:"))
    return read_meta(line.split(":", 1)[1].strip())


def _latest(prefix: str) -> dict:
    """The run's latest checkpoint on the bucket (its history holds every epoch)."""
    from ptm_ray.checkpoint import read_meta

    return read_meta(f"{prefix}/{_checkpoints(prefix)[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    from ptm_ray.datasets import bundled_path
    from ptm_ray.tiny import make_tiny_text_model

    tmp = Path(tempfile.mkdtemp(prefix="ptmk", dir="/tmp"))  # short: Ray's socket paths under it must fit
    server, aws = start_s3(tmp / "moto.log")
    os.environ.update(aws)  # this process reads the bucket too
    train_csv = bundled_path("support_intents_train.csv")
    with open(train_csv) as f:
        model = make_tiny_text_model("bert", tmp / "bert", [row["text"] for row in csv.DictReader(f)])
    gcs_port = str(_free_port())
    state = tmp / "c"
    env = dict(os.environ, PTM_RAY_CLUSTER_DIR=str(state), PTM_RAY_GCS_PORT=gcs_port,
               PTM_RAY_DASHBOARD_PORT=str(_free_port()), RAY=RAY,
               PTM_RAY_PORT_BASE=str(_free_port() // 1000 * 1000 if _free_port() < 60000 else 41000))
    env.pop("RAY_ADDRESS", None)
    address = f"http://127.0.0.1:{env['PTM_RAY_DASHBOARD_PORT']}"
    script = str(ROOT / "cluster" / "local.sh")
    runs = f"s3://{BUCKET}/cluster-kill/runs"

    def job(name: str, *extra: str) -> list[str]:
        return ["jobs/finetune.py", "--config", "jobs/configs/text_quickstart.yaml", f"model.name=hf:{model}",
                "model.max_length=32", "model.freeze_depth=0", f"data.train={train_csv}", "data.validation=null",
                "data.val_fraction=0.3", "optim.lr=1e-3", "optim.head_lr=null", "optim.layer_decay=1.0",
                "optim.scheduler=constant", "optim.warmup_ratio=0", "train.early_stopping_patience=0",
                f"train.epochs={args.epochs}",
                "train.batch_size=4", "train.seed=0", "scaling.num_workers=2", "scaling.resources_per_worker={CPU: 1}",
                f"storage.path={runs}", f"storage.name={name}", *extra]

    try:
        t0 = time.time()
        started = subprocess.run([script, "start", "2", "1"], env=env, capture_output=True, text=True, timeout=300)
        if started.returncode != 0:
            sys.exit(f"cluster start failed:\n{started.stdout}{started.stderr}")
        print(f"cluster: head + 2 one-CPU worker nodes, started in {time.time() - t0:.1f} s; storage {runs}")
        t0 = time.time()
        calm = _submit(address, env, job("calm"))
        calm_s = time.time() - t0
        if calm.returncode != 0:
            sys.exit(f"the undisturbed job failed:\n{(calm.stdout + calm.stderr)[-3000:]}")
        killed: list[tuple[int, float]] = []
        killer = threading.Thread(target=_kill_after_first_checkpoint, args=(f"{runs}/killed", gcs_port, killed))
        t0 = time.time()
        killer.start()
        hit = _submit(address, env, job("killed", "scaling.max_failures=2"))
        hit_s = time.time() - t0
        killer.join()
        out = hit.stdout + hit.stderr
        if hit.returncode != 0:
            print(out[-3000:])
        calm_meta = _best(calm.stdout + calm.stderr)
        hit_meta = _best(out) if hit.returncode == 0 else {"metrics": {"val_accuracy": float("nan")}, "history": []}
        last = _latest(f"{runs}/killed")["history"] if hit.returncode == 0 else []
        epochs = [h["epoch"] for h in last]
        resumed = max((h.get("resumed_from_epoch", 0) for h in last), default=0)
        calm_best, hit_best = calm_meta["metrics"]["val_accuracy"], hit_meta["metrics"]["val_accuracy"]
        print(f"undisturbed: {calm_s:.0f} s, best val_accuracy {calm_best:.4f} (epoch {calm_meta['metrics']['epoch']})")
        when = f"{killed[0][1] - t0:.0f} s into the job" if killed else "never (no worker found)"
        print(f"killed: worker pid {[pid for pid, _ in killed]} SIGKILLed {when}; job exit {hit.returncode} after "
              f"{hit_s:.0f} s; epochs in the last checkpoint's history {epochs}, resumed from epoch {resumed}; "
              f"best val_accuracy {hit_best:.4f}")
        finished = hit.returncode == 0 and bool(killed) and epochs == list(range(1, args.epochs + 1))
        delta = (hit_best - calm_best) * 100
        ok = finished and resumed >= 1 and abs(delta) <= 1.0
        print(f"cluster_kill: finished={finished} resumed_from={resumed} best_delta_pts={delta:+.2f} ok={ok}")
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=120)
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
