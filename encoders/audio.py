"""Audio front ends in numpy: validation, resampling, Whisper log-mel, wav2vec2 normalisation.

Conventions: audio is float (float32/float64) PCM in [-1, 1], mono, 16 kHz.
`prepare_audio` converts other rates / channel layouts; the feature functions
take 16 kHz mono only and raise clear errors otherwise. Integer PCM is rejected
(convert it with `pcm_to_float`), as are empty clips and NaN/inf samples.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples -> 3000 mel frames


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    """Integer PCM (int16/int32/uint8) to float32 in [-1, 1)."""
    pcm = np.asarray(pcm)
    if pcm.dtype == np.uint8:
        return (pcm.astype(np.float32) - 128.0) / 128.0
    if not np.issubdtype(pcm.dtype, np.signedinteger):
        raise TypeError(f"expected integer PCM, got {pcm.dtype}")
    return pcm.astype(np.float32) / float(-np.iinfo(pcm.dtype).min)


def validate_audio(audio, *, batched: bool = False) -> np.ndarray:
    """Checks float mono audio ((T,), or (B, T) when `batched`) and returns it as float32.

    Raises TypeError for integer PCM and ValueError for extra channel axes,
    empty clips and non-finite samples.
    """
    audio = np.asarray(audio)
    if np.issubdtype(audio.dtype, np.integer):
        raise TypeError(f"audio is integer PCM ({audio.dtype}); convert it with encoders.audio.pcm_to_float")
    if not np.issubdtype(audio.dtype, np.floating):
        raise TypeError(f"audio must be a float array, got {audio.dtype}")
    ndim = 2 if batched else 1
    if audio.ndim != ndim:
        shape = "(batch, samples)" if batched else "(samples,)"
        raise ValueError(f"expected mono audio of shape {shape}, got {audio.shape}; downmix multi-channel "
                         "audio with encoders.audio.prepare_audio(audio, sampling_rate, channels_axis=...)")
    if audio.shape[-1] == 0:
        raise ValueError("audio is empty")
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or infinite samples")
    return audio.astype(np.float32)


def resample(audio: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase (Kaiser-windowed sinc) resampling along the last axis."""
    from math import gcd

    from scipy.signal import resample_poly

    if orig_rate == target_rate:
        return np.asarray(audio, np.float32)
    g = gcd(int(orig_rate), int(target_rate))
    return resample_poly(audio, target_rate // g, orig_rate // g, axis=-1).astype(np.float32)


def prepare_audio(audio, sampling_rate: int, channels_axis: int | None = None) -> np.ndarray:
    """Any-rate float or integer PCM, optionally multi-channel, to validated 16 kHz mono float32.

    `channels_axis` names the channel axis of multi-channel input (averaged).
    """
    audio = np.asarray(audio)
    if np.issubdtype(audio.dtype, np.integer):
        audio = pcm_to_float(audio)
    if channels_axis is not None:
        audio = audio.mean(axis=channels_axis)
    audio = validate_audio(audio)
    return validate_audio(resample(audio, sampling_rate))


def _check_rate(sampling_rate: int) -> None:
    if sampling_rate != SAMPLE_RATE:
        raise ValueError(f"expected {SAMPLE_RATE} Hz audio, got {sampling_rate} Hz; "
                         "resample with encoders.audio.prepare_audio(audio, sampling_rate)")


def _hz_to_mel(freq):
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, np.float64)
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * 27.0 / np.log(6.4), mels)


def _mel_to_hz(mels):
    mels = np.asarray(mels, np.float64)
    freq = 200.0 * mels / 3.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0)), freq)


def mel_filters(n_mels: int, n_fft: int = N_FFT, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-normalised triangular mel filter bank (n_fft // 2 + 1, n_mels), 0-8 kHz, as Whisper uses."""
    fft_freqs = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
    filter_freqs = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sampling_rate / 2), n_mels + 2))
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels]))


def pad_or_trim(audio: np.ndarray, length: int = N_SAMPLES, *, truncate: bool = False) -> np.ndarray:
    """Zero-pads (or with `truncate`, trims) the last axis to `length`; longer input raises otherwise."""
    n = audio.shape[-1]
    if n > length and not truncate:
        raise ValueError(f"audio is {n / SAMPLE_RATE:.2f} s, longer than Whisper's {length / SAMPLE_RATE:.0f} s "
                         "window; split it into chunks or pass truncate=True to keep the first 30 s")
    if n >= length:
        return audio[..., :length]
    return np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, length - n)])


def log_mel_spectrogram(audio, n_mels: int = 80, *, sampling_rate: int = SAMPLE_RATE,
                        truncate: bool = False) -> np.ndarray:
    """Whisper log-mel features of 16 kHz mono audio, padded to 30 s: (n_mels, 3000) or (B, n_mels, 3000).

    Equal to transformers' `WhisperFeatureExtractor` (same STFT, Slaney mel bank,
    log10, max - 8 clipping, (x + 4) / 4). Clips longer than 30 s raise unless
    `truncate=True`, which keeps the first 30 s like the feature extractor.
    """
    _check_rate(sampling_rate)
    audio = np.asarray(audio)
    batched = audio.ndim == 2
    audio = pad_or_trim(validate_audio(audio, batched=batched).astype(np.float64), truncate=truncate)
    x = np.atleast_2d(audio)
    x = np.pad(x, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    n_frames = 1 + (x.shape[-1] - N_FFT) // HOP_LENGTH
    idx = np.arange(N_FFT)[None, :] + HOP_LENGTH * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    power = np.abs(np.fft.rfft(x[:, idx] * window, axis=-1)) ** 2  # (B, frames, freqs)
    mel = power[:, :-1] @ mel_filters(n_mels)  # drop the last frame, as Whisper does
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max(axis=(1, 2), keepdims=True) - 8.0)
    log_spec = ((log_spec + 4.0) / 4.0).transpose(0, 2, 1).astype(np.float32)
    return log_spec if batched else log_spec[0]


def normalize(audio, attention_mask=None, *, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """wav2vec2 zero-mean unit-variance normalisation of (T,) or (B, T) 16 kHz audio.

    With a (B, T) `attention_mask` the statistics use real samples only and
    padding is set to 0, as in transformers' `Wav2Vec2FeatureExtractor`.
    """
    _check_rate(sampling_rate)
    audio = np.asarray(audio)
    x = np.atleast_2d(validate_audio(audio, batched=audio.ndim == 2))
    mask = np.ones(x.shape, bool) if attention_mask is None else np.atleast_2d(np.asarray(attention_mask, bool))
    if mask.shape != x.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match audio shape {x.shape}")
    out = np.zeros_like(x)
    for i, (row, m) in enumerate(zip(x, mask)):
        real = row[m]
        out[i, m] = (real - real.mean()) / np.sqrt(real.var() + 1e-7)
    return out if audio.ndim == 2 else out[0]
