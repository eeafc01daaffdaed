"""espeak-ng synthesis shared by the corpus builders (`build_tts_corpus`, `build_phone_corpus`)."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import soundfile as sf

from encoders.audio import SAMPLE_RATE, prepare_audio


def synthesize(text: str, voice: str, speed: int, pitch: int, *, ssml: bool = False) -> np.ndarray:
    """espeak-ng speech of `text` (SSML markup such as `<break time="300ms"/>` with `ssml`) as 16 kHz mono float32."""
    markup = ["-m"] if ssml else []
    wav = subprocess.run(["espeak-ng", "--stdout", *markup, "-v", voice, "-s", str(speed), "-p", str(pitch), text],
                         capture_output=True, check=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return prepare_audio(audio, rate)


def trim_silence(audio: np.ndarray, pad_seconds: float = 0.1, threshold: float = 1e-3) -> np.ndarray:
    """Cuts leading and trailing silence down to `pad_seconds`."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    pad = int(pad_seconds * SAMPLE_RATE)
    return audio[max(loud[0] - pad, 0): loud[-1] + pad + 1]


def shift_pitch(audio: np.ndarray, cents: float) -> np.ndarray:
    """`audio` (16 kHz mono float32) shifted in pitch by `cents` with sox's `pitch` effect (formants move with it,
    as a shorter vocal tract would move them), same duration."""
    source = io.BytesIO()
    sf.write(source, audio, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    wav = subprocess.run(["sox", "-t", "wav", "-", "-t", "wav", "-e", "floating-point", "-", "pitch", f"{cents:.0f}"],
                         input=source.getvalue(), capture_output=True, check=True).stdout
    shifted, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return prepare_audio(shifted, rate)
