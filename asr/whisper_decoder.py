"""Whisper text decoder in Flax NNX with a preallocated key/value cache.

Token embeddings + learned positions, pre-LN blocks (causal self-attention over
the cache, cross-attention over the encoder states, MLP), final layer norm and
the output projection tied to the token embeddings. Parameter names follow
transformers' `WhisperDecoder`, so checkpoints load through `encoders.loading`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from encoders import loading
from encoders.layers import STACKED_CACHE_AXES, Attention, Dense, Embedding, LayerNorm, activation
from encoders.runtime import constrain

ACTIVATION_AXES = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class WhisperDecoderConfig:
    """Decoder fields of a transformers `WhisperConfig` (same names)."""

    vocab_size: int = 51865
    d_model: int = 384
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    max_target_positions: int = 448
    activation_function: str = "gelu"
    scale_embedding: bool = False
    decoder_start_token_id: int = 50258
    eos_token_id: int = 50257
    pad_token_id: int = 50257

    @classmethod
    def from_dict(cls, config: dict) -> "WhisperDecoderConfig":
        """Picks the decoder fields out of a transformers config dict."""
        return loading.dataclass_from_config(cls, config)


class WhisperDecoderLayer(nnx.Module):
    """x + self_attn(LN(x)) (causal, cached); x + encoder_attn(LN(x)); x + fc2(act(fc1(LN(x))))."""

    def __init__(self, cfg: WhisperDecoderConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ln = dict(dtype=dtype, param_dtype=param_dtype)
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.decoder_attention_heads, k_bias=False, **kw)
        self.self_attn_layer_norm = LayerNorm(d, **ln)
        self.encoder_attn = Attention(d, cfg.decoder_attention_heads, k_bias=False, **kw)
        self.encoder_attn_layer_norm = LayerNorm(d, **ln)
        self.fc1 = Dense(d, cfg.decoder_ffn_dim, ("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.decoder_ffn_dim, d, ("mlp", "embed"), **kw)
        self.final_layer_norm = LayerNorm(d, **ln)
        self.act = activation(cfg.activation_function)

    def __call__(self, x, k_cache, v_cache, index, offset, cross_k, cross_v):
        """x (B, t, D) at positions offset..offset+t-1; k_cache, v_cache (layers, B, N, L, H) of all layers, this
        one at `index`; cross_k, cross_v (B, N, S, H). Returns (x, k_cache, v_cache) with this layer's new keys
        and values written in place."""
        y, k_cache, v_cache = self.self_attn.attend_cached(self.self_attn_layer_norm(x), k_cache, v_cache, index,
                                                           offset)
        x = x + y
        x = x + self.encoder_attn.attend(self.encoder_attn_layer_norm(x), cross_k, cross_v)
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        return constrain(x, ACTIVATION_AXES), k_cache, v_cache


class WhisperDecoder(nnx.Module):
    """Whisper decoder: tokens (B, t) + encoder states (B, 1500, D) -> logits (B, t, vocab), float32.

    For generation, `cross_kv` is computed once per audio, `init_cache` allocates
    the self-attention cache for a fixed maximum length and `decode` runs t new
    tokens at position `offset` (static shapes; `offset` may be traced). Caches and
    cross-attention states are heads-major (layers, B, N, S, H) with the logical
    names (None, cache_batch, cache_heads, cache_length, cache_kv).
    """

    def __init__(self, config: WhisperDecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cfg = config
        self.config = cfg
        self.embed_tokens = Embedding(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model)),
                                      ("vocab", "embed"), param_dtype)
        self.embed_positions = Embedding(np.zeros((cfg.max_target_positions, cfg.d_model), np.float32),
                                         ("positions", "embed"), param_dtype)
        self.layers = nnx.List([WhisperDecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.decoder_layers)])
        self.layer_norm = LayerNorm(cfg.d_model, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype

    def cross_kv(self, encoder_states):
        """Per-layer cross-attention (keys, values), each stacked to (layers, B, N, S, H)."""
        states = constrain(encoder_states.astype(self.dtype), ACTIVATION_AXES)
        kvs = [layer.encoder_attn.keys_values(states) for layer in self.layers]
        return (constrain(jnp.stack([k for k, _ in kvs]), STACKED_CACHE_AXES),
                constrain(jnp.stack([v for _, v in kvs]), STACKED_CACHE_AXES))

    def init_cache(self, batch: int, length: int | None = None):
        """Zero self-attention cache (keys, values), each (layers, B, N, length, H); length defaults to the maximum."""
        cfg = self.config
        length = cfg.max_target_positions if length is None else length
        shape = (cfg.decoder_layers, batch, cfg.decoder_attention_heads, length,
                 cfg.d_model // cfg.decoder_attention_heads)
        zeros = lambda: constrain(jnp.zeros(shape, self.dtype), STACKED_CACHE_AXES)
        return zeros(), zeros()

    def decode(self, tokens, offset, cache, cross):
        """Logits (B, t, vocab) of `tokens` (B, t) placed at `offset`; returns (logits, updated cache)."""
        t = tokens.shape[1]
        table = self.embed_tokens.embedding.get_value().astype(self.dtype)
        x = jnp.take(table, tokens, axis=0)
        if self.config.scale_embedding:
            x = x * jnp.sqrt(jnp.asarray(self.config.d_model, self.dtype))
        positions = jax.lax.dynamic_slice_in_dim(self.embed_positions.embedding.get_value(), offset, t)
        x = constrain(x + positions.astype(self.dtype), ACTIVATION_AXES)
        k_cache, v_cache = cache
        for i, layer in enumerate(self.layers):
            x, k_cache, v_cache = layer(x, k_cache, v_cache, i, offset, cross[0][i], cross[1][i])
        x = self.layer_norm(x)
        logits = jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab")), (k_cache, v_cache)

    def __call__(self, tokens, encoder_states):
        """Teacher-forced logits (B, t, vocab) for `tokens` (B, t) given encoder states (B, S, D)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        logits, _ = self.decode(tokens, 0, self.init_cache(tokens.shape[0], tokens.shape[1]),
                                self.cross_kv(jnp.asarray(encoder_states)))
        return logits

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> "WhisperDecoder":
        """Loads the decoder of a Whisper checkpoint (local directory or Hub repo id)."""
        model_dir = loading.resolve_model_dir(name_or_path)
        config = WhisperDecoderConfig.from_dict(loading.load_config(model_dir))
        tensors = loading.strip_prefix(loading.load_state_dict(model_dir), "embed_tokens.weight")
        return loading.build_model(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
                                   tensors)
