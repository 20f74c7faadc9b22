"""Object detection end to end on the project's shapes set: Faster R-CNN (three backbones) and YOLO build and
freeze exactly the configured blocks; a pretrained-backbone Faster R-CNN trains data-parallel with mAP rising,
resumes, is ranked against YOLO by a search on val_map, and is served with the same boxes as offline."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import requests
import torch

from ptm_ray.checkpoint import load_artifact, read_meta
from ptm_ray.config import load_config
from ptm_ray.inference import predict
from ptm_ray.freeze import block_of_parameters, freeze
from ptm_ray.model_store import ModelStore
from ptm_ray.models import resolve_model
from ptm_ray.tasks import task_for
from ptm_ray.train import fit, plan_run
from ptm_ray.tune import run_search

from conftest import free_port

LITE0 = "torchvision:fasterrcnn_efficientnet_lite0_fpn"
DETECTORS = ["torchvision:fasterrcnn_mobilenet_v3_large_fpn", "torchvision:fasterrcnn_resnet50_fpn", LITE0, "yolo:n"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    from ptm_ray.datasets.shapes import make_shapes

    paths = make_shapes(tmp_path_factory.mktemp("shapes"), num_train=64, num_val=24, image_size=128, seed=0)
    coco = json.loads(Path(paths["val"]).read_text())  # a 12-image validation set keeps search trials short
    keep = {im["id"] for im in coco["images"][:12]}
    small = {**coco, "images": coco["images"][:12], "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}
    paths["val_small"] = Path(paths["root"]) / "val_small.json"
    paths["val_small"].write_text(json.dumps(small))
    return paths


def _overrides(shapes, tmp_path: Path, name: str, **values: object) -> list[str]:
    base: dict[str, object] = {
        "model.name": LITE0, "model.task": "detection", "model.freeze_depth": 5, "data.format": "coco",
        "data.train": str(shapes["train"]), "data.validation": str(shapes["val"]), "data.image_size": 128,
        "data.augment": "light", "data.hflip": 0.5, "optim.lr": 1e-3, "optim.scheduler": "constant",
        "optim.warmup_ratio": 0.0, "train.batch_size": 4, "train.epochs": 3, "train.shuffle_buffer": 64,
        "scaling.num_workers": 2, "scaling.resources_per_worker": "{CPU: 1}", "storage.path": str(tmp_path / "runs"),
        "storage.name": name}
    base.update({k.replace("__", "."): v for k, v in values.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.parametrize("name", DETECTORS)
def test_detectors_build_and_freeze_exactly_the_configured_blocks(name):
    weights = "" if name in (LITE0, "yolo:n") else "none"  # the torchvision hub is offline
    cfg = load_config(None, [f"model.name={name}", "model.task=detection", f"model.weights={weights}", "data.train=x"])
    family, ref = resolve_model(cfg.model)
    assert family.heads == ("detector",) and family.modality == "image"
    with torch.device("meta"):
        model = family.build(ref, ["circle", "square", "triangle"], cfg.model, "detector", pretrained=False)
    blocks = family.blocks(model)
    names = [b.name for b in blocks]
    if name.startswith("torchvision:"):  # backbone stages from the input, then FPN, RPN and the ROI box head
        assert names[-3:] == ["fpn", "rpn", "roi_box_head"] and all(n.startswith("backbone.") for n in names[:-3])
        assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    else:
        assert names == ["stem", "stage1", "stage2", "stage3", "stage4", "neck", "head_shared"]
    owner = block_of_parameters(model, blocks)
    head = {n.rsplit(".", 1)[0] for n, i in owner.items() if i < 0}
    assert head and all(h.startswith(family.head_prefixes) for h in head)  # only the class predictor is the head
    for depth in (0, 2, len(blocks)):
        freeze(model, blocks, depth)
        for param_name, param in model.named_parameters():
            assert param.requires_grad == (not 0 <= owner[param_name] < depth), (depth, param_name)


def test_lite0_backbone_has_the_imagenet_weights_and_weights_files_load_with_a_new_head(tmp_path):
    from safetensors.torch import load_file, save_file

    from ptm_ray.models.vision import converted_efficientnet_lite0

    cfg = load_config(None, [f"model.name={LITE0}", "model.task=detection", "data.train=x"])
    family, ref = resolve_model(cfg.model)
    model = family.build(ref, ["a", "b", "c", "d", "e"], cfg.model, "detector")
    imagenet = load_file(converted_efficientnet_lite0())
    assert torch.equal(model.backbone.body.conv_stem.weight, imagenet["conv_stem.weight"])
    assert type(model.backbone.body.bn1).__name__.startswith("Frozen")  # pretrained BatchNorm frozen, as torchvision
    file = tmp_path / "detector.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, file)
    three = load_config(None, [f"model.name={LITE0}", "model.task=detection", f"model.weights={file}", "data.train=x"])
    family, ref = resolve_model(three.model)
    reloaded = family.build(ref, ["a", "b", "c"], three.model, "detector")  # other classes: only the predictor is fresh
    assert torch.equal(reloaded.rpn.head.conv[0][0].weight, model.rpn.head.conv[0][0].weight)
    assert reloaded.roi_heads.box_predictor.cls_score.out_features == 4
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    coco = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=91)  # torchvision's layout
    torch.save({k: v for k, v in coco.state_dict().items() if not k.endswith("num_batches_tracked")}, tmp_path / "coco.pth")
    mobilenet = load_config(None, ["model.name=torchvision:fasterrcnn_mobilenet_v3_large_fpn", "model.task=detection",
                                   f"model.weights={tmp_path / 'coco.pth'}", "data.train=x"])
    family, ref = resolve_model(mobilenet.model)
    loaded = family.build(ref, ["a", "b"], mobilenet.model, "detector")
    assert torch.equal(loaded.rpn.head.conv[0][0].weight, coco.rpn.head.conv[0][0].weight)
    assert loaded.roi_heads.box_predictor.cls_score.out_features == 3
    other = tmp_path / "yolo.safetensors"
    yolo_cfg = load_config(None, ["model.name=yolo:n", "model.task=detection", "model.weights=none", "data.train=x"])
    yolo_family, yolo_ref = resolve_model(yolo_cfg.model)
    save_file(yolo_family.build(yolo_ref, ["a"], yolo_cfg.model, "detector").state_dict(), other)
    wrong = load_config(None, [f"model.name={LITE0}", "model.task=detection", f"model.weights={other}", "data.train=x"])
    family, ref = resolve_model(wrong.model)
    with pytest.raises(ValueError, match=f"model.weights={other} does not fit this detector"):
        family.build(ref, ["a"], wrong.model, "detector")


def test_bad_boxes_fail_naming_the_record_or_are_skipped_and_counted(shapes, tmp_path):
    coco = json.loads(Path(shapes["train"]).read_text())
    coco["annotations"][0]["bbox"] = [10, 10, -5, 8]  # non-positive width
    coco["annotations"][1]["category_id"] = 99  # unknown category
    bad = Path(shapes["root"]) / "bad_train.json"
    bad.write_text(json.dumps(coco))
    cfg = load_config(None, _overrides(shapes, tmp_path, "x", data__train=str(bad), data__on_bad_file="fail"))
    with pytest.raises(ValueError, match="data.train: bad_train.json annotation 1 .*non-positive width"):
        plan_run(cfg)
    skip = load_config(None, _overrides(shapes, tmp_path, "x", data__train=str(bad), data__on_bad_file="skip"))
    plan = plan_run(skip)
    assert plan.labels == ["circle", "square", "triangle"]
    assert len(plan.data.skipped["data.train"]) == (2 if coco["annotations"][1]["image_id"] != 1 else 1)
    assert plan.data.num_train_rows == 64 - len(plan.data.skipped["data.train"])
    not_detector = load_config(None, _overrides(shapes, tmp_path, "x", model__name="timm:resnet18"))
    with pytest.raises(ValueError, match="model.task=detection is not available for model.name=timm:resnet18"):
        plan_run(not_detector)


def test_yolo_layout_is_read_and_boxes_map_back_to_original_pixels(tmp_path):
    from PIL import Image

    from ptm_ray.datasets.shapes import make_shapes
    from ptm_ray.models.detection import DetectionPreprocessor

    root = make_shapes(tmp_path / "yolo", num_train=8, num_val=4, image_size=64, seed=1, fmt="yolo")["root"]
    cfg = load_config(None, ["model.name=yolo:n", "model.task=detection", f"data.train={root}", "data.image_size=64"])
    plan = plan_run(cfg)  # data.format=auto: a folder with data.yaml is the YOLO layout
    assert plan.labels == ["circle", "square", "triangle"] and (plan.data.num_train_rows, plan.data.num_val_rows) == (8, 4)
    image = Image.new("RGB", (200, 120))
    data = io.BytesIO()
    image.save(data, "PNG")
    boxes = torch.tensor([[10.0, 20.0, 110.0, 100.0]])
    for kind in ("letterbox", "resize"):
        batch = DetectionPreprocessor(kind, 64)([data.getvalue()], [{"boxes": boxes, "labels": torch.tensor([0])}])
        moved = batch["targets"][0]["boxes"]
        assert not torch.allclose(moved, boxes)  # boxes follow the pixels into the model's input ...
        back = DetectionPreprocessor.to_original(moved, batch["frames"][0])
        assert torch.allclose(back, boxes, atol=1e-3)  # ... and detections map back to the original image


def test_request_options_are_bounded_by_the_server():
    task = task_for("detection")
    assert task.request_options({}, {"max_boxes": 50}) == {"score_threshold": 0.25, "max_boxes": 50}
    assert task.request_options({"score_threshold": 0.5, "max_boxes": 3}, {"max_boxes": 50})["max_boxes"] == 3
    for parameters, field in [({"max_boxes": 51}, "max_boxes"), ({"score_threshold": 1.5}, "score_threshold"),
                              ({"iou": 0.5}, "iou")]:
        with pytest.raises(ValueError, match=field):
            task.request_options(parameters, {"max_boxes": 50})


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> ModelStore:
    return ModelStore(str(tmp_path_factory.mktemp("det_registry") / "registry"))


@pytest.fixture(scope="module")
def frcnn_run(ray_cluster, shapes, tmp_path_factory, registry):
    """The Faster R-CNN, trained and promoted once by whichever test needs it first (so serving does not depend
    on the training test having run before it)."""
    storage = tmp_path_factory.mktemp("frcnn")
    cfg = load_config(None, _overrides(shapes, storage, "lite0"))
    result = fit(cfg)
    registry.promote(result.best_checkpoint, "shapes-frcnn", {"test": "detection"})
    return storage, cfg, result


def test_faster_rcnn_trains_data_parallel_with_rising_map_and_resumes(frcnn_run, shapes):
    storage, cfg, result = frcnn_run
    assert (cfg.train.metric, cfg.train.mode) == ("val_map", "max")
    history = result.history
    maps = [h["val_map"] for h in history]
    assert len(history) == 3 and max(maps[1:]) > maps[0], maps
    assert {"val_map_50", "val_loss", "train_loss"} <= set(history[-1])
    assert history[-1]["frozen_blocks"] == 5 and history[-1]["trainable_params"] < history[-1]["total_params"]
    assert result.best_metrics["val_map"] == max(maps)
    # the same storage.name with one more epoch continues after the last checkpoint, here on one worker (a
    # resumed run may change its worker count)
    longer = fit(load_config(None, _overrides(shapes, storage, "lite0", train__epochs=4, scaling__num_workers=1)))
    assert [h["epoch"] for h in longer.history] == [1, 2, 3, 4]
    assert longer.history[-1]["resumed_from_epoch"] == 3
    assert read_meta(result.best_checkpoint)["task"] == "detection"


def test_yolo_trains_data_parallel_from_scratch_with_rising_map(ray_cluster, shapes, tmp_path):
    # no pretrained YOLO offline: from scratch, 2 workers x 8 updates per epoch; measured val_map 0.0 at
    # epoch 4, 0.055 at 12, 0.166 at 16, 0.47 at 40 (96 px letterbox)
    cfg = load_config(None, _overrides(shapes, tmp_path, "yolo", model__name="yolo:n", model__freeze_depth=0,
                                       data__image_size=96, optim__lr=2e-3, train__epochs=16))
    maps = [h["val_map"] for h in fit(cfg).history]
    assert len(maps) == 16 and max(maps[1:]) > maps[0], maps


def test_search_over_two_detectors_ranks_by_map(ray_cluster, shapes, tmp_path):
    overrides = _overrides(shapes, tmp_path, "unused", train__epochs=1, scaling__num_workers=1,
                           scaling__resources_per_worker="{CPU: 0.5}", train__max_steps_per_epoch=4,
                           data__validation=str(shapes["val_small"]))
    overrides += [f"search.space={{model.name: {{grid: [{LITE0}, yolo:n]}}}}", "search.name=detectors",
                  "search.trial_cpus=0.5", "search.max_concurrent_trials=1", f"search.registry={tmp_path / 'registry'}",
                  "search.registry_name=detectors", "search.scheduler=fifo", "search.top_k=1"]
    result = run_search(load_config(None, overrides))
    board = result.leaderboard
    assert (result.metric, result.mode) == ("val_map", "max")
    assert len(board) == 2 and board[0].best_score >= board[1].best_score
    assert load_artifact(result.promoted[0].path).meta["task"] == "detection"


def _post(url: str, name: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/v1/models/{name}/predict", json=body, timeout=120)


def test_served_boxes_equal_offline(ray_cluster, registry, shapes, frcnn_run):
    from ray import serve

    from ptm_ray.serve import deploy

    cfg = load_config(None, ["data.train=unused", "model.name=minilm-l6", f"serve.registry={registry.root}",
                             f"serve.port={free_port()}", "serve.models=[{name: shapes-frcnn}]", "serve.num_cpus=0.1",
                             "serve.max_boxes=50", "serve.min_replicas=1", "serve.max_replicas=1"])
    url, _ = deploy(cfg)
    try:
        artifact = load_artifact(registry.get("shapes-frcnn").path)
        images = sorted((Path(shapes["root"]) / "images" / "val").glob("*.png"))[:2]
        data = [p.read_bytes() for p in images]
        options = {"score_threshold": 0.05, "max_boxes": 5}
        served = _post(url, "shapes-frcnn", {"inputs": [base64.b64encode(d).decode() for d in data], "parameters": options})
        assert served.status_code == 200, served.text
        predictions = served.json()["predictions"]
        offline = predict(artifact, data, **options)
        assert len(predictions) == 2 and set(predictions[0]) == {"boxes", "labels", "scores"}
        assert any(p["boxes"] for p in predictions)  # the trained model finds shapes at this threshold
        for got, want in zip(predictions, offline):
            assert got["labels"] == want["labels"] and len(got["boxes"]) <= 5
            assert len(got["boxes"]) == len(want["boxes"])
            flat = lambda boxes: [v for box in boxes for v in box]  # noqa: E731
            assert flat(got["boxes"]) == pytest.approx(flat(want["boxes"]), abs=0.05)
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-3)
            assert all(0 <= v <= 128 for box in got["boxes"] for v in box)  # pixels of the original 128 px image
        for body, message in [
            ({"inputs": [base64.b64encode(data[0]).decode()], "parameters": {"max_boxes": 51}}, "max_boxes"),
            ({"inputs": [base64.b64encode(data[0]).decode()], "parameters": {"iou_threshold": 0.5}}, "iou_threshold"),
            ({"inputs": [base64.b64encode(b"not an image").decode()]}, "inputs[0]: not decodable as an image"),
        ]:
            bad = _post(url, "shapes-frcnn", body)
            assert bad.status_code == 422 and message in bad.json()["error"], (body, bad.text)
    finally:
        serve.shutdown()


def test_hf_detector_trains_and_its_checkpoint_detects_alike_in_a_transformers_pipeline(ray_cluster, shapes, tmp_path):
    """A Hugging Face DETR (tiny config, saved like a hub snapshot with its image processor and a 2-class head) is
    fine-tuned on the 3 shapes with its lowest block frozen; ``pipeline("object-detection")`` loads the checkpoint's
    ``model/`` folder and finds the boxes ptm_ray finds."""
    from PIL import Image
    from transformers import pipeline

    from ptm_ray.tiny import make_tiny_detector

    source = make_tiny_detector("detr", tmp_path / "detr", ["cat", "dog"], image_size=96)
    cfg = load_config(None, _overrides(shapes, tmp_path, "detr", model__name=f"hf:{source}", model__freeze_depth=1,
                                       data__image_size=96, scaling__num_workers=1, train__epochs=3,
                                       data__validation=str(shapes["val_small"])))
    result = fit(cfg)
    history = result.history
    assert [h["frozen_blocks"] for h in history] == [1, 1, 1]
    assert history[-1]["train_loss"] < history[0]["train_loss"], [h["train_loss"] for h in history]
    assert all(0.0 <= h["val_map"] <= 1.0 and h["val_loss"] > 0 for h in history)
    artifact = load_artifact(result.best_checkpoint)
    assert artifact.family.name == "hf-detection" and artifact.labels == ["circle", "square", "triangle"]
    images = sorted((Path(shapes["root"]) / "images" / "val").glob("*.png"))[:2]
    ours = predict(artifact, [p.read_bytes() for p in images], score_threshold=0.0, max_boxes=5)
    detector = pipeline("object-detection", model=str(Path(result.best_checkpoint) / "model"))
    theirs = detector([Image.open(p).convert("RGB") for p in images], threshold=0.0)
    for want, got in zip(ours, theirs):
        got = sorted(got, key=lambda d: -d["score"])[:5]
        assert [d["label"] for d in got] == want["labels"]
        assert [d["score"] for d in got] == pytest.approx(want["scores"], abs=1e-3)
        boxes = [[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in got]
        for box, expected in zip(boxes, want["boxes"]):
            assert box == pytest.approx(expected, abs=1.0)  # the pipeline rounds to whole pixels
