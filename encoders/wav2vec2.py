"""wav2vec2-family encoder (wav2vec2-base, XLS-R, MMS with language adapters) in Flax NNX."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from encoders import loading
from encoders.audio import SAMPLE_RATE, normalize
from encoders.layers import (
    Attention,
    Conv1d,
    Dense,
    JittedEncoder,
    LayerNorm,
    activation,
    run_layers,
)


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
    """Encoder fields of a transformers `Wav2Vec2Config` (same names; lists become tuples)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    adapter_attn_dim: int | None = None

    @classmethod
    def from_dict(cls, config: dict) -> "Wav2Vec2Config":
        """Picks the encoder fields out of a transformers config dict."""
        if config.get("add_adapter"):
            raise NotImplementedError("the wav2vec2 output adapter (add_adapter=True) is not supported")
        return loading.dataclass_from_config(cls, config)


class ChannelNorm(nnx.Module):
    """GroupNorm with one group per channel on (B, T, C): normalises each channel over time."""

    def __init__(self, dim, *, eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("conv_out",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("conv_out",))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(1, keepdims=True)
        var = jnp.square(x32 - mean).mean(1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)).astype(self.dtype)


class FeatureConvLayer(nnx.Module):
    """conv -> optional norm (layer norm over channels, or per-channel group norm) -> activation."""

    def __init__(self, cfg: Wav2Vec2Config, i: int, norm: str | None, *, rngs, dtype, param_dtype):
        d_in = cfg.conv_dim[i - 1] if i else 1
        d_out = cfg.conv_dim[i]
        self.conv = Conv1d(d_in, d_out, cfg.conv_kernel[i], stride=cfg.conv_stride[i], use_bias=cfg.conv_bias,
                           rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if norm == "layer":
            self.layer_norm = LayerNorm(d_out, names=("conv_out",), dtype=dtype, param_dtype=param_dtype)
        elif norm == "group":
            self.layer_norm = ChannelNorm(d_out, dtype=dtype, param_dtype=param_dtype)
        else:
            self.layer_norm = None
        self.act = activation(cfg.feat_extract_activation)

    def __call__(self, x):
        x = self.conv(x)
        return self.act(x if self.layer_norm is None else self.layer_norm(x))


class FeatureEncoder(nnx.Module):
    """Convolutional feature encoder: raw audio (B, T, 1) -> (B, frames, conv_dim[-1])."""

    def __init__(self, cfg: Wav2Vec2Config, **kw):
        if cfg.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got {cfg.feat_extract_norm!r}")
        norms = [cfg.feat_extract_norm if (cfg.feat_extract_norm == "layer" or i == 0) else None
                 for i in range(len(cfg.conv_dim))]
        self.conv_layers = nnx.List([FeatureConvLayer(cfg, i, norm, **kw) for i, norm in enumerate(norms)])

    def __call__(self, x):
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nnx.Module):
    """LayerNorm then linear projection from conv channels to the hidden size."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs, dtype, param_dtype):
        self.layer_norm = LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps, names=("conv_out",), dtype=dtype,
                                    param_dtype=param_dtype)
        self.projection = Dense(cfg.conv_dim[-1], cfg.hidden_size, ("conv_out", "embed"), rngs=rngs, dtype=dtype,
                                param_dtype=param_dtype)

    def __call__(self, x):
        return self.projection(self.layer_norm(x))


class PositionalConvEmbedding(nnx.Module):
    """Grouped 'same' convolution over time; weight norm is folded into `conv.kernel` at load time."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs, dtype, param_dtype):
        k = cfg.num_conv_pos_embeddings
        self.conv = Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2,
                           groups=cfg.num_conv_pos_embedding_groups, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remove_last = k % 2 == 0
        self.act = activation(cfg.feat_extract_activation)

    def __call__(self, x):
        y = self.conv(x)
        return self.act(y[:, :-1] if self.remove_last else y)


class FeedForward(nnx.Module):
    """intermediate_dense -> activation -> output_dense."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.intermediate_dense = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.output_dense = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.output_dense(self.act(self.intermediate_dense(x)))


class AttnAdapterLayer(nnx.Module):
    """MMS language adapter: LayerNorm -> linear -> ReLU -> linear (added after the feed-forward residual)."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = LayerNorm(cfg.hidden_size, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = Dense(cfg.hidden_size, cfg.adapter_attn_dim, ("embed", "adapter"), **kw)
        self.linear_2 = Dense(cfg.adapter_attn_dim, cfg.hidden_size, ("adapter", "embed"), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.relu(self.linear_1(self.norm(x))))


class EncoderLayer(nnx.Module):
    """Transformer layer, post-LN (wav2vec2-base) or stable/pre-LN (XLS-R, MMS, with optional adapter)."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.attention = Attention(cfg.hidden_size, cfg.num_attention_heads, **kw)
        self.layer_norm = LayerNorm(cfg.hidden_size, **norm)
        self.feed_forward = FeedForward(cfg, **kw)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, **norm)
        self.stable = cfg.do_stable_layer_norm
        use_adapter = cfg.do_stable_layer_norm and cfg.adapter_attn_dim is not None
        self.adapter_layer = AttnAdapterLayer(cfg, **kw) if use_adapter else None

    def __call__(self, x, key_mask=None):
        if not self.stable:
            x = self.layer_norm(x + self.attention(x, key_mask))
            return self.final_layer_norm(x + self.feed_forward(x))
        x = x + self.attention(self.layer_norm(x), key_mask)
        x = x + self.feed_forward(self.final_layer_norm(x))
        return x if self.adapter_layer is None else x + self.adapter_layer(x)


class TransformerEncoder(nnx.Module):
    """Positional convolution, layer norm and the stack of transformer layers."""

    def __init__(self, cfg: Wav2Vec2Config, **kw):
        self.pos_conv_embed = PositionalConvEmbedding(cfg, **kw)
        self.layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=kw["dtype"],
                                    param_dtype=kw["param_dtype"])
        self.layers = nnx.List([EncoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
        self.stable = cfg.do_stable_layer_norm

    def __call__(self, x, frame_mask, indices):
        if frame_mask is not None:
            x = jnp.where(frame_mask[..., None], x, 0)
        x = x + self.pos_conv_embed(x)
        if not self.stable:
            return run_layers(self.layers, self.layer_norm(x), frame_mask, None, indices)
        return run_layers(self.layers, x, frame_mask, self.layer_norm, indices)


class Wav2Vec2Encoder(JittedEncoder):
    """wav2vec2 / XLS-R / MMS encoder: normalised 16 kHz audio (B, T) -> hidden states (B, frames, hidden).

    `attention_mask` is a (B, T) sample mask (1 = real audio) as in transformers.
    Calling returns the last hidden state; `output_hidden_states=True` (or
    indices) returns transformers' tuple: embeddings first, each layer's output,
    the last entry after the final layer norm for stable-layer-norm models.
    """

    def __init__(self, config: Wav2Vec2Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.feature_extractor = FeatureEncoder(config, **kw)
        self.feature_projection = FeatureProjection(config, **kw)
        self.encoder = TransformerEncoder(config, **kw)
        self.num_states = config.num_hidden_layers + 1
        self.source: str | None = None  # checkpoint directory or repo id, for load_adapter

    def __call__(self, inputs, attention_mask=None, output_hidden_states=False):
        """Hidden states as `JittedEncoder.__call__`, after `check_lengths` on the rows of a concrete
        `attention_mask` (on the padded length only inside an outer jit, where the mask is traced, or for a mask
        spread over several processes, which callers check on the host)."""
        if attention_mask is None or isinstance(attention_mask, jax.core.Tracer) or (
                isinstance(attention_mask, jax.Array) and not attention_mask.is_fully_addressable):
            self.check_lengths([np.shape(inputs)[-1]])
        else:
            self.check_lengths(np.asarray(attention_mask).sum(-1))
        return super().__call__(inputs, attention_mask, output_hidden_states)

    # Encoder protocol (encoders.extraction): pooling default, variable input length, host front end, frame mask.
    default_pooling = "masked_mean"  # real frames only
    input_samples = None  # clips are padded to the longest of the run

    def front_end(self, audio: np.ndarray, sample_mask: np.ndarray) -> np.ndarray:
        """Host front end: zero-mean unit-variance normalisation over each clip's real samples."""
        return normalize(audio, sample_mask)

    def encode(self, inputs, sample_mask):
        """Last hidden state of `front_end` output, attending to real samples only."""
        return self(inputs, attention_mask=sample_mask)

    def frame_lengths(self, sample_lengths):
        """Number of encoder frames produced from `sample_lengths` samples (conv arithmetic)."""
        lengths = jnp.asarray(sample_lengths)
        for k, s in zip(self.config.conv_kernel, self.config.conv_stride):
            lengths = (lengths - k) // s + 1
        return lengths

    @property
    def min_samples(self) -> int:
        """Fewest samples that give one encoder frame: the feature encoder's receptive field, the conv
        arithmetic of `frame_lengths` run backwards from one frame."""
        length = 1
        for k, s in zip(reversed(self.config.conv_kernel), reversed(self.config.conv_stride)):
            length = (length - 1) * s + k
        return length

    def check_lengths(self, sample_lengths, names=None) -> None:
        """Raises ValueError for clips of fewer than `min_samples` samples, which give no encoder frame (and
        would pool to zeros); `names` (default: row indices) name the clips in the message."""
        lengths = np.asarray(sample_lengths).reshape(-1)
        names = [f"row {i}" for i in range(len(lengths))] if names is None else list(names)
        short = [f"{name} ({int(n)} samples)" for name, n in zip(names, lengths) if n < self.min_samples]
        if short:
            need = self.min_samples
            raise ValueError(
                f"{len(short)} clip(s) shorter than the {need} samples ({need / SAMPLE_RATE * 1000:g} ms at 16 kHz) "
                f"that give one wav2vec2 frame (conv kernels {tuple(self.config.conv_kernel)}, strides "
                f"{tuple(self.config.conv_stride)}): {', '.join(short[:10])}{', ...' if len(short) > 10 else ''}; "
                "they would have no frames and pool to zeros. "
                f"Zero-pad each such clip itself (as audio, not masked padding) to at least {need} samples, or drop it")

    def frame_mask(self, attention_mask, num_frames: int | None = None):
        """(B, frames) bool mask of real encoder frames for a (B, samples) sample mask."""
        attention_mask = jnp.asarray(attention_mask)
        if num_frames is None:
            num_frames = int(self.frame_lengths(attention_mask.shape[-1]))
        lengths = self.frame_lengths(attention_mask.sum(-1))
        return jnp.arange(num_frames)[None, :] < lengths[:, None]

    def forward(self, audio, mask, indices):
        """Traced forward; see the class docstring."""
        if audio.ndim != 2:
            raise ValueError(f"expected audio of shape (batch, samples), got {audio.shape}")
        x = self.feature_extractor(audio[..., None])
        frame_mask = None if mask is None else self.frame_mask(mask, x.shape[1])
        return self.encoder(self.feature_projection(x), frame_mask, indices)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                        num_layers: int | None = None) -> "Wav2Vec2Encoder":
        """Loads a wav2vec2/XLS-R/MMS checkpoint (local directory or Hub repo id).

        `num_layers` keeps the first k transformer layers; for stable-layer-norm
        models the final layer norm is applied after layer k, as transformers
        does for a truncated config (XLS-R "layer 15" for the phonetic projector).
        MMS checkpoints load with the adapter stored in the main weights; see `load_adapter`.
        """
        model_dir = loading.resolve_model_dir(name_or_path)
        config = Wav2Vec2Config.from_dict(loading.load_config(model_dir))
        if num_layers is not None:
            if not 1 <= num_layers <= config.num_hidden_layers:
                raise ValueError(f"num_layers must be in [1, {config.num_hidden_layers}], got {num_layers}")
            config = dataclasses.replace(config, num_hidden_layers=num_layers)
        tensors = loading.strip_prefix(loading.load_state_dict(model_dir), "feature_projection.projection.weight")
        tensors = fold_weight_norm(tensors)
        truncated = loading.truncated_layer("encoder.layers.", config.num_hidden_layers)
        model = loading.build_model(
            lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype), tensors,
            lambda name: truncated(name) or name == "masked_spec_embed")
        model.source = name_or_path
        return model

    def load_adapter(self, language_or_path: str) -> None:
        """Swaps in the MMS language adapter `adapter.<lang>.safetensors` (or `.bin`), in place.

        `language_or_path` is a language code looked up next to the checkpoint
        this model was loaded from, or a path to an adapter file. Only parameter
        values change, so compiled forwards are reused (no recompilation).
        """
        if self.config.adapter_attn_dim is None or not self.config.do_stable_layer_norm:
            raise ValueError("this model has no adapter layers (config.adapter_attn_dim is not set)")
        if os.path.isfile(language_or_path):
            path = language_or_path
        else:
            if self.source is None:
                raise ValueError("model was not loaded with from_pretrained; pass an adapter file path")
            try:
                path = loading.resolve_file(self.source, f"adapter.{language_or_path}.safetensors")
            except FileNotFoundError:
                path = loading.resolve_file(self.source, f"adapter.{language_or_path}.bin")
        tensors = loading.strip_prefix(loading.load_tensor_file(path), "encoder.layers.0.adapter_layer.norm.weight")
        for i, layer in enumerate(self.encoder.layers):
            prefix = f"encoder.layers.{i}.adapter_layer."
            loading.assign_params(layer.adapter_layer, {k[len(prefix):]: v for k, v in tensors.items()
                                                        if k.startswith(prefix)})


def fold_weight_norm(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replaces the positional conv's weight-norm pair (g, v) by the effective weight g * v / ||v||.

    Accepts both the legacy `weight_g`/`weight_v` and the `parametrizations.weight.original0/1` names;
    the norm is over all axes but the kernel axis (torch `weight_norm(dim=2)`).
    """
    base = "encoder.pos_conv_embed.conv."
    pairs = [("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1")]
    for g_name, v_name in pairs:
        if base + g_name in tensors:
            tensors = dict(tensors)
            g = tensors.pop(base + g_name).astype(np.float32)
            v = tensors.pop(base + v_name).astype(np.float32)
            tensors[base + "weight"] = g * v / np.sqrt(np.sum(v * v, axis=(0, 1), keepdims=True))
    return tensors
