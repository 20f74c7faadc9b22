"""Image and audio data: folders and manifests, grey/RGBA conversion, bad files failed or skipped and counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from ptm_ray.config import DataConfig
from ptm_ray.data import inspect_data
from ptm_ray.models.audio import AudioPreprocessor
from ptm_ray.models.vision import ImagePreprocessor


def _image(path: Path, mode: str, size=(20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"L": 128, "RGBA": (255, 0, 0, 128), "RGB": (0, 255, 0)}[mode]
    Image.new(mode, size, color).save(path)


def _wav(path: Path, seconds=0.2, rate=22050) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, np.sin(2 * np.pi * 440 * t).astype(np.float32), rate)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    for i in range(3):
        _image(root / "cat" / f"{i}.png", "RGB")
        _image(root / "dog" / f"{i}.jpg", "L")  # grey
    _image(root / "dog" / "rgba.png", "RGBA")
    return root


def test_image_folder_labels_come_from_subfolders(image_folder):
    summary = inspect_data(DataConfig(train=str(image_folder), val_fraction=0.25), "image")
    assert summary.labels == ["cat", "dog"]
    assert summary.num_train_rows + summary.num_val_rows == 7
    assert not summary.skipped


def test_grey_and_rgba_images_become_rgb_tensors(image_folder):
    pre = ImagePreprocessor({"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                             "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "center"}, augment="light")
    files = [image_folder / "dog" / "0.jpg", image_folder / "dog" / "rgba.png", image_folder / "cat" / "0.png"]
    for train in (False, True):
        out = pre([f.read_bytes() for f in files], train=train)["pixel_values"]
        assert out.shape == (3, 3, 32, 32)


def test_corrupt_image_fails_naming_the_file_or_is_skipped_and_counted(image_folder):
    bad = image_folder / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"data.train: .*broken.png: not decodable as an image.*on_bad_file=skip"):
        inspect_data(DataConfig(train=str(image_folder)), "image")
    summary = inspect_data(DataConfig(train=str(image_folder), on_bad_file="skip", val_fraction=0.25), "image")
    assert summary.skipped == {"data.train": [str(bad)]}
    assert summary.num_train_rows + summary.num_val_rows == 7


def test_image_manifest_with_relative_paths(image_folder, tmp_path):
    manifest = image_folder / "manifest.csv"
    manifest.write_text("path,label\ncat/0.png,cat\ncat/1.png,cat\ndog/0.jpg,dog\ndog/1.jpg,dog\n")
    summary = inspect_data(DataConfig(train=str(manifest), val_fraction=0.25), "image")
    assert summary.labels == ["cat", "dog"] and summary.num_train_rows == 3
    missing = image_folder / "bad.csv"
    missing.write_text("path,label\ncat/0.png,cat\ncat/nope.png,dog\n")
    with pytest.raises(ValueError, match=r"data.train: .*nope.png"):
        inspect_data(DataConfig(train=str(missing)), "image")
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no image files as <label>/<file>"):
        inspect_data(DataConfig(train=str(empty)), "image")


@pytest.fixture
def audio_folder(tmp_path) -> Path:
    root = tmp_path / "audio"
    for i in range(3):
        _wav(root / "yes" / f"{i}.wav")
        _wav(root / "no" / f"{i}.wav", rate=16000)
    return root


def test_zero_length_and_undecodable_audio_are_named(audio_folder):
    empty = audio_folder / "yes" / "empty.wav"
    soundfile.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match=r"empty.wav: audio has no samples \(zero length\)"):
        inspect_data(DataConfig(train=str(audio_folder)), "audio")
    empty.unlink()
    (audio_folder / "no" / "noise.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match=r"noise.wav: not decodable as audio"):
        inspect_data(DataConfig(train=str(audio_folder)), "audio")
    summary = inspect_data(DataConfig(train=str(audio_folder), on_bad_file="skip", val_fraction=0.2), "audio")
    assert len(summary.skipped["data.train"]) == 1


def test_declared_sample_rate_must_match_the_file(audio_folder):
    manifest = audio_folder / "manifest.csv"
    manifest.write_text("path,label,sample_rate\nyes/0.wav,yes,22050\nno/0.wav,no,22050\n")
    with pytest.raises(ValueError, match=r"row 2: .*no/0.wav declares sample_rate 22050 but the file is 16000 Hz"):
        inspect_data(DataConfig(train=str(manifest)), "audio")


def test_audio_is_mixed_resampled_and_cropped_or_padded(tmp_path):
    stereo = tmp_path / "stereo.wav"
    soundfile.write(stereo, np.ones((44100, 2), dtype=np.float32) * 0.5, 44100)  # 1 s stereo at 44.1 kHz
    short = tmp_path / "short.wav"
    _wav(short, seconds=0.1, rate=8000)
    out = AudioPreprocessor(16000, 0.5, normalize=False, attention_mask=True)([stereo.read_bytes(), short.read_bytes()])
    assert out["input_values"].shape == (2, 8000)  # 0.5 s at 16 kHz: cropped and padded alike
    assert out["attention_mask"][0].sum() == 8000 and out["attention_mask"][1].sum() == 1600
    assert abs(float(out["input_values"][0, 100]) - 0.5) < 1e-3  # two channels mixed to mono
