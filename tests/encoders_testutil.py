"""Tiny random transformers models saved to disk, shared by the encoders tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

TOL = 1e-4


def tiny_whisper(path, num_mel_bins=80, layers=2):
    """Saves a random tiny WhisperForConditionalGeneration to `path`; returns the torch encoder."""
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        d_model=32, encoder_layers=layers, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=32, num_mel_bins=num_mel_bins, vocab_size=64,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    return model.model.encoder


W2V_COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                  conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 2),
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=12)
STYLES = {
    "base": dict(feat_extract_norm="group", conv_bias=False, do_stable_layer_norm=False),
    "xlsr": dict(feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True),
    "mms": dict(feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True, adapter_attn_dim=8),
}


def tiny_wav2vec2(path, style: str, languages=("eng", "fra")):
    """Saves a random tiny Wav2Vec2ForCTC of `style` (base/xlsr/mms) to `path`, with MMS adapter files.

    Returns the torch model (ForCTC; its `.wav2vec2` is the reference encoder).
    """
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**W2V_COMMON, **STYLES[style])).eval()
    model.save_pretrained(path)
    if style == "mms":
        for i, lang in enumerate(languages):
            gen = torch.Generator().manual_seed(100 + i)
            weights = {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in model._get_adapters().items()}
            save_file(weights, f"{path}/adapter.{lang}.safetensors")
    return model


def random_audio(batch=2, samples=4000, seed=0):
    """Random float32 audio (batch, samples)."""
    return np.random.default_rng(seed).standard_normal((batch, samples)).astype(np.float32)


def max_err(ours, ref) -> float:
    """Max absolute difference between a JAX/numpy array and a torch tensor."""
    return float(np.max(np.abs(np.asarray(ours, np.float32) - ref.detach().float().numpy())))
