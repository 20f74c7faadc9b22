"""A checkpoint's ``model/`` folder loads with no ptm_ray: ``transformers.pipeline`` for every HF task, timm's
``local-dir:``; and answers as ptm_ray's own predict does. Tiny real models saved through ``save_checkpoint``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ptm_ray.checkpoint import load_artifact, save_checkpoint
from ptm_ray.config import Config, DataConfig, ModelConfig
from ptm_ray.inference import predict
from ptm_ray.models import resolve_model
from ptm_ray.seq_metrics import ctc_vocab
from ptm_ray.tasks import task_for

from conftest import TRAIN_CSV

RATE, SECONDS = 16000, 1.0
PROMPTS = ["where is my order", "cancel my plan please", "hello there"]  # shorter than model.max_length


def _checkpoint(tmp_path: Path, name: str, task: str, labels: list[str], tweak=None, **data) -> Path:
    """Build ``name`` for ``task`` as a training worker does, let ``tweak(model, preprocessor)`` change it (random
    tiny weights answer every input alike), and write it with ``save_checkpoint``."""
    cfg = Config(model=ModelConfig(name=name, task=task, max_length=32, weights=data.pop("weights", "")),
                 data=DataConfig(train="x", **data))
    family, ref = resolve_model(cfg.model)
    torch.manual_seed(0)
    model = family.build(ref, labels, cfg.model, task_for(task).head)
    preprocessor = family.preprocessor(ref, model, cfg)
    if tweak is not None:
        with torch.no_grad():
            tweak(model, preprocessor)
    return save_checkpoint(tmp_path / "ckpt", family=family, model=model.eval(), preprocessor=preprocessor, cfg=cfg,
                           labels=labels, metrics={}, history=[])


def _scale(module: str):
    def tweak(model, preprocessor):
        model.get_submodule(module).weight.mul_(40.0)
    return tweak


def _intents() -> tuple[list[str], list[str], list[str]]:
    """(texts, their labels, the sorted label set) of the bundled training file."""
    with open(TRAIN_CSV) as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows], sorted({r["label"] for r in rows})


def _train_a_few_steps(model, preprocessor) -> None:
    """Thirty full-batch Adam steps on the bundled intents, so the classifier tells inputs apart."""
    texts, targets, labels = _intents()
    texts, targets = texts[:64], torch.tensor([labels.index(t) for t in targets[:64]])
    _adam_steps(model, preprocessor(texts), targets)


def _adam_steps(model, batch: dict, targets: torch.Tensor, steps: int = 30) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(**batch).logits, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _fit_clips(clips: list[np.ndarray]):
    """A tweak: thirty full-batch Adam steps teaching clip i label i (scaling a random head was not enough: a random
    encoder's pooled features share one large direction, and which label wins everywhere depended on the seed)."""
    def tweak(model, preprocessor):
        _adam_steps(model, preprocessor([_wav(c) for c in clips]), torch.arange(len(clips)))
    return tweak


def _wav(samples: np.ndarray) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, RATE, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _clips(n: int) -> list[np.ndarray]:
    """Clips of exactly data.max_seconds (ptm_ray pads shorter ones; a pipeline does not): tones and noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(RATE * SECONDS)) / RATE
    return [(0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
            for i in range(n)]


def test_text_classification_pipeline_answers_as_ptm_ray(tiny_text, tmp_path):
    from transformers import pipeline

    texts, _, intents = _intents()
    ckpt = _checkpoint(tmp_path, f"hf:{tiny_text['bert']}", "classification", intents, tweak=_train_a_few_steps)
    texts = texts[64:80]  # not trained on
    ours = predict(load_artifact(ckpt), texts, top_k=len(intents))
    assert len({p["label"] for p in ours}) >= 3  # the inputs get different answers, so agreeing means something
    theirs = pipeline("text-classification", model=str(ckpt / "model"), top_k=None, truncation=True)(texts)
    for mine, scores in zip(ours, theirs):
        assert scores[0]["label"] == mine["label"]
        assert {s["label"]: round(s["score"], 4) for s in scores} == \
               {t["label"]: round(t["probability"], 4) for t in mine["top_k"]}
    config = json.loads((ckpt / "model" / "config.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(intents)}
    assert config["label2id"] == {label: i for i, label in enumerate(intents)}


def test_audio_classification_pipeline_answers_as_ptm_ray(tiny_audio, tmp_path):
    from transformers import Wav2Vec2FeatureExtractor, pipeline

    labels = ["down", "go", "left", "no", "right", "stop"]
    clips = _clips(6)
    ckpt = _checkpoint(tmp_path, f"hf:{tiny_audio['wav2vec2']}", "classification", labels, tweak=_fit_clips(clips),
                       max_seconds=SECONDS)
    ours = predict(load_artifact(ckpt), [_wav(c) for c in clips], top_k=len(labels))
    assert len({p["label"] for p in ours}) >= 3  # the inputs get different answers, so agreeing means something
    classify = pipeline("audio-classification", model=str(ckpt / "model"), top_k=None)
    for clip, mine in zip(clips, ours):
        scores = classify({"raw": clip, "sampling_rate": RATE})
        assert scores[0]["label"] == mine["label"]
        assert {s["label"]: round(s["score"], 4) for s in scores} == \
               {t["label"]: round(t["probability"], 4) for t in mine["top_k"]}
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(ckpt / "model")
    assert (extractor.sampling_rate, extractor.do_normalize, extractor.return_attention_mask) == (RATE, True, False)


def test_speech_recognition_pipeline_transcribes_as_ptm_ray(tiny_audio, tmp_path):
    from transformers import AutoProcessor, pipeline

    labels = list(ctc_vocab(["go stop left right", "turn down the volume"]))
    ckpt = _checkpoint(tmp_path, f"hf:{tiny_audio['wav2vec2']}", "speech_recognition", labels, tweak=_scale("lm_head"),
                       max_seconds=SECONDS)
    clips = _clips(4)
    ours = [p["text"] for p in predict(load_artifact(ckpt), [_wav(c) for c in clips])]
    assert all(ours) and len(set(ours)) >= 2
    transcribe = pipeline("automatic-speech-recognition", model=str(ckpt / "model"))
    # the CTC pipeline writes a predicted <unk> as "<unk>" where ptm_ray drops it, and may keep two spaces in a row
    theirs = [transcribe({"raw": c, "sampling_rate": RATE})["text"] for c in clips]
    assert [" ".join(text.replace("<unk>", "").split()) for text in theirs] == ours
    tokenizer = AutoProcessor.from_pretrained(ckpt / "model").tokenizer
    assert tokenizer.convert_ids_to_tokens(list(range(len(labels)))) == labels
    assert (tokenizer.pad_token_id, tokenizer.word_delimiter_token) == (0, "|")


def test_text_generation_pipeline_continues_as_ptm_ray(tiny_text, tmp_path):
    from transformers import pipeline

    ckpt = _checkpoint(tmp_path, f"hf:{tiny_text['gpt2']}", "text_generation", [])
    artifact = load_artifact(ckpt)
    generate = pipeline("text-generation", model=str(ckpt / "model"))
    for prompt in PROMPTS:
        (mine,) = predict(artifact, [prompt], max_new_tokens=8)
        (theirs,) = generate(prompt, max_new_tokens=8, do_sample=False)
        assert theirs["generated_text"] == mine["generated_text"] and mine["completion"]


def _learn_answers(model, preprocessor) -> None:
    """Forty Adam steps on three (question, answer) pairs: a random tiny T5 answers with nothing or one repeated piece."""
    tokenizer = preprocessor.tokenizer
    targets = tokenizer(["order status", "cancel plan", "greeting"], padding=True, return_tensors="pt").input_ids
    targets[targets == tokenizer.pad_token_id] = -100
    batch = preprocessor(PROMPTS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    with torch.enable_grad():
        for _ in range(40):
            loss = model(**batch, labels=targets).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def test_seq2seq_checkpoint_loads_with_auto_classes_and_generates_as_ptm_ray(tiny_text, tmp_path):
    # transformers 5 has no text2text-generation pipeline: its auto classes are how the ecosystem loads T5
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    ckpt = _checkpoint(tmp_path, f"hf:{tiny_text['t5']}", "text2text", [], tweak=_learn_answers)
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "model")
    model = AutoModelForSeq2SeqLM.from_pretrained(ckpt / "model").eval()
    artifact, answers = load_artifact(ckpt), []
    for text in PROMPTS:
        (mine,) = predict(artifact, [text], max_new_tokens=8)
        ids = model.generate(**tokenizer([text], return_tensors="pt"), max_new_tokens=8, do_sample=False)
        assert tokenizer.decode(ids[0], skip_special_tokens=True) == mine["generated_text"]
        answers.append(mine["generated_text"])
    assert len(set(answers)) >= 2 and all(answers)


def test_timm_checkpoint_loads_with_local_dir_and_gives_the_same_logits(digits_dir, tmp_path):
    import timm
    from PIL import Image

    labels = [str(d) for d in range(10)]
    ckpt = _checkpoint(tmp_path, "timm:test_efficientnet", "classification", labels, weights="none", image_size=48)
    artifact = load_artifact(ckpt)
    images = sorted(Path(digits_dir).rglob("*.png"))[:4]
    batch = artifact.batch([p.read_bytes() for p in images])["pixel_values"]
    theirs = timm.create_model(f"local-dir:{ckpt / 'model'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(theirs(batch), artifact.model(batch))
    # timm's own preprocessing from the exported config is the one ptm_ray used
    data_config = timm.data.resolve_data_config(model=theirs)
    ours = artifact.preprocessor.data_config
    assert data_config["input_size"] == (3, 48, 48) == tuple(ours["input_size"])
    assert tuple(data_config["mean"]) == tuple(ours["mean"]) and tuple(data_config["std"]) == tuple(ours["std"])
    transform = timm.data.create_transform(**data_config)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    assert torch.allclose(pixels, batch)
    config = json.loads((ckpt / "model" / "config.json").read_text())
    assert (config["architecture"], config["num_classes"], config["label_names"]) == ("test_efficientnet", 10, labels)


def test_checkpoints_written_before_the_ecosystem_files_still_load(tiny_text, tmp_path):
    ckpt = _checkpoint(tmp_path, f"hf:{tiny_text['bert']}", "classification", ["a", "b", "c"], tweak=_scale("classifier"))
    expected = predict(load_artifact(ckpt), PROMPTS)
    for extra in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (ckpt / "model" / extra).unlink(missing_ok=True)  # the format-1 layout before this change
    assert sorted(p.name for p in (ckpt / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert predict(load_artifact(ckpt), PROMPTS) == expected


def test_timm_local_dir_name_starts_from_a_checkpoint_folder(tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    first = _checkpoint(tmp_path / "first", "timm:test_efficientnet", "classification", [str(d) for d in range(10)],
                        weights="none", image_size=48)
    name = f"timm:local-dir:{first / 'model'}"
    second = _checkpoint(tmp_path / "second", name, "classification", ["a", "b", "c", "d"])
    shapes = "classifier.bias (10,) -> (4,), classifier.weight (10, 256) -> (4, 256)"
    assert (f"[ptm_ray] {name}: its head has another size, replaced with a freshly initialised one for 4 outputs: "
            f"{shapes}") in capsys.readouterr().out.splitlines()
    saved = load_file(first / "model" / "model.safetensors")
    shutil.rmtree(first)  # the new checkpoint names the architecture itself, not the folder it started from
    artifact = load_artifact(second)
    state = artifact.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("classifier."))
    assert artifact.model.num_classes == 4 and tuple(artifact.preprocessor.data_config["input_size"]) == (3, 48, 48)
    assert json.loads((second / "model" / "timm.json").read_text())["arch"] == "test_efficientnet"


@pytest.mark.parametrize("name, weights, message", [
    ("timm:local-dir:/nowhere", "", "model.name=timm:local-dir:/nowhere: expected a folder with timm's config.json"),
    ("timm:hf-hub:timm/resnet18.a1_in1k", "", "expected a hub id, which needs a network or the Hugging Face cache"),
    ("timm:local-dir:/nowhere", "/some/file.safetensors", "timm:local-dir:/nowhere brings its own weights"),
    ("timm:resnet_nonexistent", "", "timm has no such architecture"),
])
def test_bad_timm_names_say_what_was_expected(name, weights, message):
    cfg = ModelConfig(name=name, weights=weights)
    family, ref = resolve_model(cfg)
    with pytest.raises(ValueError, match=message):
        family.build(ref, ["a", "b"], cfg, "classifier")
