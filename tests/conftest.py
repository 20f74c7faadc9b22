"""Shared fixtures: one local Ray on loopback for the whole session, tiny real models on disk."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")  # 2 busy cores start workers slowly
# `ray job submit -- python ...` runs `python` from the cluster's PATH: make it this interpreter, as an
# activated venv would, even when pytest was started as .venv/bin/python without activating it.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

import pytest

from ptm_ray.datasets import bundled_path
from ptm_ray.tiny import TEXT_FAMILIES, make_tiny_text_model

TRAIN_CSV = str(bundled_path("support_intents_train.csv"))
VAL_CSV = str(bundled_path("support_intents_val.csv"))


_RAY_DEFAULT_PORTS = {6379, 8000, 8265, 10001, 52365, 52366}  # Ray binds these itself

ESPEAK_MISSING = ("espeak-ng is not installed: it synthesises the speech test data. Install the Debian package "
                  "espeak-ng (`sudo apt-get install espeak-ng`; `make setup` does it when run as root)")


def require_espeak() -> None:
    """Skip the calling test (or fixture's tests) when espeak-ng is missing, saying so."""
    if shutil.which("espeak-ng") is None:
        pytest.skip(ESPEAK_MISSING)


def free_port() -> int:
    """A free loopback port that none of Ray's own components will also ask for."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _RAY_DEFAULT_PORTS:
            return port


def png_header(width: int, height: int) -> bytes:
    """A valid PNG of a few dozen bytes that declares ``width`` x ``height`` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster: 2 CPUs, node IP and dashboard on 127.0.0.1. Yields the dashboard URL."""
    import ray

    from ptm_ray.runtime import start_local_ray

    port = free_port()
    start_local_ray(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
    yield f"http://127.0.0.1:{port}"
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 (moto's server mode) with the bucket ``ptm-ray``. Yields the
    standard AWS variables that point a client at it: all ptm_ray and Ray are ever told about it."""
    import subprocess
    import time

    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "ptm-ray-test",
           "AWS_SECRET_ACCESS_KEY": "ptm-ray-test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}  # never wait for an instance-metadata endpoint
    try:
        for _ in range(150):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert server.poll() is None, f"the S3 server exited: {log.read_text()[-2000:]}"
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                     region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket="ptm-ray")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def support_texts() -> list[str]:
    with open(TRAIN_CSV) as f:
        return [row["text"] for row in csv.DictReader(f)]


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory, support_texts) -> dict[str, str]:
    """family -> local folder of a tiny randomly initialised model + tokenizer (BERT, RoBERTa, GPT-2, T5)."""
    root = tmp_path_factory.mktemp("tiny_text")
    return {family: str(make_tiny_text_model(family, root / family, support_texts)) for family in TEXT_FAMILIES}


def tiny_overrides(model_dir: str, tmp_path, name: str, **extra: object) -> list[str]:
    """Config overrides for a fast, learnable two-worker run of a tiny model on the bundled intents."""
    values: dict[str, object] = {
        "model.name": f"hf:{model_dir}",
        "model.max_length": 32,
        "data.train": TRAIN_CSV,
        "data.validation": "null",  # a seeded split of the training file: same phrasings, learnable from scratch
        "data.val_fraction": 0.3,
        "optim.lr": 1e-3,
        "optim.scheduler": "constant",
        "optim.warmup_ratio": 0.0,
        "train.epochs": 8,
        "train.batch_size": 4,
        "scaling.num_workers": 2,
        "scaling.resources_per_worker": "{CPU: 1}",
        "storage.path": str(tmp_path / "runs"),
        "storage.name": name,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    """scikit-learn's real handwritten digits as an image folder (32x32 grey PNG, 10 classes)."""
    from ptm_ray.datasets.digits import make_digits_folder

    return str(make_digits_folder(tmp_path_factory.mktemp("digits"), size=32))


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory) -> str:
    """Ten spoken commands synthesised with espeak-ng (several voices, speeds, pitches) as wav files."""
    from ptm_ray.datasets.speech_commands import make_speech_commands

    require_espeak()
    return str(make_speech_commands(tmp_path_factory.mktemp("speech")))


@pytest.fixture(scope="session")
def tiny_audio(tmp_path_factory) -> dict[str, str]:
    """family -> local folder of a tiny wav2vec 2.0 / HuBERT; 'deepspeech' -> a tiny DeepSpeech state dict file."""
    from ptm_ray.tiny import AUDIO_FAMILIES, make_tiny_audio_model, make_tiny_deepspeech

    root = tmp_path_factory.mktemp("tiny_audio")
    paths = {family: str(make_tiny_audio_model(family, root / family)) for family in AUDIO_FAMILIES}
    paths["deepspeech"] = str(make_tiny_deepspeech(root / "deepspeech.safetensors"))
    return paths


def check_classification_predictions(artifact, inputs: list, predictions: list[dict], top_k: int = 3) -> None:
    """Each prediction is its input's most probable label with that probability, and its top-k the k most probable
    labels in order, against the artifact's full probability rows, which sum to 1 over every label. (A label drawn
    from the label list but not the argmax, say after a label-order mix-up, passed `label in artifact.labels`.)"""
    import torch

    from ptm_ray.tasks import task_for

    probs = torch.tensor(task_for(artifact.task_name).outputs(artifact, inputs))
    assert probs.shape == (len(inputs), len(artifact.labels))
    assert torch.allclose(probs.sum(-1), torch.ones(len(inputs)), atol=1e-5)
    assert len(predictions) == len(inputs)
    for row, p in zip(probs, predictions):
        ranked = row.argsort(descending=True)[:top_k].tolist()
        assert p["label"] == artifact.labels[ranked[0]] and abs(p["probability"] - row.max().item()) < 1e-5
        assert [t["label"] for t in p["top_k"]] == [artifact.labels[i] for i in ranked]
        assert [t["probability"] for t in p["top_k"]] == sorted((t["probability"] for t in p["top_k"]), reverse=True)


class SteadyLoad:
    """One client posting ``{"inputs": ["refund"]}`` to ``url`` every 50 ms while the ``with`` block runs: the
    answers' bodies, and every failure (a status other than 200, or the exception's text)."""

    def __init__(self, url: str) -> None:
        import threading

        self.url, self.answers, self.failures = url, [], []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def __enter__(self) -> "SteadyLoad":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        import time

        import requests

        while not self.done.is_set():
            try:
                r = requests.post(self.url, json={"inputs": ["refund"]}, timeout=60)
                if r.status_code == 200:
                    self.answers.append(r.json())
                else:
                    self.failures.append(r.status_code)
            except requests.RequestException as e:
                self.failures.append(str(e))
            time.sleep(0.05)


def same_predictions(served: list[dict], offline: list[dict]) -> None:
    """Served classification predictions equal offline ones: labels, probabilities (1e-5) and top-k order."""
    assert [p["label"] for p in served] == [p["label"] for p in offline]
    for s, o in zip(served, offline):
        assert s["probability"] == pytest.approx(o["probability"], abs=1e-5)
        assert [t["label"] for t in s["top_k"]] == [t["label"] for t in o["top_k"]]
