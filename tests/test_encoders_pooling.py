"""Pooling conventions."""

import numpy as np

from encoders import pooling


def hidden():
    return np.arange(2 * 100 * 3, dtype=np.float32).reshape(2, 100, 3)


def test_mean_pool_includes_padding():
    h = hidden()
    np.testing.assert_allclose(pooling.mean_pool(h), h.mean(1), rtol=1e-6)


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
