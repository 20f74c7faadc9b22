"""torchvision classifiers by name (``torchvision:<arch>[.<weights enum>]``): routing beside the detectors, blocks,
preprocessing from the weight enum, a local state dict with an ImageNet head replaced, save and load, a Ray fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ptm_ray.checkpoint import load_artifact, save_checkpoint
from ptm_ray.config import Config, DataConfig, ModelConfig
from ptm_ray.freeze import block_of_parameters, freeze
from ptm_ray.models import resolve_model

from conftest import check_classification_predictions

LABELS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def imagenet_resnet18(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A resnet18 state dict with its 1000-class ImageNet head, as torchvision's own file holds it."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    state = resnet18(num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("tv") / "resnet18.safetensors"
    save_file(state, path)
    return str(path), state


@pytest.mark.parametrize("name, family", [
    ("torchvision:resnet18", "torchvision"),
    ("torchvision:resnet50.IMAGENET1K_V2", "torchvision"),
    ("torchvision:mobilenet_v3_small", "torchvision"),
    ("torchvision:fasterrcnn_resnet50_fpn", "torchvision-detection"),
    ("torchvision:fasterrcnn_efficientnet_lite0_fpn", "torchvision-detection"),
])
def test_classifier_names_and_detector_names_route_to_their_families(name, family):
    assert resolve_model(ModelConfig(name=name))[0].name == family


def test_a_state_dict_with_an_imagenet_head_fine_tunes_for_four_labels(imagenet_resnet18, capsys):
    path, saved = imagenet_resnet18
    cfg = Config(model=ModelConfig(name="torchvision:resnet18", weights=path), data=DataConfig(train="x"))
    family, ref = resolve_model(cfg.model)
    model = family.build(ref, LABELS, cfg.model, "classifier")
    assert ("[ptm_ray] torchvision:resnet18: its head has another size, replaced with a freshly initialised one for "
            "4 outputs: fc.bias (1000,) -> (4,), fc.weight (1000, 512) -> (4, 512)") in capsys.readouterr().out
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("fc."))
    assert model.fc.weight.shape == (4, 512)
    blocks = family.blocks(model)
    assert [b.name for b in blocks] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    owner = block_of_parameters(model, blocks)
    assert {n for n, i in owner.items() if i == -1} == {"fc.weight", "fc.bias"}
    assert {n for n, i in owner.items() if i == 0} == {"conv1.weight", "bn1.weight", "bn1.bias"}
    freeze(model, blocks, 5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    # the weight enum's preprocessing: resize 256, centre crop 224, ImageNet mean/std, bilinear
    data = family.preprocessor(ref, model, cfg).data_config
    assert data == {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
                    "std": (0.229, 0.224, 0.225), "crop_pct": 224 / 256, "crop_mode": "center"}


def test_the_tag_picks_the_weights_preprocessing_and_a_bad_tag_lists_the_choices():
    cfg = Config(model=ModelConfig(name="torchvision:resnet50.IMAGENET1K_V2", weights="none"), data=DataConfig(train="x"))
    family, ref = resolve_model(cfg.model)
    model = family.build(ref, LABELS, cfg.model, "classifier")
    assert family.preprocessor(ref, model, cfg).data_config["crop_pct"] == 224 / 232  # V2 resizes to 232
    bad = ModelConfig(name="torchvision:resnet50.IMAGENET1K_V9", weights="none")
    with pytest.raises(ValueError, match=r"resnet50 has no weights 'IMAGENET1K_V9'; .*\['IMAGENET1K_V1', 'IMAGENET1K_V2'"):
        family.build(resolve_model(bad)[1], LABELS, bad, "classifier")


def test_weights_of_another_architecture_are_an_error(imagenet_resnet18):
    cfg = ModelConfig(name="torchvision:resnet34", weights=imagenet_resnet18[0])
    family, ref = resolve_model(cfg)
    with pytest.raises(ValueError, match=r"does not fit torchvision's resnet34: .*missing \['layer1.2"):
        family.build(ref, LABELS, cfg, "classifier")


def test_checkpoint_round_trip_gives_the_same_logits(imagenet_resnet18, digits_dir, tmp_path):
    cfg = Config(model=ModelConfig(name="torchvision:mobilenet_v3_small", weights="none"),
                 data=DataConfig(train="x", image_size=64))
    family, ref = resolve_model(cfg.model)
    model = family.build(ref, LABELS, cfg.model, "classifier").eval()
    blocks = family.blocks(model)
    assert [b.name for b in blocks][:2] == ["features.0", "features.1"] and len(blocks) == 13
    ckpt = save_checkpoint(tmp_path / "ckpt", family=family, model=model, preprocessor=family.preprocessor(ref, model, cfg),
                           cfg=cfg, labels=LABELS, metrics={}, history=[])
    artifact = load_artifact(ckpt)
    images = [p.read_bytes() for p in sorted(Path(digits_dir).rglob("*.png"))[:3]]
    batch = artifact.batch(images)["pixel_values"]
    assert batch.shape == (3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(artifact.model(batch), model(batch))


def test_fit_fine_tunes_a_torchvision_resnet_from_an_imagenet_state_dict(ray_cluster, imagenet_resnet18, digits_dir,
                                                                         tmp_path):
    from ptm_ray.config import load_config
    from ptm_ray.inference import predict
    from ptm_ray.train import fit

    path, saved = imagenet_resnet18
    cfg = load_config(None, ["model.name=torchvision:resnet18", f"model.weights={path}", "model.freeze_depth=all",
                             f"data.train={digits_dir}", "data.image_size=32", "data.validation=null",
                             "data.val_fraction=0.2", "train.batch_size=32", "train.epochs=1",
                             "train.max_steps_per_epoch=5", "optim.lr=3e-3", "scaling.num_workers=1",
                             "scaling.resources_per_worker={CPU: 1}", f"storage.path={tmp_path / 'runs'}",
                             "storage.name=tv"])
    result = fit(cfg)
    artifact = load_artifact(result.best_checkpoint)
    assert artifact.family.name == "torchvision" and artifact.model.fc.weight.shape == (10, 512)
    state = artifact.model.state_dict()
    # frozen blocks keep the saved weights (BatchNorm statistics too: frozen modules stay in eval mode)
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("fc."))
    images = [p.read_bytes() for p in sorted(Path(digits_dir).rglob("*.png"))[:3]]
    check_classification_predictions(artifact, images, predict(artifact, images))
