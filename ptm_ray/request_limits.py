"""Limits a served request must pass before any real work is spent on it.

Each check reads only what it needs: the body is counted while it streams in, an image's pixel count and an
audio clip's sample rate and length come from the file header, and a string is cut by characters before a
tokenizer sees it. A request that fails a check costs microseconds, not a decode, a resample or a tokenization
of whatever size the client chose.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

__all__ = ["InputError", "TooLarge", "cap_text", "probe_audio", "probe_image", "read_limited"]

# Sample rates a clip may declare. A header can claim any integer; outside this range it is not audio anyone
# records, and resampling from it costs more than the request is worth.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 384_000


class InputError(ValueError):
    """An input the model cannot use (undecodable, empty, an absurd header): the client's error (HTTP 422)."""


class TooLarge(InputError):
    """An input or body beyond a configured limit (HTTP 413)."""


async def read_limited(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The whole body of ``chunks``, refusing it as soon as it passes ``max_bytes`` (chunked bodies too)."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"request body exceeds the limit of {max_bytes} bytes (serve.max_body_bytes)")
        parts.append(chunk)
    return b"".join(parts)


def probe_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels.

    Raises:
        TooLarge: if the image declares more than ``max_pixels`` pixels (a decompression bomb or just too big).
        InputError: if the bytes are not an image Pillow can read or fail its integrity check.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow warns above its own limit; ours is checked right below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # lazy: parses the header only
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise TooLarge(f"image of {width}x{height} = {width * height} pixels exceeds the limit of "
                               f"{max_pixels} (serve.max_image_pixels)")
            image.verify()  # structure and checksums, still without decoding the pixels
    except Image.DecompressionBombError as e:  # Pillow's own guard fired before ours could
        raise TooLarge(f"image exceeds the limit of {max_pixels} pixels (serve.max_image_pixels): {e}") from None
    except TooLarge:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"not decodable as an image: {e}") from None
    return width, height


def probe_audio(data: bytes, max_seconds: float) -> tuple[int, float]:
    """(sample rate, duration in seconds) from the audio header, without decoding the samples.

    Raises:
        TooLarge: if the clip is longer than ``max_seconds``.
        InputError: if it is not audio soundfile can read, holds no samples, or declares an absurd sample rate.
    """
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise InputError(f"not decodable as audio: {e}") from None
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise InputError(f"audio declares a sample rate of {info.samplerate} Hz, outside "
                         f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")
    if info.frames <= 0:
        raise InputError("audio has no samples (zero length)")
    seconds = info.frames / info.samplerate
    if seconds > max_seconds:
        raise TooLarge(f"audio of {seconds:.1f} s exceeds the limit of {max_seconds:g} s (serve.max_audio_seconds)")
    return info.samplerate, seconds


def cap_text(text: str, max_chars: int) -> tuple[str, dict[str, object]]:
    """``text`` cut to ``max_chars`` characters, and the note a prediction carries when it was cut."""
    if len(text) <= max_chars:
        return text, {}
    return text[:max_chars], {"truncated": True, "warning": f"input of {len(text)} characters was cut to the "
                                                           f"first {max_chars} before tokenizing (serve.max_text_chars)"}
