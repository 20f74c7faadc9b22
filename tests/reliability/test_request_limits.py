"""Served-input limits read from headers and streams, before any decode, resample or tokenization."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import soundfile
from PIL import Image

from ptm_ray.models.audio import decode_audio
from ptm_ray.request_limits import InputError, TooLarge, cap_text, probe_audio, probe_image, read_limited

from conftest import png_header


def _wav(samples: int, rate: int) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.linspace(-0.5, 0.5, samples, dtype="float32"), rate, format="WAV")
    return out.getvalue()


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


def test_image_size_comes_from_the_header_and_bombs_are_refused():
    assert probe_image(_png(40, 30), max_pixels=1200) == (40, 30)
    with pytest.raises(TooLarge, match=r"image of 40x31 = 1240 pixels exceeds the limit of 1200"):
        probe_image(_png(40, 31), max_pixels=1200)
    # past Pillow's own guard (2 x 89 M pixels) Pillow refuses first: still ours, still "too large"
    with pytest.raises(TooLarge, match="exceeds the limit of 25000000 pixels"):
        probe_image(png_header(20_000, 20_000), max_pixels=25_000_000)


@pytest.mark.parametrize("data, message", [(b"not an image", "not decodable as an image"),
                                           (_png(8, 8)[:-20], "not decodable as an image")])
def test_an_undecodable_image_is_an_input_error_not_too_large(data, message):
    with pytest.raises(InputError, match=message) as caught:
        probe_image(data, max_pixels=10_000)
    assert not isinstance(caught.value, TooLarge)


def test_audio_rate_and_length_come_from_the_header():
    assert probe_audio(_wav(8000, 16000), max_seconds=1.0) == (16000, 0.5)
    with pytest.raises(TooLarge, match=r"audio of 2.0 s exceeds the limit of 1 s"):
        probe_audio(_wav(32000, 16000), max_seconds=1.0)
    with pytest.raises(InputError, match="sample rate of 500 Hz, outside 1000-384000 Hz"):
        probe_audio(_wav(10, 500), max_seconds=1.0)
    with pytest.raises(InputError, match="not decodable as audio"):
        probe_audio(b"RIFFjunkWAVE", max_seconds=1.0)


def test_audio_is_cut_before_it_is_resampled():
    clip = _wav(44_100 * 3, 44_100)
    assert decode_audio(clip, 16_000, max_seconds=1.0).shape == (16_000,)
    assert decode_audio(clip, 16_000).shape == (48_000,)


def test_an_odd_declared_rate_is_resampled_as_its_nearest_100_hz():
    # 44,099/16,000 does not reduce: torchaudio would build a 44,099 x 16,000 kernel (minutes); 44,100 reduces to 441/160
    one_second = _wav(44_099, 44_099)
    assert decode_audio(one_second, 16_000).shape == (16_000,)
    ramp = decode_audio(one_second, 16_000)
    assert ramp[4000] < ramp[8000] < ramp[12000]  # the signal survives, not just the length


def test_text_is_cut_by_characters_and_says_so():
    assert cap_text("short", 10) == ("short", {})
    text, note = cap_text("x" * 25, 10)
    assert text == "x" * 10 and note["truncated"] is True
    assert note["warning"] == "input of 25 characters was cut to the first 10 before tokenizing (serve.max_text_chars)"


def test_a_body_is_refused_as_soon_as_it_passes_the_limit():
    seen = []

    async def chunks():
        for i in range(100):
            seen.append(i)
            yield b"x" * 1000

    async def body(limit: int) -> bytes:
        return await read_limited(chunks(), limit)

    assert len(asyncio.run(body(100_000))) == 100_000
    seen.clear()
    with pytest.raises(TooLarge, match="request body exceeds the limit of 2500 bytes"):
        asyncio.run(body(2_500))
    assert seen == [0, 1, 2]  # stopped reading at the third chunk, not after the hundredth
