"""A spoken-command set synthesised with espeak-ng: ten words, several voices, speeds and pitches, as wav.

    python -m ptm_ray.datasets.speech_commands /tmp/commands    # -> /tmp/commands/<word>/<voice>-<speed>-<pitch>.wav

espeak-ng is a Debian package (``apt-get install espeak-ng``; ``make setup`` installs it). It writes
22,050 Hz mono wav; the models' preprocessing resamples to their own rate.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["WORDS", "make_speech_commands"]

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
VOICES = ("en-us+m3", "en-us+f3", "en+m1", "en+f2", "en-gb-scotland+m2", "en-us+f4")
SPEEDS = (130, 160, 190)
PITCHES = (35, 60)


def make_speech_commands(out_dir: str | Path, words: tuple[str, ...] = WORDS, voices: tuple[str, ...] = VOICES,
                         speeds: tuple[int, ...] = SPEEDS, pitches: tuple[int, ...] = PITCHES) -> Path:
    """Write one wav per (word, voice, speed, pitch) as ``out_dir/<word>/<voice>-<speed>-<pitch>.wav``.

    Raises:
        RuntimeError: if espeak-ng is not installed (with the command that installs it).
    """
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed: run `apt-get install espeak-ng` (make setup does it)")
    out = Path(out_dir)
    marker = out / f".complete-{len(words)}-{len(voices)}-{len(speeds)}-{len(pitches)}"
    if marker.exists():
        return out
    for word, voice, speed, pitch in itertools.product(words, voices, speeds, pitches):
        target = out / word / f"{voice.replace('+', '_')}-{speed}-{pitch}.wav"
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(target), word],
                       check=True, capture_output=True)
    marker.touch()
    return out


if __name__ == "__main__":
    print(make_speech_commands(sys.argv[1] if len(sys.argv) > 1 else "speech_commands"))
