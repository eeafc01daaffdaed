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
from encoders.layers import Attention, Dense, LayerNorm, activation
from encoders.whisper import Embed


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


def _heads(x, num_heads):
    """(B, t, D) -> (B, N, t, H): heads-major, the layout batched matmuls read without a copy."""
    b, t, d = x.shape
    return x.reshape(b, t, num_heads, d // num_heads).transpose(0, 2, 1, 3)


def _attend(q, k, v, mask=None):
    """Softmax attention (float32 scores) of q (B, N, t, H) over k, v (B, N, S, H); mask (t, S) bool.

    Keys and values are kept heads-major so that the cached cross-attention states are read in place at
    every decoding step (a (B, S, N, H) layout makes XLA transpose all of them per step)."""
    s = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    y = jnp.einsum("bnts,bnsh->bnth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    b, n, t, h = y.shape
    return y.astype(q.dtype).transpose(0, 2, 1, 3).reshape(b, t, n * h)


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
        self.num_heads = cfg.decoder_attention_heads

    def cross_kv(self, encoder_states):
        """Cross-attention keys and values (B, N, S, H) of the encoder states."""
        attn = self.encoder_attn
        return _heads(attn.k_proj(encoder_states), self.num_heads), _heads(attn.v_proj(encoder_states), self.num_heads)

    def __call__(self, x, k_cache, v_cache, index, offset, cross_k, cross_v):
        """x (B, t, D) at positions offset..offset+t-1; k_cache, v_cache (layers, B, N, L, H) of all layers, this
        one at `index`; returns (x, k_cache, v_cache) with this layer's new keys and values written in place."""
        t = x.shape[1]
        scale = (x.shape[-1] // self.num_heads) ** -0.5
        h = self.self_attn_layer_norm(x)
        q = _heads(self.self_attn.q_proj(h) * scale, self.num_heads)
        k = _heads(self.self_attn.k_proj(h), self.num_heads).astype(k_cache.dtype)
        v = _heads(self.self_attn.v_proj(h), self.num_heads).astype(v_cache.dtype)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[None], (index, 0, 0, offset, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[None], (index, 0, 0, offset, 0))
        causal = jnp.arange(k_cache.shape[3])[None, :] <= offset + jnp.arange(t)[:, None]
        x = x + self.self_attn.out_proj(_attend(q, k_cache[index], v_cache[index], causal))
        h = self.encoder_attn_layer_norm(x)
        q = _heads(self.encoder_attn.q_proj(h) * scale, self.num_heads)
        x = x + self.encoder_attn.out_proj(_attend(q, cross_k, cross_v))
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        return x, k_cache, v_cache


class WhisperDecoder(nnx.Module):
    """Whisper decoder: tokens (B, t) + encoder states (B, 1500, D) -> logits (B, t, vocab), float32.

    For generation, `cross_kv` is computed once per audio, `init_cache` allocates
    the self-attention cache for a fixed maximum length and `decode` runs t new
    tokens at position `offset` (static shapes; `offset` may be traced).
    """

    def __init__(self, config: WhisperDecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cfg = config
        self.config = cfg
        self.embed_tokens = Embed(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model)), param_dtype)
        self.embed_positions = Embed(np.zeros((cfg.max_target_positions, cfg.d_model), np.float32), param_dtype)
        self.layers = nnx.List([WhisperDecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.decoder_layers)])
        self.layer_norm = LayerNorm(cfg.d_model, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype

    def cross_kv(self, encoder_states):
        """Per-layer cross-attention (keys, values), each stacked to (layers, B, N, S, H)."""
        kvs = [layer.cross_kv(encoder_states.astype(self.dtype)) for layer in self.layers]
        return jnp.stack([k for k, _ in kvs]), jnp.stack([v for _, v in kvs])

    def init_cache(self, batch: int, length: int | None = None):
        """Zero self-attention cache (keys, values), each (layers, B, N, length, H); length defaults to the maximum."""
        cfg = self.config
        length = cfg.max_target_positions if length is None else length
        shape = (cfg.decoder_layers, batch, cfg.decoder_attention_heads, length,
                 cfg.d_model // cfg.decoder_attention_heads)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def decode(self, tokens, offset, cache, cross):
        """Logits (B, t, vocab) of `tokens` (B, t) placed at `offset`; returns (logits, updated cache)."""
        t = tokens.shape[1]
        table = self.embed_tokens.embedding.get_value().astype(self.dtype)
        x = jnp.take(table, tokens, axis=0)
        if self.config.scale_embedding:
            x = x * jnp.sqrt(jnp.asarray(self.config.d_model, self.dtype))
        positions = jax.lax.dynamic_slice_in_dim(self.embed_positions.embedding.get_value(), offset, t)
        x = x + positions.astype(self.dtype)
        k_cache, v_cache = cache
        for i, layer in enumerate(self.layers):
            x, k_cache, v_cache = layer(x, k_cache, v_cache, i, offset, cross[0][i], cross[1][i])
        x = self.layer_norm(x)
        logits = jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)
        return logits, (k_cache, v_cache)

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
