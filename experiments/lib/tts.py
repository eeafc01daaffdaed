"""espeak-ng synthesis shared by the corpus builders (`build_tts_corpus`, `build_phone_corpus`)."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import soundfile as sf

from encoders.audio import SAMPLE_RATE, prepare_audio


def synthesize(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng speech of `text` as 16 kHz mono float32."""
    wav = subprocess.run(["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text],
                         capture_output=True, check=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return prepare_audio(audio, rate)


def trim_silence(audio: np.ndarray, pad_seconds: float = 0.1, threshold: float = 1e-3) -> np.ndarray:
    """Cuts leading and trailing silence down to `pad_seconds`."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    pad = int(pad_seconds * SAMPLE_RATE)
    return audio[max(loud[0] - pad, 0): loud[-1] + pad + 1]
