"""Parity of encoders.whisper with transformers' PyTorch WhisperEncoder."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from encoders_testutil import TOL, max_err, tiny_whisper

from encoders import whisper


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper")
    return str(path), tiny_whisper(path)


def mel(batch=2, n_mels=80, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, n_mels, 3000)).astype(np.float32)


def test_last_and_all_hidden_states_match(checkpoint):
    path, ref = checkpoint
    enc = whisper.WhisperEncoder.from_pretrained(path)
    x = mel()
    with torch.no_grad():
        out = ref(torch.from_numpy(x), output_hidden_states=True)
    assert enc(x).shape == (2, 1500, 32)
    assert max_err(enc(x), out.last_hidden_state) < TOL
    states = enc(x, output_hidden_states=True)
    assert len(states) == len(out.hidden_states) == 3
    errors = [max_err(a, b) for a, b in zip(states, out.hidden_states)]
    print("whisper hidden-state max errors:", errors)
    assert max(errors) < TOL
    picked = enc(x, output_hidden_states=[0, -1])
    assert max_err(picked[0], out.hidden_states[0]) < TOL and max_err(picked[1], out.hidden_states[-1]) < TOL


def test_128_mel_bins(tmp_path):
    ref = tiny_whisper(tmp_path, num_mel_bins=128)
    enc = whisper.WhisperEncoder.from_pretrained(str(tmp_path))
    x = mel(1, 128)
    with torch.no_grad():
        assert max_err(enc(x), ref(torch.from_numpy(x)).last_hidden_state) < TOL


def test_truncation_matches_truncated_transformers(checkpoint):
    path, _ = checkpoint
    enc = whisper.WhisperEncoder.from_pretrained(path, num_layers=1)
    ref = transformers.WhisperModel.from_pretrained(path, encoder_layers=1).encoder.eval()
    x = mel(1)
    with torch.no_grad():
        out = ref(torch.from_numpy(x), output_hidden_states=True)
    states = enc(x, output_hidden_states=True)
    assert len(states) == 2
    assert max(max_err(a, b) for a, b in zip(states, out.hidden_states)) < TOL


def test_bf16_error_is_small(checkpoint):
    path, ref = checkpoint
    x = mel(1)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).last_hidden_state
    for param_dtype in (jnp.float32, jnp.bfloat16):
        enc = whisper.WhisperEncoder.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=param_dtype)
        out = enc(x)
        assert out.dtype == jnp.bfloat16
        err = max_err(out, expected)
        print(f"whisper bf16 compute, {jnp.dtype(param_dtype).name} params: max abs error {err:.4f} "
              f"(output std {float(expected.std()):.3f})")
        assert err < 0.1


def test_rejects_wrong_input(checkpoint):
    enc = whisper.WhisperEncoder.from_pretrained(checkpoint[0])
    with pytest.raises(ValueError, match="3000"):
        enc(np.zeros((1, 80, 2000), np.float32))
    with pytest.raises(ValueError, match="attention mask"):
        enc(mel(1), attention_mask=np.ones((1, 3000)))
    with pytest.raises(ValueError, match="num_layers"):
        whisper.WhisperEncoder.from_pretrained(checkpoint[0], num_layers=5)


def test_presets_cover_official_sizes():
    assert whisper.WhisperConfig.preset("small").d_model == 768
    assert whisper.WhisperConfig.preset("large-v3-turbo").num_mel_bins == 128
    assert whisper.WhisperConfig.preset("tiny").num_mel_bins == 80
