"""Transformer building blocks shared by the Whisper and wav2vec2 encoders and the Whisper decoder.

Submodule and parameter names mirror the PyTorch (transformers) modules so that
checkpoint conversion is a mechanical renaming (see `encoders.loading`).
Parameters carry logical axis names in their `logical_axes` metadata.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from encoders.runtime import constrain

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
}


def activation(name: str):
    """Returns the activation function for a transformers `hidden_act` name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _param(rngs: nnx.Rngs, shape, names, dtype, std: float | None):
    value = jnp.ones(shape, dtype) if std is None else std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=tuple(names))


def _zeros(shape, names, dtype):
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=tuple(names))


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel (in, out) with logical names `names`."""

    def __init__(self, d_in, d_out, names, *, rngs, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32):
        self.kernel = _param(rngs, (d_in, d_out), names, param_dtype, 0.02)
        self.bias = _zeros((d_out,), names[1:], param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel.get_value().astype(self.dtype))
        return y if self.bias is None else y + self.bias.get_value().astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with statistics in float32."""

    def __init__(self, dim, *, eps=1e-5, names=("embed",), dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=tuple(names))
        self.bias = _zeros((dim,), names, param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return y.astype(self.dtype)


class Conv1d(nnx.Module):
    """1-D convolution on (batch, time, channels); kernel (k, in/groups, out) like `nnx.Conv`.

    Ungrouped convolutions run as im2col + one matmul (fast on CPU); grouped
    ones use `lax.conv_general_dilated`.
    """

    def __init__(self, d_in, d_out, kernel_size, *, rngs, stride=1, padding=0, groups=1, use_bias=True,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        names = ("conv_kernel", "conv_in", "conv_out")
        std = (2.0 / (d_in // groups * kernel_size)) ** 0.5
        self.kernel = _param(rngs, (kernel_size, d_in // groups, d_out), names, param_dtype, std)
        self.bias = _zeros((d_out,), names[2:], param_dtype) if use_bias else None
        self.stride, self.padding, self.groups, self.dtype = stride, padding, groups, dtype

    def __call__(self, x):
        x = x.astype(self.dtype)
        kernel = self.kernel.get_value().astype(self.dtype)
        if self.padding:
            x = jnp.pad(x, ((0, 0), (self.padding, self.padding), (0, 0)))
        k, c_in, c_out = kernel.shape
        if self.groups == 1:
            n_out = (x.shape[1] - k) // self.stride + 1
            span = self.stride * (n_out - 1) + 1
            patches = jnp.concatenate([x[:, i : i + span : self.stride] for i in range(k)], axis=-1)
            y = jnp.dot(patches, kernel.reshape(k * c_in, c_out))
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, (self.stride,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"),
                feature_group_count=self.groups)
        return y if self.bias is None else y + self.bias.get_value().astype(self.dtype)


CPU_QUERY_BLOCK = 512


def blockwise_attention(q, k, v, key_mask=None, block: int = CPU_QUERY_BLOCK):
    """Softmax attention computed one (example, head, query block) tile at a time with `lax.map`.

    q, k, v: (B, T, N, H), q already scaled; key_mask: optional bool (B, T). The
    (block x T) score tiles stay in cache, which makes this several times faster
    than materialising all (B, N, T, T) scores on CPU. Scores and the softmax
    run in float32.
    """
    b, t, n, h = q.shape
    num_blocks = -(-t // block)
    block = -(-t // num_blocks)
    q = jnp.pad(q, ((0, 0), (0, num_blocks * block - t), (0, 0), (0, 0)))
    q = q.reshape(b, num_blocks, block, n, h).transpose(0, 3, 1, 2, 4).reshape(b * n * num_blocks, block, h)
    k = k.transpose(0, 2, 1, 3).reshape(b * n, t, h)
    v = v.transpose(0, 2, 1, 3).reshape(b * n, t, h)
    bias = None if key_mask is None else jnp.where(key_mask, 0.0, jnp.finfo(jnp.float32).min)

    def tile(args):
        q_blk, i = args  # i indexes (example, head)
        s = jnp.dot(q_blk, k[i].T, preferred_element_type=jnp.float32)
        if bias is not None:
            s = s + bias[i // n]
        p = jnp.exp(s - s.max(-1, keepdims=True))
        o = jnp.dot(p.astype(v.dtype), v[i], preferred_element_type=jnp.float32)
        return (o / p.sum(-1, keepdims=True)).astype(v.dtype)

    out = jax.lax.map(tile, (q, jnp.repeat(jnp.arange(b * n), num_blocks)))
    out = out.reshape(b, n, num_blocks, block, h).transpose(0, 2, 3, 1, 4).reshape(b, num_blocks * block, n, h)
    return out[:, :t]


def attention(q, k, v, key_mask=None):
    """Scaled (q pre-scaled) bidirectional attention on (B, T, N, H) with an optional (B, T) key mask.

    Uses `blockwise_attention` on CPU without an active mesh, else `jax.nn.dot_product_attention`
    (fused kernels on accelerators; sharding-friendly under a mesh).
    """
    if jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty:
        return blockwise_attention(q, k, v, key_mask)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0)


def heads_major_attention(q, k, v, mask=None):
    """Softmax attention (float32 scores) of pre-scaled q (B, N, t, H) over k, v (B, N, S, H) -> (B, t, N, H);
    mask: optional bool broadcasting to (B, N, t, S), True where a query may attend.

    Keys and values stay heads-major so that cached states (a decoder's cross-attention over 1500 encoder
    frames) are read in place at every decoding step; a (B, S, N, H) layout makes XLA transpose all of them
    per step."""
    s = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    y = jnp.einsum("bnts,bnsh->bnth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return y.astype(q.dtype).transpose(0, 2, 1, 3)


# Logical names of one layer's heads-major keys / values (B, N, S, H), cached or precomputed, and of every
# layer's stacked in one array (layers, B, N, S, H).
CACHE_AXES = ("cache_batch", "cache_heads", "cache_length", "cache_kv")
STACKED_CACHE_AXES = (None,) + CACHE_AXES


class Attention(nnx.Module):
    """Multi-head attention with q/k/v/out projections (transformers naming).

    `__call__`: bidirectional self-attention (encoders). For decoders, keys and values are kept heads-major
    (B, N, S, H) with the `CACHE_AXES` logical names: `keys_values` projects them (cross-attention states,
    computed once), `attend` attends over given ones and `attend_cached` writes a step's keys and values into
    a preallocated cache and attends causally over it.
    """

    def __init__(self, dim, num_heads, *, rngs, k_bias=True, dtype=jnp.float32, param_dtype=jnp.float32):
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Dense(dim, dim, ("embed", "heads"), **kw)
        self.k_proj = Dense(dim, dim, ("embed", "kv_heads"), use_bias=k_bias, **kw)
        self.v_proj = Dense(dim, dim, ("embed", "kv_heads"), **kw)
        self.out_proj = Dense(dim, dim, ("heads", "embed"), **kw)
        self.num_heads = num_heads

    def _split(self, y):
        """(B, t, D) -> (B, t, N, H)."""
        b, t, d = y.shape
        return y.reshape(b, t, self.num_heads, d // self.num_heads)

    def _merge(self, y):
        """(B, t, N, H) attention output -> out_proj of (B, t, D)."""
        b, t, n, h = y.shape
        return self.out_proj(constrain(y, ("batch", "length", "heads", "kv")).reshape(b, t, n * h))

    def _query(self, x):
        """Scaled queries (B, t, N, H) of x (B, t, D)."""
        q = self.q_proj(x)
        return self._split(q * (q.shape[-1] // self.num_heads) ** -0.5)

    def __call__(self, x, key_mask=None):
        """Bidirectional self-attention of x: (B, T, D); key_mask: optional bool (B, T), True for real frames."""
        named = lambda y: constrain(y, ("batch", "length", "heads", "kv"))
        q = named(self._query(x))
        k, v = named(self._split(self.k_proj(x))), named(self._split(self.v_proj(x)))
        return self._merge(attention(q, k, v, key_mask))

    def keys_values(self, x):
        """Heads-major keys and values (B, N, t, H) of x (B, t, D)."""
        heads_major = lambda y: constrain(self._split(y).transpose(0, 2, 1, 3), CACHE_AXES)
        return heads_major(self.k_proj(x)), heads_major(self.v_proj(x))

    def attend(self, x, k, v, mask=None):
        """Attention of x's queries (B, t, D) over heads-major k, v (B, N, S, H); mask: bool broadcasting to
        (B, N, t, S) or None (all keys)."""
        q = constrain(self._query(x).transpose(0, 2, 1, 3), ("batch", "heads", "length", "kv"))
        return self._merge(heads_major_attention(q, k, v, mask))

    def attend_cached(self, x, k_cache, v_cache, layer, offset):
        """Causal self-attention of x (B, t, D) at positions offset..offset+t-1 over a preallocated cache.

        k_cache, v_cache: (layers, B, N, L, H), this attention's entry at `layer` (static); x's keys and
        values are written at `offset` (may be traced) and the queries attend to positions <= their own.
        Returns (output (B, t, D), k_cache, v_cache)."""
        t = x.shape[1]
        k, v = self.keys_values(x)
        write = lambda cache, new: constrain(
            jax.lax.dynamic_update_slice(cache, new[None].astype(cache.dtype), (layer, 0, 0, offset, 0)),
            STACKED_CACHE_AXES)
        k_cache, v_cache = write(k_cache, k), write(v_cache, v)
        causal = jnp.arange(k_cache.shape[3])[None, :] <= offset + jnp.arange(t)[:, None]
        return self.attend(x, k_cache[layer], v_cache[layer], causal), k_cache, v_cache


class Embedding(nnx.Module):
    """A lookup table stored as `embedding` (torch `weight`) with logical names `names` (rows, features)."""

    def __init__(self, table, names, param_dtype=jnp.float32):
        self.embedding = nnx.Param(jnp.asarray(table, param_dtype), logical_axes=tuple(names))


def hidden_state_indices(output_hidden_states, num_states: int) -> tuple[int, ...] | None:
    """Normalises `output_hidden_states` (False, True, an int or ints) to sorted state indices.

    Index 0 is the embeddings (input of the first layer) and `num_states - 1` the
    final output, as in transformers. Returns None when no states are requested.
    """
    if output_hidden_states is False or output_hidden_states is None:
        return None
    if output_hidden_states is True:
        return tuple(range(num_states))
    wanted = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    bad = [i for i in wanted if not -num_states <= i < num_states]
    if bad:
        raise IndexError(f"hidden state indices {bad} out of range for {num_states} states")
    return tuple(i % num_states for i in wanted)


def run_layers(layers: Sequence[nnx.Module], x, key_mask, final_norm, indices):
    """Runs `layers`, applies `final_norm` (may be None) and returns the states in `indices`.

    Without `indices` only the final state is returned. Under `jit`, states that
    are not requested are dead code and cost nothing.
    """
    states = [x]
    for layer in layers:
        x = constrain(layer(x, key_mask), ("batch", "length", "embed"))
        states.append(x)
    if final_norm is not None:
        x = final_norm(x)
    if indices is None:
        return x
    states[-1] = x
    return tuple(states[i] for i in indices)


@functools.lru_cache(maxsize=64)
def _compiled_forward(graphdef, indices):
    def run(state, inputs, mask):
        return nnx.merge(graphdef, state).forward(inputs, mask, indices)

    return jax.jit(run)


class JittedEncoder(nnx.Module):
    """Mixin: `__call__` runs the subclass's `forward(inputs, mask, indices)` under a cached `jax.jit`.

    The compiled function is keyed by the module structure and the requested
    hidden states, so swapping parameter values (e.g. MMS adapters) reuses it.
    """

    num_states: int

    def __call__(self, inputs, attention_mask=None, output_hidden_states=False):
        """Last hidden state (B, T, D), or a tuple of hidden states when `output_hidden_states` is set."""
        indices = hidden_state_indices(output_hidden_states, self.num_states)
        graphdef, state = nnx.split(self)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
        return _compiled_forward(graphdef, indices)(state, inputs, mask)
