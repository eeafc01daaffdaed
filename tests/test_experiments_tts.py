"""experiments.lib.tts: sox pitch shift against a NumPy spectrum, SSML pauses in espeak-ng speech."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from encoders.audio import SAMPLE_RATE
from experiments.lib import tts


@pytest.fixture(autouse=True)
def tools():
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{missing} not installed: apt-get install -y espeak-ng sox (the README's test command does)")


def peak_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)[np.argmax(spectrum)])


@pytest.mark.parametrize("cents, factor", [(1200, 2.0), (500, 2 ** (500 / 1200)), (-700, 2 ** (-700 / 1200))])
def test_shift_pitch_moves_a_tone_by_the_cents_and_keeps_the_duration(cents, factor):
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.5 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
    shifted = tts.shift_pitch(tone, cents)
    assert shifted.dtype == np.float32 and abs(len(shifted) - len(tone)) <= SAMPLE_RATE // 100
    middle = shifted[len(shifted) // 4: 3 * len(shifted) // 4]  # away from the effect's edges
    assert peak_hz(middle) == pytest.approx(220.0 * factor, abs=4.0)


def test_ssml_break_adds_its_pause():
    plain = tts.trim_silence(tts.synthesize("one two", "en-us", 160, 50, ssml=True))
    paused = tts.trim_silence(tts.synthesize('one <break time="1000ms"/> two', "en-us", 160, 50, ssml=True))
    assert (len(paused) - len(plain)) / SAMPLE_RATE == pytest.approx(1.0, abs=0.3)
