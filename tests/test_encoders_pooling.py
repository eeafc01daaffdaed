"""Pooling conventions."""

import numpy as np

from encoders import pooling


def hidden():
    return np.arange(2 * 100 * 3, dtype=np.float32).reshape(2, 100, 3)


def test_mean_pool_is_the_published_heads_convention():
    """`mean_pool` is what the released jaxcld heads were trained on: their own torch pooling of the encoder
    output (`NNLangDetectHeadModule.forward`, classifier removed), all frames, padding included."""
    import torch
    from jaxcld.models.lang_detect_head import NNLangDetectHeadModule

    published = NNLangDetectHeadModule(d_model=3).eval()
    published.classifier = torch.nn.Identity()
    h = np.random.default_rng(0).standard_normal((2, 1500, 3)).astype(np.float32)
    h[:, 200:] += 5.0  # "padding" frames that differ from the speech frames
    with torch.no_grad():
        reference = published(torch.from_numpy(h)).numpy()
    np.testing.assert_allclose(pooling.mean_pool(h), reference, rtol=1e-5, atol=1e-6)
    assert not np.allclose(reference, h[:, :200].mean(1), atol=1.0)  # the padding counts


def test_masked_mean_pool_uses_real_frames():
    h = hidden()
    mask = np.zeros((2, 100), bool)
    mask[0, :10] = True
    out = np.asarray(pooling.masked_mean_pool(h, mask))
    np.testing.assert_allclose(out[0], h[0, :10].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0)


def test_span_mean_pool_seconds_to_frames():
    h = hidden()
    spans = np.array([[[0.0, 0.1], [0.5, 0.5], [1.9, 5.0]]] * 2, np.float32)
    out = np.asarray(pooling.span_mean_pool(h, spans))
    np.testing.assert_allclose(out[0, 0], h[0, 0:5].mean(0), rtol=1e-6)  # 50 frames per second
    np.testing.assert_allclose(out[0, 1], h[0, 25], rtol=1e-6)  # empty span -> one frame
    np.testing.assert_allclose(out[1, 2], h[1, 95:100].mean(0), rtol=1e-6)  # clipped to the clip end
