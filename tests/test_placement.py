"""Where a loaded checkpoint runs: the device decision, inputs moved to the model's device, autocast (on CPU here)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from ptm_ray.checkpoint import load_artifact, save_checkpoint, to_device
from ptm_ray.config import load_config
from ptm_ray.inference import predict, serving_device
from ptm_ray.models import resolve_model


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    cfg = load_config(None, ["data.train=unused", "model.name=timm:test_resnet", "model.weights=none",
                             "data.image_size=32"])
    family, ref = resolve_model(cfg.model)
    model = family.build(ref, ["a", "b"], cfg.model, "classifier").eval()
    path = tmp_path_factory.mktemp("placement") / "ckpt"
    save_checkpoint(path, family=family, model=model, preprocessor=family.preprocessor(ref, model, cfg), cfg=cfg,
                    labels=["a", "b"], metrics={"epoch": 1}, history=[])
    return str(path)


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


def test_a_replica_uses_cuda_only_when_ray_gave_it_a_gpu_torch_can_use():
    assert serving_device([]) == "cpu"  # serve.num_gpus = 0: Ray assigns no GPU ids
    assert serving_device(["0"]) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_inputs_follow_the_model_to_its_device(digits):
    artifact = load_artifact(digits)  # default: CPU
    assert artifact.device == torch.device("cpu")
    assert {p.device.type for p in artifact.model.parameters()} == {"cpu"}
    here = [t for t in artifact.batch([_png()]).values() if torch.is_tensor(t)]
    assert here and all(t.device.type == "cpu" for t in here)
    # bug guarded: preprocessed inputs left on the CPU while the model sits on the GPU; "meta" stands in for it here
    artifact.device = torch.device("meta")
    moved = artifact.batch([_png()])
    assert [t.device.type for t in moved.values() if torch.is_tensor(t)] and all(
        t.device.type == "meta" for t in moved.values() if torch.is_tensor(t))


def test_to_device_moves_tensors_in_mappings_and_lists_and_leaves_the_rest():
    from transformers import BatchEncoding

    batch = BatchEncoding({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    moved = to_device({"enc": batch, "images": [torch.zeros(3)], "sizes": [(30, 40)], "n": 2}, torch.device("meta"))
    assert moved["enc"]["input_ids"].device.type == "meta" and moved["images"][0].device.type == "meta"
    assert moved["sizes"] == [(30, 40)] and moved["n"] == 2


def test_autocast_stays_off_on_cpu_and_predictions_run(digits):
    artifact = load_artifact(digits, device="cpu")
    with artifact.autocast():
        assert not torch.is_autocast_enabled("cpu")  # bf16 only on a GPU that supports it
    (prediction,) = predict(artifact, [_png()], top_k=2)
    assert prediction["label"] in ("a", "b") and len(prediction["top_k"]) == 2
