"""Tiny random Whisper checkpoints with the real multilingual vocabulary, shared by the asr tests."""

from __future__ import annotations

from experiments.bench_decode import random_whisper, whisper_special_ids

whisper_ids = whisper_special_ids


def tiny_whisper_asr(path, d_model=32, layers=2, init_std=0.5, seed=0):
    """Saves a random tiny Whisper (vocabulary 51865, 64 positions, 4 heads) with its generation config.

    A large `init_std` makes the logits peaked, so greedy/beam choices are not decided by round-off.
    Returns the torch model.
    """
    return random_whisper(str(path), d_model, layers, 4, max_target_positions=64, init_std=init_std, seed=seed)
