"""Jit-compiled Whisper generation with static shapes: greedy / sampling and beam search.

The self-attention cache is preallocated for `prompt + max_new_tokens` positions
and the decoding loop is a `lax.while_loop` that stops once every sequence has
emitted EOS. Logit processing follows transformers' Whisper `generate`:
repetition penalty over all previous tokens (prompt included), `suppress_tokens`
at every step, `begin_suppress_tokens` at the first generated step. Beam search
is a port of transformers' vectorised `_beam_search` (length penalty, its
early-stopping heuristic with `early_stopping=False`), so results agree token
for token. Compiled functions are cached by model structure and static
settings; parameter values and traced settings (penalty, temperature) can
change without recompiling.

With a (`data`, `model`) mesh, the decoder's parameters are placed by the
logical-axis rules (heads, MLP and vocabulary over `model`), the batch, the
self-attention cache and the cross-attention states are split over `data` and
their heads over `model`; the batch is padded to a multiple of the `data` axis
with copies of its last row, which are dropped from the result.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from encoders import runtime

NEG = -1.0e9


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Static decoding settings (part of the compilation key)."""

    max_new_tokens: int = 64
    eos_token_id: int = 50257
    num_beams: int = 1
    length_penalty: float = 1.0
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()


@dataclasses.dataclass
class GenerateOutput:
    """tokens (B, max_new_tokens) padded with EOS after the first EOS; lengths (B,) before EOS;
    sum_logprobs (B,) of the generated tokens (EOS included); scores (B,) beam scores (length-penalised)."""

    tokens: np.ndarray
    lengths: np.ndarray
    sum_logprobs: np.ndarray
    scores: np.ndarray


def _suppress_mask(vocab: int, ids: tuple[int, ...]):
    mask = np.zeros(vocab, bool)
    mask[list(ids)] = True
    return jnp.asarray(mask)


def _process(scores, seen, step, penalty, opts: DecodeOptions):
    """Repetition penalty on `seen` tokens, then the suppression masks (as transformers' processors)."""
    penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
    scores = jnp.where(seen, penalised, scores)
    vocab = scores.shape[-1]
    if opts.suppress_tokens:
        scores = jnp.where(_suppress_mask(vocab, opts.suppress_tokens), -jnp.inf, scores)
    if opts.begin_suppress_tokens:
        begin = _suppress_mask(vocab, opts.begin_suppress_tokens) & (step == 0)
        scores = jnp.where(begin, -jnp.inf, scores)
    return scores


def _seen(prompt, vocab):
    return jnp.zeros((prompt.shape[0], vocab), bool).at[jnp.arange(prompt.shape[0])[:, None], prompt].set(True)


def _greedy(decoder, encoder_states, prompt, penalty, temperature, key, opts: DecodeOptions):
    b, p = prompt.shape
    n = opts.max_new_tokens
    cross = decoder.cross_kv(encoder_states)
    logits, cache = decoder.decode(prompt, 0, decoder.init_cache(b, p + n), cross)
    vocab = logits.shape[-1]
    init = dict(i=jnp.int32(0), cache=cache, logits=logits[:, -1], seen=_seen(prompt, vocab),
                tokens=jnp.full((b, n), opts.eos_token_id, jnp.int32), done=jnp.zeros(b, bool),
                lengths=jnp.zeros(b, jnp.int32), logprob=jnp.zeros(b, jnp.float32), key=key)

    def body(s):
        scores = _process(s["logits"], s["seen"], s["i"], penalty, opts)
        logprobs = jax.nn.log_softmax(scores, axis=-1)
        key, sub = jax.random.split(s["key"])
        tok = jax.lax.cond(temperature > 0,  # greedy steps draw no noise over the vocabulary
                           lambda: jax.random.categorical(sub, scores / jnp.maximum(temperature, 1e-6), axis=-1),
                           lambda: jnp.argmax(scores, axis=-1)).astype(jnp.int32)
        tok = jnp.where(s["done"], opts.eos_token_id, tok)
        live = ~s["done"]
        logprob = s["logprob"] + jnp.where(live, jnp.take_along_axis(logprobs, tok[:, None], 1)[:, 0], 0.0)
        done = s["done"] | (tok == opts.eos_token_id)
        lengths = s["lengths"] + (live & ~done)
        seen = s["seen"].at[jnp.arange(b), tok].set(True)
        logits, cache = decoder.decode(tok[:, None], p + s["i"], s["cache"], cross)
        return dict(i=s["i"] + 1, cache=cache, logits=logits[:, -1], seen=seen,
                    tokens=s["tokens"].at[:, s["i"]].set(tok), done=done, lengths=lengths, logprob=logprob, key=key)

    out = jax.lax.while_loop(lambda s: (s["i"] < n) & ~jnp.all(s["done"]), body, init)
    return out["tokens"], out["lengths"], out["logprob"], out["logprob"]


def _beam(decoder, encoder_states, prompt, penalty, opts: DecodeOptions):
    """transformers' `_beam_search` (one EOS id, early_stopping=False) with a static-shape loop."""
    b, p = prompt.shape
    k, n, lp = opts.num_beams, opts.max_new_tokens, opts.length_penalty
    keep = 2 * k
    flat = lambda x: x.reshape((b * k,) + x.shape[2:])
    prompt_k = jnp.repeat(prompt, k, axis=0)
    cross = decoder.cross_kv(jnp.repeat(encoder_states, k, axis=0))
    logits, cache = decoder.decode(prompt_k, 0, decoder.init_cache(b * k, p + n), cross)
    vocab = logits.shape[-1]
    init = dict(i=jnp.int32(0), cache=cache, logits=logits[:, -1], stop=jnp.bool_(False),
                run_seq=jnp.full((b, k, n), opts.eos_token_id, jnp.int32), seen=_seen(prompt_k, vocab),
                run_scores=jnp.zeros((b, k)).at[:, 1:].set(NEG),
                seq=jnp.full((b, k, n), opts.eos_token_id, jnp.int32), scores=jnp.full((b, k), NEG),
                logprob=jnp.zeros((b, k)), finished=jnp.zeros((b, k), bool), improvable=jnp.ones((b, 1), bool))

    def body(s):
        i = s["i"]
        logprobs = _process(jax.nn.log_softmax(s["logits"], axis=-1), s["seen"], i, penalty, opts)
        acc = (logprobs.reshape(b, k, vocab) + s["run_scores"][:, :, None]).reshape(b, k * vocab)
        top_lp, top_idx = jax.lax.top_k(acc, keep)
        src = top_idx // vocab
        ids = (top_idx % vocab).astype(jnp.int32)
        top_seq = jnp.take_along_axis(s["run_seq"], src[:, :, None], 1).at[:, :, i].set(ids)
        hits = (ids == opts.eos_token_id) | (i + 1 >= n)
        # running beams for the next step: best non-finished continuations
        nxt = jax.lax.top_k(top_lp + hits * NEG, k)[1]
        run_seq = jnp.take_along_axis(top_seq, nxt[:, :, None], 1)
        run_scores = jnp.take_along_axis(top_lp + hits * NEG, nxt, 1)
        # finished hypotheses: merge new ones (among the top k candidates) with the kept ones
        just = hits & (jnp.arange(keep) < k)[None, :]
        cand = top_lp / ((i + 1.0) ** lp) + (~s["improvable"]) * NEG + (~just) * NEG
        merged = jnp.concatenate([s["scores"], cand], 1)
        best = jax.lax.top_k(merged, k)[1]
        seq = jnp.take_along_axis(jnp.concatenate([s["seq"], top_seq], 1), best[:, :, None], 1)
        scores = jnp.take_along_axis(merged, best, 1)
        finished = jnp.take_along_axis(jnp.concatenate([s["finished"], just], 1), best, 1)
        logprob = jnp.take_along_axis(jnp.concatenate([s["logprob"], top_lp], 1), best, 1)
        # reorder the cache and the seen-token masks to the surviving beams, then decode their new tokens
        origin = flat(jnp.take_along_axis(src, nxt, 1) + (jnp.arange(b) * k)[:, None])
        cache = jax.tree.map(lambda c: c[:, origin], s["cache"])
        new = flat(run_seq[:, :, i])
        seen = s["seen"][origin].at[jnp.arange(b * k), new].set(True)
        logits, cache = decoder.decode(new[:, None], p + i, cache, cross)
        best_running = run_scores[:, :1] / ((i + 1.0) ** lp)
        worst = jnp.where(finished, scores.min(1, keepdims=True), NEG)
        improvable = s["improvable"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
        stop = ~jnp.any(improvable) | jnp.all(hits)
        return dict(i=i + 1, cache=cache, logits=logits[:, -1], stop=stop, run_seq=run_seq, seen=seen,
                    run_scores=run_scores, seq=seq, scores=scores, logprob=logprob, finished=finished,
                    improvable=improvable)

    out = jax.lax.while_loop(lambda s: ~s["stop"], body, init)
    tokens = out["seq"][:, 0]
    is_eos = tokens == opts.eos_token_id
    lengths = jnp.where(is_eos.any(1), jnp.argmax(is_eos, 1), n).astype(jnp.int32)
    tokens = jnp.where(jnp.arange(n)[None, :] >= lengths[:, None], opts.eos_token_id, tokens)
    return tokens, lengths, out["logprob"][:, 0], out["scores"][:, 0]


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, opts: DecodeOptions):
    def run(state, encoder_states, prompt, penalty, temperature, key):
        decoder = nnx.merge(graphdef, state)
        if opts.num_beams == 1:
            return _greedy(decoder, encoder_states, prompt, penalty, temperature, key, opts)
        return _beam(decoder, encoder_states, prompt, penalty, opts)

    return jax.jit(run)


def _place_rows(x, mesh, names, rows: int):
    """`x` padded to `rows` rows (copies of its last row) and placed on `mesh` by logical `names`."""
    sharding = runtime.logical_sharding(mesh, names)
    if isinstance(x, jax.Array) and x.shape[0] == rows and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    x = runtime.to_host(x)
    return runtime.place(np.concatenate([x, np.repeat(x[-1:], rows - len(x), 0)]), sharding)


def generate(decoder, encoder_states, prompt, options: DecodeOptions, *, repetition_penalty: float = 1.0,
             temperature: float = 0.0, seed: int = 0, mesh=None) -> GenerateOutput:
    """Decodes after `prompt` (B, P) (same length for every row) given encoder states (B, S, D).

    `num_beams == 1`: greedy (temperature 0) or sampling at `temperature`;
    `num_beams > 1`: beam search (temperature ignored). With `mesh`, the decoder's parameters are placed on
    it (in place, `runtime.shard_model`) and the batch is split over its `batch` axis (padded to a multiple of it).
    """
    if np.ndim(prompt) != 2 or np.shape(prompt)[0] != encoder_states.shape[0]:
        raise ValueError(f"prompt must be (batch, length) with batch {encoder_states.shape[0]}, "
                         f"got {np.shape(prompt)}")
    limit = decoder.config.max_target_positions
    batch, length = np.shape(prompt)
    if length + options.max_new_tokens > limit:
        raise ValueError(f"prompt ({length}) + max_new_tokens ({options.max_new_tokens}) exceeds the "
                         f"decoder's {limit} positions")
    if mesh is None:
        encoder_states, prompt = jnp.asarray(encoder_states), jnp.asarray(prompt, jnp.int32)
    else:
        runtime.shard_model(decoder, mesh)  # a no-op when the decoder is already placed
        rows = runtime.padded_size(batch, mesh)
        encoder_states = _place_rows(encoder_states, mesh, ("batch", "length", "embed"), rows)
        prompt = _place_rows(np.asarray(prompt, np.int32), mesh, ("batch", "length"), rows)
    graphdef, state = nnx.split(decoder)
    with runtime.mesh_context(mesh):
        out = _compiled(graphdef, options)(state, encoder_states, prompt, jnp.float32(repetition_penalty),
                                           jnp.float32(temperature), jax.random.key(seed))
    return GenerateOutput(*(runtime.to_host(x)[:batch] for x in out))
