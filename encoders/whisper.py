"""Whisper encoder (conv stem, sinusoidal positions, pre-LN transformer) in Flax NNX."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from encoders import loading
from encoders.audio import CHUNK_SECONDS, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from encoders.layers import (
    Attention,
    Conv1d,
    Dense,
    JittedEncoder,
    LayerNorm,
    activation,
    run_layers,
)
from encoders.pooling import whisper_frame_mask


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """Encoder fields of a transformers `WhisperConfig` (same names)."""

    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    activation_function: str = "gelu"

    @classmethod
    def from_dict(cls, config: dict) -> "WhisperConfig":
        """Picks the encoder fields out of a transformers config dict."""
        return loading.dataclass_from_config(cls, config)

    @classmethod
    def preset(cls, size: str) -> "WhisperConfig":
        """Encoder config of an official size: tiny, base, small, medium, large(-v2), large-v3, large-v3-turbo."""
        d, layers, heads = WHISPER_SIZES[size]
        return cls(num_mel_bins=128 if size.startswith("large-v3") else 80, d_model=d, encoder_layers=layers,
                   encoder_attention_heads=heads, encoder_ffn_dim=4 * d)


# size -> (d_model, encoder layers, heads); large-v3-turbo keeps the large-v3 encoder.
WHISPER_SIZES = {
    "tiny": (384, 4, 6), "base": (512, 6, 8), "small": (768, 12, 12), "medium": (1024, 24, 16),
    "large": (1280, 32, 20), "large-v2": (1280, 32, 20), "large-v3": (1280, 32, 20),
    "large-v3-turbo": (1280, 32, 20),
}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's sinusoidal position table (length, channels): sines then cosines."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2))
    scaled = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


class Embed(nnx.Module):
    """A fixed (positions, embed) table stored as `embedding` (torch `weight`)."""

    def __init__(self, table, param_dtype):
        self.embedding = nnx.Param(jnp.asarray(table, param_dtype), logical_axes=("positions", "embed"))


class WhisperEncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(LN(x)); x + fc2(act(fc1(LN(x))))."""

    def __init__(self, cfg: WhisperConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.encoder_attention_heads, k_bias=False, **kw)
        self.self_attn_layer_norm = LayerNorm(d, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(d, cfg.encoder_ffn_dim, ("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.encoder_ffn_dim, d, ("mlp", "embed"), **kw)
        self.final_layer_norm = LayerNorm(d, dtype=dtype, param_dtype=param_dtype)
        self.act = activation(cfg.activation_function)

    def __call__(self, x, key_mask=None):
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(JittedEncoder):
    """Whisper encoder: log-mel (B, n_mels, 3000) -> hidden states (B, 1500, d_model).

    Calling the module returns the last hidden state (after the final layer norm);
    `output_hidden_states=True` (or indices) returns transformers' tuple: the
    embeddings first, then each layer's output, the last one after the final norm.
    """

    def __init__(self, config: WhisperConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cfg = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = cfg
        self.conv1 = Conv1d(cfg.num_mel_bins, cfg.d_model, 3, padding=1, **kw)
        self.conv2 = Conv1d(cfg.d_model, cfg.d_model, 3, stride=2, padding=1, **kw)
        self.embed_positions = Embed(sinusoids(cfg.max_source_positions, cfg.d_model), param_dtype)
        self.layers = nnx.List([WhisperEncoderLayer(cfg, **kw) for _ in range(cfg.encoder_layers)])
        self.layer_norm = LayerNorm(cfg.d_model, dtype=dtype, param_dtype=param_dtype)
        self.act = activation(cfg.activation_function)
        self.num_states = cfg.encoder_layers + 1

    # Encoder protocol (encoders.extraction): pooling default, fixed input window, host front end, frame mask.
    default_pooling = "mean"  # all 1500 frames, padding included: the CLD convention
    input_samples = N_SAMPLES  # every clip is padded to the 30 s window

    def front_end(self, audio: np.ndarray, sample_mask: np.ndarray) -> np.ndarray:
        """Host front end: (B, T) 16 kHz audio -> (B, n_mels, 3000) log-mel (`sample_mask` unused)."""
        return log_mel_spectrogram(audio, n_mels=self.config.num_mel_bins)

    def encode(self, inputs, sample_mask):
        """Last hidden state of `front_end` output (Whisper attends to every frame, so the mask is not used)."""
        return self(inputs)

    def frame_mask(self, sample_mask, num_frames: int | None = None):
        """(B, frames) bool mask of the encoder frames that cover real audio."""
        return whisper_frame_mask(jnp.asarray(sample_mask).sum(-1), num_frames or self.config.max_source_positions)

    def check_lengths(self, sample_lengths, names=None) -> None:
        """Raises ValueError for clips longer than the 30 s window (they would be cut); `names` name them."""
        lengths = np.asarray(sample_lengths).reshape(-1)
        names = [f"row {i}" for i in range(len(lengths))] if names is None else list(names)
        long = [f"{name} ({n / SAMPLE_RATE:.2f} s)" for name, n in zip(names, lengths) if n > N_SAMPLES]
        if long:
            raise ValueError(f"{len(long)} clip(s) longer than Whisper's {CHUNK_SECONDS} s window: "
                             f"{', '.join(long[:10])}{', ...' if len(long) > 10 else ''}; trim or split them into "
                             f"clips of at most {CHUNK_SECONDS} s before embedding them")

    @property
    def num_frames(self) -> int:
        """Mel frames the encoder expects (3000 for 30 s)."""
        return 2 * self.config.max_source_positions

    def forward(self, mel, mask, indices):
        """Traced forward; see the class docstring. `mask` must be None (Whisper attends to all frames)."""
        if mask is not None:
            raise ValueError("Whisper's encoder takes no attention mask: it always attends to all 1500 frames")
        expected = (self.config.num_mel_bins, self.num_frames)
        if mel.ndim != 3 or mel.shape[1:] != expected:
            raise ValueError(f"expected log-mel input (batch, {expected[0]}, {expected[1]}), got {mel.shape}")
        x = jnp.swapaxes(mel, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = x + self.embed_positions.embedding.get_value().astype(x.dtype)
        return run_layers(self.layers, x, None, self.layer_norm, indices)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                        num_layers: int | None = None) -> "WhisperEncoder":
        """Loads the encoder of a Whisper checkpoint (local directory or Hub repo id).

        `num_layers` keeps only the first k transformer layers (the final layer
        norm is still applied, as transformers does for a truncated config).
        """
        model_dir = loading.resolve_model_dir(name_or_path)
        config = WhisperConfig.from_dict(loading.load_config(model_dir))
        if num_layers is not None:
            if not 1 <= num_layers <= config.encoder_layers:
                raise ValueError(f"num_layers must be in [1, {config.encoder_layers}], got {num_layers}")
            config = dataclasses.replace(config, encoder_layers=num_layers)
        tensors = loading.strip_prefix(loading.load_state_dict(model_dir), "conv1.weight")
        return loading.build_model(
            lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype), tensors,
            loading.truncated_layer("layers.", config.encoder_layers))

