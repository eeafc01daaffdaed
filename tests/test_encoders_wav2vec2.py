"""Parity of encoders.wav2vec2 with transformers' PyTorch Wav2Vec2 (base, XLS-R and MMS styles)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from encoders_testutil import TOL, max_err, random_audio, tiny_wav2vec2
from flax import nnx

from encoders import layers, wav2vec2


@pytest.fixture(scope="module", params=["base", "xlsr", "mms"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, str(path), tiny_wav2vec2(path, request.param)


def padded_batch():
    audio = random_audio(3, 4000)
    mask = np.ones_like(audio, dtype=np.int64)
    mask[1, 2500:] = 0
    mask[2, 1200:] = 0
    return wav2vec2.normalize(audio, mask), mask


def reference(model, audio, mask=None):
    """transformers' outputs; hidden_states end with last_hidden_state (after the final layer norm).

    transformers 5.x returns the last layer's output *before* the final layer
    norm as hidden_states[-1] for wav2vec2 (tie_last_hidden_states=False); the
    encoders convention (and transformers 4.x) ends with the normed state.
    """
    with torch.no_grad():
        out = model.wav2vec2(torch.from_numpy(audio), attention_mask=None if mask is None else
                             torch.from_numpy(mask), output_hidden_states=True)
    out.hidden_states = out.hidden_states[:-1] + (out.last_hidden_state,)
    return out


def test_hidden_states_match(checkpoint):
    style, path, ref = checkpoint
    enc = wav2vec2.Wav2Vec2Encoder.from_pretrained(path)
    audio = random_audio()
    out = reference(ref, audio)
    assert max_err(enc(audio), out.last_hidden_state) < TOL
    states = enc(audio, output_hidden_states=True)
    assert len(states) == len(out.hidden_states) == 4
    errors = [max_err(a, b) for a, b in zip(states, out.hidden_states)]
    print(f"{style} hidden-state max errors:", errors)
    assert max(errors) < TOL


def test_padded_batch_with_attention_mask(checkpoint):
    style, path, ref = checkpoint
    enc = wav2vec2.Wav2Vec2Encoder.from_pretrained(path)
    audio, mask = padded_batch()
    out = reference(ref, audio, mask)
    states = enc(audio, attention_mask=mask, output_hidden_states=True)
    errors = [max_err(a, b) for a, b in zip(states, out.hidden_states)]
    print(f"{style} padded-batch max errors:", errors)
    assert max(errors) < TOL
    frames = enc.frame_mask(mask, states[-1].shape[1])
    expected = ref.wav2vec2._get_feature_vector_attention_mask(states[-1].shape[1], torch.from_numpy(mask))
    np.testing.assert_array_equal(np.asarray(frames), expected.numpy())


def test_truncation_matches_truncated_transformers(checkpoint):
    style, path, _ = checkpoint
    enc = wav2vec2.Wav2Vec2Encoder.from_pretrained(path, num_layers=2)
    ref = transformers.Wav2Vec2ForCTC.from_pretrained(path, num_hidden_layers=2).eval()
    audio, mask = padded_batch()
    out = reference(ref, audio, mask)
    states = enc(audio, attention_mask=mask, output_hidden_states=True)
    assert len(states) == 3
    assert max(max_err(a, b) for a, b in zip(states, out.hidden_states)) < TOL


def test_mms_adapter_swap_matches_and_does_not_recompile(tmp_path):
    ref = tiny_wav2vec2(tmp_path, "mms")
    ref = transformers.Wav2Vec2ForCTC.from_pretrained(str(tmp_path)).eval()
    enc = wav2vec2.Wav2Vec2Encoder.from_pretrained(str(tmp_path))
    audio, mask = padded_batch()
    before = np.asarray(enc(audio, attention_mask=mask))
    for lang in ("eng", "fra", "eng"):
        enc.load_adapter(lang)
        ref.load_adapter(lang)
        out = reference(ref, audio, mask)
        err = max(max_err(a, b) for a, b in zip(enc(audio, attention_mask=mask, output_hidden_states=True),
                                                out.hidden_states))
        print(f"mms adapter {lang}: max error {err:.2e}")
        assert err < TOL
    assert not np.allclose(before, np.asarray(enc(audio, attention_mask=mask)))
    compiled = layers._compiled_forward(nnx.graphdef(enc), None)
    entries = layers._compiled_forward.cache_info().currsize
    assert compiled._cache_size() == 1
    enc.load_adapter(str(tmp_path / "adapter.fra.safetensors"))
    enc(audio, attention_mask=mask)
    assert compiled._cache_size() == 1
    assert layers._compiled_forward.cache_info().currsize == entries


def test_adapter_errors(tmp_path, checkpoint):
    style, path, _ = checkpoint
    enc = wav2vec2.Wav2Vec2Encoder.from_pretrained(path)
    if style != "mms":
        with pytest.raises(ValueError, match="no adapter"):
            enc.load_adapter("eng")
    else:
        with pytest.raises(FileNotFoundError, match="adapter.xyz"):
            enc.load_adapter("xyz")


def test_bf16_error_is_small(checkpoint):
    style, path, ref = checkpoint
    audio = random_audio(1)
    expected = reference(ref, audio).last_hidden_state
    enc = wav2vec2.Wav2Vec2Encoder.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    err = max_err(enc(audio), expected)
    print(f"{style} bf16 params+compute: max abs error {err:.4f} (output std {float(expected.std()):.3f})")
    assert err < 0.25


def test_rejects_wrong_rank(checkpoint):
    enc = wav2vec2.Wav2Vec2Encoder.from_pretrained(checkpoint[1])
    with pytest.raises(ValueError, match="batch, samples"):
        enc(random_audio(1)[0])


@pytest.mark.parametrize("kernels, strides", [((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)),  # wav2vec2/XLS-R/MMS
                                              ((10, 3, 2), (5, 2, 2)), ((7, 4, 3), (3, 3, 2))])
def test_clips_under_one_frame_raise(kernels, strides):
    """The minimum length is the fewest samples for which transformers' conv arithmetic gives one frame; shorter
    input raises (alone, or as a masked row of a batch) instead of giving no frames."""
    config = transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16, conv_dim=(8,) * len(kernels), conv_kernel=kernels,
                                         conv_stride=strides, num_conv_pos_embeddings=4,
                                         num_conv_pos_embedding_groups=2, feat_extract_norm="layer")
    ref = transformers.Wav2Vec2Model(config).eval()
    frames = ref._get_feat_extract_output_lengths(torch.arange(1, 2000))
    need = int(torch.nonzero(frames >= 1)[0]) + 1
    enc = wav2vec2.Wav2Vec2Encoder(wav2vec2.Wav2Vec2Config.from_dict(config.to_dict()), rngs=nnx.Rngs(0))
    assert enc.min_samples == need
    with torch.no_grad():
        ref_frames = ref(torch.from_numpy(random_audio(1, need))).last_hidden_state.shape[1]
    assert enc(random_audio(1, need)).shape[1] == ref_frames == 1
    with pytest.raises(ValueError, match=rf"row 0 \({need - 1} samples\).*Zero-pad .* at least {need} samples"):
        enc(random_audio(1, need - 1))
    mask = np.ones((2, need + 50), bool)
    mask[1, need - 1:] = False
    with pytest.raises(ValueError, match=rf"1 clip\(s\) shorter than the {need} samples.*row 1 \({need - 1} samples\)"):
        enc(random_audio(2, need + 50), attention_mask=mask)
