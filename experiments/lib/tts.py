"""Synthetic speech shared by the corpus builders and benchmarks: espeak-ng synthesis, silence trimming, sox pitch
shift, and the sentence files they read (`read_sentences`, `split_sentences`)."""

from __future__ import annotations

import io
import os
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


def read_sentences(paths) -> list[str]:
    """Distinct non-empty lines of the sentence files, in file order (a missing file is an error naming it)."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"sentence files not found: {missing}; run from the repository root with "
                                "../shared/corpora/sentences/ present, or pass --sentence_files")
    seen, out = set(), []
    for path in paths:
        for line in open(path, encoding="utf-8"):
            line = line.strip()
            if line and line not in seen:
                seen.add(line)
                out.append(line)
    return out


def split_sentences(sentences: list[str], counts: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Disjoint sentence sets of the given sizes from one seeded permutation."""
    if sum(counts.values()) > len(sentences):
        raise ValueError(f"{sum(counts.values())} sentences asked for ({counts}) but only {len(sentences)} given")
    order = np.random.default_rng(seed).permutation(len(sentences))
    out, start = {}, 0
    for name, count in counts.items():
        out[name] = [sentences[i] for i in order[start: start + count]]
        start += count
    return out
