"""Parity of asr.whisper_decoder with transformers' PyTorch WhisperDecoder."""

import numpy as np
import pytest
import torch
from asr_testutil import tiny_whisper_asr

from asr.whisper_decoder import WhisperDecoder
from encoders.whisper import WhisperEncoder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper_asr")
    return str(path), tiny_whisper_asr(path)


def test_decoder_logits_match_transformers(checkpoint):
    path, ref = checkpoint
    dec = WhisperDecoder.from_pretrained(path)
    enc = WhisperEncoder.from_pretrained(path)
    mel = np.random.default_rng(0).standard_normal((2, 80, 3000)).astype(np.float32)
    tokens = np.array([[50258, 50259, 50359, 50363, 440, 1000, 7],
                       [50258, 50260, 50359, 50363, 3, 99, 50257]], np.int64)
    with torch.no_grad():
        out = ref(input_features=torch.from_numpy(mel), decoder_input_ids=torch.from_numpy(tokens))
    logits = np.asarray(dec(tokens, enc(mel)))
    err = float(np.abs(logits - out.logits.numpy()).max())
    print(f"decoder logits max abs error {err:.2e} (logit std {float(out.logits.std()):.2f})")
    assert err < 1e-4
