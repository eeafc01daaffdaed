"""Pooling of encoder hidden states (B, T, D) into utterance or span vectors."""

from __future__ import annotations

import jax.numpy as jnp

FRAMES_PER_SECOND = 50.0  # Whisper: 1500 frames / 30 s; wav2vec2: 20 ms stride


def mean_pool(hidden):
    """Mean over all frames, padding included (B, T, D) -> (B, D).

    This is the CLD convention: Whisper heads were trained on the mean of all
    1500 frames of the 30 s window, so published heads expect it.
    """
    return jnp.mean(hidden.astype(jnp.float32), axis=1)


WHISPER_SAMPLES_PER_FRAME = 320  # 16 kHz, hop 160, conv stride 2


def whisper_frame_mask(num_samples, num_frames: int = 1500):
    """(B, T) True for the Whisper encoder frames that cover real audio of `num_samples` (B,) 16 kHz samples."""
    starts = jnp.arange(num_frames) * WHISPER_SAMPLES_PER_FRAME
    return starts[None, :] < jnp.asarray(num_samples)[:, None]


def masked_mean_pool(hidden, frame_mask):
    """Mean over real frames only: `frame_mask` (B, T) is True for real frames -> (B, D).

    A row without real frames pools to zeros, so wav2vec2 callers refuse clips shorter than one frame
    first (`Wav2Vec2Encoder.check_lengths`).
    """
    mask = jnp.asarray(frame_mask, jnp.float32)
    total = jnp.einsum("btd,bt->bd", hidden.astype(jnp.float32), mask)
    return total / jnp.maximum(mask.sum(1), 1.0)[:, None]


def span_frames(spans, num_frames: int, frames_per_second: float = FRAMES_PER_SECOND):
    """Frame ranges [start, end) for time spans in seconds (..., 2), each at least one frame, clipped to T."""
    spans = jnp.asarray(spans, jnp.float32)
    start = jnp.clip(jnp.floor(spans[..., 0] * frames_per_second), 0, num_frames - 1).astype(jnp.int32)
    end = jnp.ceil(spans[..., 1] * frames_per_second).astype(jnp.int32)
    end = jnp.clip(jnp.maximum(end, start + 1), 1, num_frames)
    return start, end


def span_mean_pool(hidden, spans, frames_per_second: float = FRAMES_PER_SECOND):
    """Mean of the frames inside each time span: hidden (B, T, D), spans (B, S, 2) seconds -> (B, S, D)."""
    start, end = span_frames(spans, hidden.shape[1], frames_per_second)
    t = jnp.arange(hidden.shape[1])
    weights = ((t >= start[..., None]) & (t < end[..., None])).astype(jnp.float32)  # (B, S, T)
    weights = weights / weights.sum(-1, keepdims=True)
    return jnp.einsum("bst,btd->bsd", weights, hidden.astype(jnp.float32))
