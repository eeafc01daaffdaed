"""Llama-family causal language models in Flax NNX (`LlamaForCausalLM`, SmolLM2; `SmolLM3ForCausalLM`).

    lm = CausalLM.from_pretrained(path)                    # a Hugging Face directory, or a .gguf file
    logits = lm(input_ids)                                  # (B, T, vocab) float32
    out = generate(lm, input_ids, max_new_tokens=32)        # greedy by default; (B, T + new) ids

- **Blocks.** Pre-norm decoder layers: RMSNorm (float32 statistics), grouped-query attention (`num_key_value_heads`
  key/value heads shared by groups of query heads) with split-half rotary embeddings (RoPE, θ and the `linear` /
  `llama3` scalings read from the config, frequencies and angles in float32), RMSNorm, SwiGLU MLP; a final RMSNorm
  and an output projection tied to the token embeddings or not. SmolLM3 differs only by its per-layer
  `no_rope_layers` mask (1: RoPE, 0: NoPE; by default every 4th layer has no position encoding).
- **Names.** Parameters carry transformers' names (`model.layers.N.self_attn.q_proj.weight`, ...), so Hugging Face
  checkpoints load through `encoders.loading`; `asr.gguf_io` maps llama.cpp files onto the same names.
- **Sharding.** Parameters carry logical axes (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`) mapped to the mesh by
  `encoders.runtime`'s one rules table; caches are heads-major (layers, B, KV, L, H) with the cache names.
- **Generation.** `generate` preallocates the key/value cache for prompt + `max_new_tokens`, runs one jit-compiled
  prefill and a `lax.while_loop` of single-token steps (greedy, or sampling at `temperature`) that stops once every
  row has produced an end-of-sequence id. Left-padded batches (`attention_mask`) take positions
  `cumsum(mask) - 1`, as transformers' `generate`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from encoders import loading, runtime
from encoders.layers import STACKED_CACHE_AXES, Dense, Embedding, activation
from encoders.runtime import constrain

ACTIVATION_AXES = ("batch", "length", "embed")
ROPE_TYPES = ("default", "linear", "llama3")
MODEL_TYPES = ("llama", "smollm3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a transformers `LlamaConfig` / `SmolLM3Config` the model needs (defaults: SmolLM2-135M)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 100000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    rope_frequency_factors: tuple[float, ...] = ()  # llama.cpp's rope_freqs: inverse frequencies divided by these
    use_rope: tuple[bool, ...] = ()  # per layer; empty: every layer
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, config: dict) -> "LlamaConfig":
        """From a transformers config dict (`rope_parameters`, or the older `rope_theta` + `rope_scaling`)."""
        model_type = config.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a Llama-family model this port covers {MODEL_TYPES}")
        heads = int(config["num_attention_heads"])
        layers = int(config["num_hidden_layers"])
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope.setdefault("rope_theta", config.get("rope_theta", 2e6 if model_type == "smollm3" else 1e4))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        use_rope = ()
        if config.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window) is not supported")
        if model_type == "smollm3":
            mask = config.get("no_rope_layers")
            if mask is None:
                interval = int(config.get("no_rope_layer_interval", 4))
                mask = [int((i + 1) % interval != 0) for i in range(layers)]
            if len(mask) != layers:
                raise ValueError(f"no_rope_layers has {len(mask)} entries for {layers} layers")
            use_rope = tuple(bool(m) for m in mask)
        eos = config.get("eos_token_id")
        eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        return cls(
            vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]), num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), hidden_act=config.get("hidden_act", "silu"),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type == "smollm3")),
            attention_bias=bool(config.get("attention_bias", False)), mlp_bias=bool(config.get("mlp_bias", False)),
            rope_theta=float(rope["rope_theta"]), rope_type=rope_type, rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_positions=int(rope.get("original_max_position_embeddings",
                                                     config.get("max_position_embeddings", 2048))),
            use_rope=use_rope, bos_token_id=config.get("bos_token_id"), eos_token_ids=eos,
            pad_token_id=config.get("pad_token_id"))

    def layer_uses_rope(self, layer: int) -> bool:
        """Whether layer `layer` applies rotary embeddings (False: a NoPE layer)."""
        return self.use_rope[layer] if self.use_rope else True


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies (head_dim / 2,) in float32, after the config's scaling (transformers' formulas)."""
    dim = config.head_dim
    inv = (1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
           ).astype(np.float32)
    if config.rope_frequency_factors:
        factors = np.asarray(config.rope_frequency_factors, np.float32)
        if factors.shape != inv.shape:
            raise ValueError(f"{factors.size} RoPE frequency factors for {inv.size} frequencies")
        inv = (inv / factors).astype(np.float32)
    if config.rope_type == "linear":
        return (inv / config.rope_factor).astype(np.float32)
    if config.rope_type == "llama3":
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old = config.rope_original_max_positions
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rotary(positions, inv_freq, dtype):
    """(cos, sin), each (B, t, head_dim), of integer positions (B, t), computed in float32 then cast to `dtype`."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x, cos, sin):
    """Split-half rotation of x (B, t, heads, H): x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class RMSNorm(nnx.Module):
    """weight * x / sqrt(mean(x^2) + eps), statistics in float32, the weight applied in the input dtype."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale.get_value().astype(self.dtype) * normed.astype(self.dtype)


class LlamaAttention(nnx.Module):
    """Grouped-query causal self-attention over a preallocated heads-major cache (q/k/v/o projections)."""

    def __init__(self, cfg: LlamaConfig, use_rope: bool, *, rngs, dtype, param_dtype):
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"{cfg.num_attention_heads} attention heads do not split into "
                             f"{cfg.num_key_value_heads} key/value groups")
        kw = dict(rngs=rngs, use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype)
        d, h = cfg.hidden_size, cfg.head_dim
        self.q_proj = Dense(d, cfg.num_attention_heads * h, ("embed", "heads"), **kw)
        self.k_proj = Dense(d, cfg.num_key_value_heads * h, ("embed", "kv_heads"), **kw)
        self.v_proj = Dense(d, cfg.num_key_value_heads * h, ("embed", "kv_heads"), **kw)
        self.o_proj = Dense(cfg.num_attention_heads * h, d, ("heads", "embed"), **kw)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, h
        self.use_rope = use_rope

    def __call__(self, x, cos, sin, k_cache, v_cache, layer: int, offset, key_mask):
        """x (B, t, D) at cache slots offset..offset+t-1; caches (layers, B, KV, L, H) with this layer at `layer`;
        key_mask (B, L) bool, True for slots holding real tokens. Returns (output, k_cache, v_cache)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        write = lambda cache, new: constrain(jax.lax.dynamic_update_slice(
            cache, new.transpose(0, 2, 1, 3)[None].astype(cache.dtype), (layer, 0, 0, offset, 0)), STACKED_CACHE_AXES)
        k_cache, v_cache = write(k_cache, k), write(v_cache, v)
        groups = self.heads // self.kv_heads
        q = (q * self.head_dim ** -0.5).reshape(b, t, self.kv_heads, groups, self.head_dim).transpose(0, 2, 3, 1, 4)
        scores = jnp.einsum("bkgth,bksh->bkgts", q, k_cache[layer], preferred_element_type=jnp.float32)
        slots = jnp.arange(k_cache.shape[3])
        allowed = (slots[None, :] <= offset + jnp.arange(t)[:, None])[None, None, None] & \
            key_mask[:, None, None, None, :]
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
        y = jnp.einsum("bkgts,bksh->bkgth", probs, v_cache[layer], preferred_element_type=jnp.float32)
        y = constrain(y.astype(x.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, self.heads, self.head_dim),
                      ("batch", "length", "heads", "kv"))
        return self.o_proj(y.reshape(b, t, self.heads * self.head_dim)), k_cache, v_cache


class LlamaMLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """x + self_attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, layer: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(cfg, cfg.layer_uses_rope(layer), **kw)
        self.mlp = LlamaMLP(cfg, **kw)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype,
                                                param_dtype=param_dtype)

    def __call__(self, x, cos, sin, k_cache, v_cache, layer, offset, key_mask):
        y, k_cache, v_cache = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, layer, offset,
                                             key_mask)
        x = x + y
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ACTIVATION_AXES), k_cache, v_cache


class LlamaModel(nnx.Module):
    """Token embeddings, decoder layers and the final norm (transformers' `model.` submodule)."""

    def __init__(self, cfg: LlamaConfig, *, rngs, dtype, param_dtype):
        self.embed_tokens = Embedding(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size)),
                                      ("vocab", "embed"), param_dtype)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)


class CausalLM(nnx.Module):
    """A Llama-family causal LM: `__call__` gives teacher-forced logits, `decode` runs tokens or embeddings
    through a preallocated cache (see the module docstring)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config, self.dtype = config, dtype
        self.model = LlamaModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = None if config.tie_word_embeddings else Dense(
            config.hidden_size, config.vocab_size, ("embed", "vocab"), rngs=rngs, use_bias=False, dtype=dtype,
            param_dtype=param_dtype)

    def embed(self, input_ids):
        """Token embeddings (B, T, D) in the compute dtype."""
        return jnp.take(self.model.embed_tokens.embedding.get_value(), input_ids, axis=0).astype(self.dtype)

    def init_cache(self, batch: int, length: int):
        """Zero key/value cache, each (layers, B, KV, length, H)."""
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, length, cfg.head_dim)
        zeros = lambda: constrain(jnp.zeros(shape, self.dtype), STACKED_CACHE_AXES)
        return zeros(), zeros()

    def decode(self, embeds, positions, offset, cache, key_mask):
        """Logits (B, t, vocab) float32 of input embeddings (B, t, D) with RoPE positions (B, t), written into cache
        slots offset..offset+t-1 (`offset` may be traced); key_mask (B, L): slots that hold real tokens.
        Returns (logits, cache)."""
        x = constrain(embeds.astype(self.dtype), ACTIVATION_AXES)
        cos, sin = rotary(positions, inverse_frequencies(self.config), self.dtype)
        k_cache, v_cache = cache
        for i, layer in enumerate(self.model.layers):
            x, k_cache, v_cache = layer(x, cos, sin, k_cache, v_cache, i, offset, key_mask)
        x = self.model.norm(x)
        if self.lm_head is None:
            table = self.model.embed_tokens.embedding.get_value().astype(self.dtype)
            logits = jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)
        else:
            kernel = self.lm_head.kernel.get_value().astype(self.dtype)
            logits = jnp.einsum("btd,dv->btv", x, kernel, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab")), (k_cache, v_cache)

    def forward_embeds(self, embeds, attention_mask=None):
        """Teacher-forced logits (B, T, vocab) of input embeddings (B, T, D) (e.g. text with spliced audio);
        attention_mask (B, T) of 1 / 0 (left padding) sets the positions as `generate` does."""
        b, t, _ = embeds.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        positions = mask_positions(mask)
        logits, _ = self.decode(embeds, positions, 0, self.init_cache(b, t), mask)
        return logits

    def __call__(self, input_ids, attention_mask=None):
        """Teacher-forced logits (B, T, vocab) float32 of `input_ids` (B, T)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        return self.forward_embeds(self.embed(input_ids), attention_mask)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> "CausalLM":
        """Loads a Hugging Face directory (config.json + safetensors, sharded or not; or a Hub id), a `.gguf`
        file (llama.cpp; quantised tensors are dequantised to float32) or an offline GGUF name
        (`asr.gguf_io.OFFLINE_GGUF`, e.g. `smollm2-135m-instruct-q4_1`)."""
        from asr import gguf_io

        if str(path).endswith(".gguf") or path in gguf_io.OFFLINE_GGUF:
            config, tensors = gguf_io.load_llama(path)
        else:
            model_dir = loading.resolve_model_dir(path)
            config = LlamaConfig.from_dict(loading.load_config(model_dir))
            tensors = loading.load_state_dict(model_dir)
        return build(config, tensors, dtype=dtype, param_dtype=param_dtype)


def build(config: LlamaConfig, tensors, *, dtype=jnp.float32, param_dtype=jnp.float32) -> CausalLM:
    """A `CausalLM` of `config` filled from a transformers-named state dict (a tied model's `lm_head.weight`, if
    saved, and RoPE buffers are ignored)."""
    ignore = lambda name: name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and
                                                                    name == "lm_head.weight")
    return loading.build_model(lambda: CausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
                               tensors, ignore)


def mask_positions(mask):
    """RoPE positions of a (B, T) bool mask: cumsum(mask) - 1, 0 on padding (transformers' `generate`)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


# ------------------------------------------------------------------------------------------------ generation


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """Static generation settings (part of the compilation key)."""

    max_new_tokens: int = 32
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


def _generate(lm: CausalLM, embeds, mask, temperature, key, opts: GenerationOptions):
    b, p, _ = embeds.shape
    n = opts.max_new_tokens
    key_mask = jnp.concatenate([mask, jnp.ones((b, n), bool)], axis=1)
    positions = mask_positions(mask)
    logits, cache = lm.decode(embeds, positions, 0, lm.init_cache(b, p + n), key_mask)
    eos = jnp.asarray(opts.eos_token_ids or (-1,), jnp.int32)
    init = dict(i=jnp.int32(0), cache=cache, logits=logits[:, -1], position=positions[:, -1] + 1,
                tokens=jnp.full((b, n), opts.pad_token_id, jnp.int32), done=jnp.zeros(b, bool), key=key)

    def body(s):
        key, sub = jax.random.split(s["key"])
        tok = jax.lax.cond(temperature > 0,
                           lambda: jax.random.categorical(sub, s["logits"] / jnp.maximum(temperature, 1e-6), axis=-1),
                           lambda: jnp.argmax(s["logits"], axis=-1)).astype(jnp.int32)
        tok = jnp.where(s["done"], opts.pad_token_id, tok)
        done = s["done"] | jnp.isin(tok, eos)
        logits, cache = lm.decode(lm.embed(tok[:, None]), s["position"][:, None], p + s["i"], s["cache"], key_mask)
        return dict(i=s["i"] + 1, cache=cache, logits=logits[:, -1], position=s["position"] + 1,
                    tokens=s["tokens"].at[:, s["i"]].set(tok), done=done, key=key)

    return jax.lax.while_loop(lambda s: (s["i"] < n) & ~jnp.all(s["done"]), body, init)["tokens"]


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, opts: GenerationOptions):
    def run(state, embeds, mask, temperature, key):
        return _generate(nnx.merge(graphdef, state), embeds, mask, temperature, key, opts)

    return jax.jit(run)


def generate_from_embeds(lm: CausalLM, embeds, attention_mask=None, *, max_new_tokens: int = 32,
                         temperature: float = 0.0, seed: int = 0, eos_token_id=None, pad_token_id=None,
                         mesh=None) -> np.ndarray:
    """New token ids (B, max_new_tokens) after input embeddings (B, T, D) (left-padded rows: attention_mask);
    after a row's end-of-sequence id the rest is `pad_token_id` (default: the config's, else the first EOS)."""
    embeds = jnp.asarray(embeds)
    if embeds.ndim != 3 or embeds.shape[-1] != lm.config.hidden_size:
        raise ValueError(f"embeddings must be (batch, length, {lm.config.hidden_size}), got {embeds.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    b, t, _ = embeds.shape
    if t + max_new_tokens > lm.config.max_position_embeddings:
        raise ValueError(f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{lm.config.max_position_embeddings} positions")
    mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != (b, t):
        raise ValueError(f"attention_mask must be {(b, t)}, got {mask.shape}")
    eos = lm.config.eos_token_ids if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).astype(int).tolist())
    pad = pad_token_id if pad_token_id is not None else (
        lm.config.pad_token_id if lm.config.pad_token_id is not None else (eos[0] if eos else 0))
    opts = GenerationOptions(int(max_new_tokens), tuple(int(e) for e in eos), int(pad))
    if mesh is not None:
        runtime.shard_model(lm, mesh)
        embeds = runtime.place(runtime.to_host(embeds), runtime.logical_sharding(mesh, ("batch", "length", "embed")))
        mask = runtime.place(mask, runtime.logical_sharding(mesh, ("batch", "length")))
    graphdef, state = nnx.split(lm)
    with runtime.mesh_context(mesh):
        tokens = _compiled(graphdef, opts)(state, embeds, jnp.asarray(mask), jnp.float32(temperature),
                                           jax.random.key(seed))
    return runtime.to_host(tokens)


def generate(lm: CausalLM, input_ids, max_new_tokens: int = 32, *, attention_mask=None, temperature: float = 0.0,
             seed: int = 0, eos_token_id=None, pad_token_id=None, mesh=None) -> np.ndarray:
    """(B, T + max_new_tokens) ids: `input_ids` (B, T) followed by greedy (temperature 0) or sampled tokens,
    `pad_token_id` after a row's end-of-sequence id (see `generate_from_embeds`)."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    if input_ids.min() < 0 or input_ids.max() >= lm.config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {lm.config.vocab_size}), got {input_ids.min()}..{input_ids.max()}")
    new = generate_from_embeds(lm, lm.embed(jnp.asarray(input_ids, jnp.int32)), attention_mask,
                               max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, mesh=mesh)
    return np.concatenate([input_ids.astype(np.int64), new.astype(np.int64)], axis=1)


def load_tokenizer(path: str):
    """The transformers tokenizer of what `CausalLM.from_pretrained(path)` loads (GGUF: `asr.gguf_io.load_tokenizer`,
    converted once and cached)."""
    from asr import gguf_io

    if str(path).endswith(".gguf") or path in gguf_io.OFFLINE_GGUF:
        return gguf_io.load_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)  # a local directory, or a Hub id (its tokenizer files)


def chat_prompt(tokenizer, user_text: str, *, system: str | None = None) -> str:
    """The chat template's text of one user turn with the assistant turn opened (`add_generation_prompt`)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

