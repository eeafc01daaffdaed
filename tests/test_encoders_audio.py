"""Front ends: Whisper log-mel and wav2vec2 normalisation against transformers, input validation."""

import os
import shutil
import subprocess
import wave

import numpy as np
import pytest
import transformers

from encoders import audio

# the project's own shipped sentences: a fresh clone has nothing beside it
SENTENCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "data",
                         "tts_sentences", "en.txt")


def espeak(tmp_path, text: str) -> tuple[np.ndarray, int]:
    """Synthesises `text` with espeak-ng; returns float audio and its rate (22050 Hz)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: apt-get install -y espeak-ng (the README's test command does)")
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    with wave.open(str(path)) as f:
        rate, pcm = f.getframerate(), np.frombuffer(f.readframes(f.getnframes()), np.int16)
    return audio.pcm_to_float(pcm), rate


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    with open(SENTENCES) as f:
        text = " ".join(line.strip() for _, line in zip(range(3), f))
    pcm, rate = espeak(tmp_path_factory.mktemp("tts"), text)
    assert rate == 22050
    return audio.prepare_audio(pcm, rate)


def hf_features(x, n_mels=80):
    extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    return extractor(x, sampling_rate=16000, return_tensors="np").input_features[0]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_feature_extractor_on_speech(speech, n_mels):
    ours = audio.log_mel_spectrogram(speech, n_mels=n_mels)
    assert ours.shape == (n_mels, 3000) and ours.dtype == np.float32
    err = np.abs(ours - hf_features(speech, n_mels)).max()
    print(f"log-mel ({n_mels} bins) max error on espeak speech ({len(speech) / 16000:.1f} s): {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("clip", ["silence", "short", "long"])
def test_log_mel_matches_on_edge_cases(clip):
    rng = np.random.default_rng(0)
    x = {"silence": np.zeros(16000, np.float32), "short": 0.1 * rng.standard_normal(1600).astype(np.float32),
         "long": 0.1 * rng.standard_normal(16000 * 33).astype(np.float32)}[clip]
    ours = audio.log_mel_spectrogram(x, truncate=clip == "long")
    assert np.abs(ours - hf_features(x)).max() < 1e-4


def test_log_mel_batched_equals_single(speech):
    batch = np.stack([audio.pad_or_trim(speech, 16000 * 30), np.zeros(16000 * 30, np.float32)])
    out = audio.log_mel_spectrogram(batch)
    assert out.shape == (2, 80, 3000)
    np.testing.assert_allclose(out[0], audio.log_mel_spectrogram(speech), atol=1e-6)


def test_normalize_matches_wav2vec2_feature_extractor():
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.3 + 0.1 for n in (4000, 2500)]
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    ref = extractor(clips, sampling_rate=16000, padding=True, return_tensors="np")
    ours = audio.normalize(np.stack([clips[0], np.pad(clips[1], (0, 1500))]), ref.attention_mask)
    assert np.abs(ours - ref.input_values).max() < 1e-5
    single = audio.normalize(clips[0])
    assert abs(single.mean()) < 1e-5 and abs(single.std() - 1) < 1e-3


def test_resampling_preserves_a_tone():
    t = np.arange(44100) / 44100
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = audio.prepare_audio(np.stack([tone, tone], axis=1), 44100, channels_axis=1)
    assert out.shape == (16000,)
    expected = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(out[100:-100] - expected[100:-100]).max() < 1e-2


def test_bad_inputs_raise_clear_errors():
    good = np.zeros(16000, np.float32)
    with pytest.raises(ValueError, match="mono"):
        audio.log_mel_spectrogram(np.zeros((16000, 2), np.float32).T[None])
    with pytest.raises(ValueError, match="mono"):
        audio.normalize(np.zeros((2, 3, 16000), np.float32))
    with pytest.raises(TypeError, match="pcm_to_float"):
        audio.log_mel_spectrogram(np.zeros(16000, np.int16))
    with pytest.raises(ValueError, match="empty"):
        audio.log_mel_spectrogram(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        audio.normalize(np.full(100, np.nan, np.float32))
    with pytest.raises(ValueError, match="16000 Hz"):
        audio.log_mel_spectrogram(good, sampling_rate=8000)
    with pytest.raises(ValueError, match="longer than Whisper's 30 s"):
        audio.log_mel_spectrogram(np.zeros(16000 * 31, np.float32))
    assert audio.pcm_to_float(np.array([-32768, 16384], np.int16)).tolist() == [-1.0, 0.5]
