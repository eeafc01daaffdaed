"""Pooled utterance embeddings of a frozen encoder, batched, jit-compiled, cached on disk, resumable and
multi-process.

    X, ids = extract(encoder, examples, cache_dir="outputs/embeddings", batch_size=8)   # (n, d) float32

Encoders follow one protocol (`PooledEncoder`, implemented by `WhisperEncoder` and `Wav2Vec2Encoder`): a host
`front_end` (Whisper log-mel, wav2vec2 normalisation), `encode(inputs, sample_mask)`, `frame_mask`,
`check_lengths`, a `default_pooling` ("mean" over all 1500 Whisper frames, the CLD convention; "masked_mean" over
real wav2vec2 frames) and `input_samples` (Whisper's fixed 30 s window, or None: pad to the longest clip). Every
batch has `batch_size` rows (the last one filled with repeats that are dropped) and one padded length, so the
forward compiles once. Before any encoding, `check_clip_lengths` refuses clips the encoder cannot embed whole.

Several processes: `batch_size` is the global batch, split over the mesh axis of the `batch` rule; each process decodes
only its own rows of every batch (`input_pipeline.audio_pipeline`), the forward runs on the global mesh, and the
pooled rows are gathered on every process. Process 0 alone reads and writes the cache; what it holds is
broadcast, so hosts need not share a file system.

Cache: `cache_dir/<key>/` holds `shard_XXXXXX.npy` files of `shard_batches` batches each and `index.json`
listing the finished items; both are written atomically, so a killed run leaves only whole shards and a restart
computes only the missing ones. The key hashes the encoder class, config and a weight fingerprint, the pooling
and padding, so a different encoder or input never reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from encoders import runtime
from encoders.audio import (
    N_SAMPLES,
)
from encoders.input_pipeline import Example, audio_pipeline
from encoders.pooling import masked_mean_pool, mean_pool

POOLINGS = ("mean", "masked_mean")


class PooledEncoder(Protocol):
    """What extraction needs of an encoder (see the module docstring)."""

    config: Any
    default_pooling: str
    input_samples: int | None

    def front_end(self, audio: np.ndarray, sample_mask: np.ndarray) -> np.ndarray: ...

    def encode(self, inputs, sample_mask): ...

    def frame_mask(self, sample_mask, num_frames: int | None = None): ...

    def check_lengths(self, sample_lengths, names=None) -> None: ...


def _forward(encoder, inputs, sample_mask, pooling: str):
    """Encoder hidden states pooled to (B, d) float32."""
    hidden = encoder.encode(inputs, sample_mask)
    if pooling == "mean":
        return mean_pool(hidden)
    return masked_mean_pool(hidden, encoder.frame_mask(sample_mask, hidden.shape[1]))


_jit_forward = nnx.jit(_forward, static_argnames="pooling")


@nnx.jit
def _whisper_features(encoder, decoder, mel, sample_mask, sot, language_ids):
    """(B, 2d + L): mean over all 1500 frames, mean over the frames covering the audio, and Whisper's own
    language log-probabilities (first step after `<|startoftranscript|>`, over the whole vocabulary) of the
    L tokens `language_ids`."""
    hidden = encoder(mel)
    logits = decoder(jnp.full((mel.shape[0], 1), sot, jnp.int32), hidden)[:, 0]
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, language_ids]
    frame_mask = encoder.frame_mask(sample_mask, hidden.shape[1])
    return jnp.concatenate([mean_pool(hidden), masked_mean_pool(hidden, frame_mask), logprobs], axis=-1)


def _fingerprint(encoder) -> str:
    """Hash of every parameter's path, shape, dtype, float64 host sum and a strided sample of its values (read
    through `runtime.to_host`, so the key is the same however the encoder is placed, on any number of processes)."""
    digest = hashlib.sha256()
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.state(encoder, nnx.Param)):
        host = runtime.to_host(value)
        stride = max(host.size // 1024, 1)
        digest.update(f"{jax.tree_util.keystr(path)}{host.shape}{host.dtype}".encode())
        digest.update(np.asarray(host.sum(dtype=np.float64)).tobytes())
        digest.update(np.asarray(host.ravel()[::stride], np.float32).tobytes())
    return digest.hexdigest()


def cache_spec(encoder, *, pooling: str, pad_to: int | None) -> dict:
    """Everything the cached rows depend on besides the clips themselves; its hash names the cache directory.
    (Rows do not depend on the batch they were computed in: padding rows are dropped.)"""
    return {"encoder": type(encoder).__name__, "config": dataclasses.asdict(encoder.config),
            "weights": _fingerprint(encoder), "pooling": pooling, "pad_to": pad_to}


def example_keys(examples: Sequence[Example]) -> list[str]:
    """One cache key per clip: its id and the SHA-256 of its audio (file bytes or in-memory data), so a clip
    whose file changed is recomputed and a moved corpus is not."""
    keys = []
    for e in examples:
        if e.audio_path is not None:
            with open(e.audio_path, "rb") as f:
                data = f.read()
        else:
            data = e.audio if isinstance(e.audio, bytes) else np.ascontiguousarray(e.audio).tobytes()
        keys.append(f"{e.id}|{hashlib.sha256(data).hexdigest()}")
    return keys


def check_clip_lengths(encoder: PooledEncoder, examples: Sequence[Example]) -> None:
    """Raises ValueError, before any encoding, for clips `encoder` cannot embed whole (over Whisper's 30 s window,
    under one wav2vec2 frame). Lengths are the examples' `num_samples`, recorded by the `input_pipeline` loaders
    when they decode every clip, so the check reads no audio."""
    encoder.check_lengths([e.num_samples for e in examples], [f"clip {e.id!r}" for e in examples])


def encoder_batches(encoder: PooledEncoder, examples: Sequence[Example], batch_size: int, pad_to: int,
                    mesh: jax.sharding.Mesh | None = None):
    """Yields (batch, (inputs, sample_mask)) of fixed shape for `examples`. `batch` is this process's share of a
    global batch of `batch_size` rows (all of it on one process); with `mesh`, the inputs are global arrays
    split over the `batch` rule's axis (run the forward under `runtime.mesh_context(mesh)`) and
    `batch_rows(batch, mesh)` gives the matching global "index" and "valid"."""
    for batch in audio_pipeline(examples, batch_size, pad_to=pad_to, fill_last_batch=True):
        mask = np.arange(pad_to)[None, :] < batch["lengths"][:, None]
        inputs = (encoder.front_end(batch["audio"], mask), mask)
        if mesh is not None:
            inputs = tuple(runtime.global_rows(x, mesh, batch_size, ("batch",) + (None,) * (x.ndim - 1))
                           for x in inputs)
        yield batch, inputs


def batch_rows(batch: dict, mesh: jax.sharding.Mesh | None, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(index, valid) of every row of the global batch, in the row order of the forward's output."""
    if mesh is None:
        return batch["index"], batch["valid"]
    index = runtime.global_rows(np.where(batch["valid"], batch["index"], -1), mesh, batch_size, ("batch",))
    index = runtime.to_host(index)
    return index, index >= 0


def prepare_mesh(encoder, mesh: jax.sharding.Mesh | None, batch_size: int) -> None:
    """Places `encoder` on `mesh` (in place) after checking that batches split over its `batch` axis."""
    if mesh is None:
        return
    shards = runtime.shards_of(mesh, "batch")
    if batch_size % shards:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {shards} devices the mesh splits "
                         "batches over; choose a multiple")
    runtime.shard_model(encoder, mesh)


def pooled_rows(forward: Callable, encoder: PooledEncoder, examples: Sequence[Example], batch_size: int,
                pad_to: int, mesh, update: Callable[[int], None], select=None) -> list:
    """Runs `forward(batch, inputs, sample_mask)` over every batch of `examples` and returns its host output rows
    per example, in order (`select(row, example)` post-processes one example's row; default: the row itself)."""
    out: list = [None] * len(examples)
    for batch, inputs in encoder_batches(encoder, examples, batch_size, pad_to, mesh):
        with runtime.mesh_context(mesh):
            rows = runtime.to_host(forward(batch, *inputs))
        index, valid = batch_rows(batch, mesh, batch_size)
        for row, k in zip(rows[valid], index[valid]):
            out[k] = row if select is None else select(row, examples[k])
        update(int(valid.sum()))
    return out


def cached_rows(cache_dir: str, spec: dict, items: Sequence, keys: Sequence[str], shard_size: int,
                compute: Callable[[Sequence, Callable[[int], None]], np.ndarray], *, desc: str,
                rows_per_item: Sequence[int] | None = None, progress: bool = True,
                on_shard: Callable[[int], None] | None = None) -> np.ndarray:
    """Rows of `items` (in order; `rows_per_item[i]` rows each, default 1), cached per item under cache_dir/hash(spec).

    Items whose key is in the cache are read back; the others are computed by `compute(shard, update)` in
    shards of `shard_size`, each shard's rows and then the `index.json` (item key -> file, first row, row
    count) written atomically, so a killed run resumes with the missing items only and any later run over
    other items of the same spec (another split, seed or subset) reuses every row already computed.
    `compute` reports finished items through `update(count)`; `on_shard(items_done)` follows each write.
    """
    if len(set(keys)) != len(keys) or len(keys) != len(items):
        raise ValueError("cache keys must be unique, one per item")
    writer = runtime.is_writer()  # process 0 alone reads and writes the cache; the others follow its decisions
    runtime.check_same_on_every_process(len(keys), "the number of items to embed")
    counts = list(rows_per_item) if rows_per_item is not None else [1] * len(items)
    directory = os.path.join(cache_dir, hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20])
    index_path = os.path.join(directory, "index.json")
    index = {}
    if writer:
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(index_path):
            with open(index_path) as f:
                index = json.load(f)["items"]
    is_missing = runtime.broadcast_from_writer(np.array([k not in index for k in keys], bool))
    missing = [i for i in range(len(keys)) if is_missing[i]]
    bar = tqdm(total=len(items), initial=len(items) - len(missing), unit="clip",
               desc=f"{desc} {os.path.basename(directory)}", disable=not (progress and writer))
    for start in range(0, len(missing), shard_size):
        shard = missing[start:start + shard_size]
        rows = np.asarray(compute([items[i] for i in shard], bar.update), np.float32)
        if rows.shape[0] != sum(counts[i] for i in shard):
            raise RuntimeError(f"compute returned {rows.shape[0]} rows for {sum(counts[i] for i in shard)} expected")
        if writer:
            name = f"shard_{hashlib.sha256(''.join(keys[i] for i in shard).encode()).hexdigest()[:16]}.npy"
            buffer = io.BytesIO()
            np.save(buffer, rows)
            runtime.atomic_write_bytes(os.path.join(directory, name), buffer.getvalue())
            offset = 0
            for i in shard:
                index[keys[i]] = [name, offset, counts[i]]
                offset += counts[i]
            runtime.atomic_write_text(index_path, json.dumps({"spec": spec, "items": index}))
            if on_shard is not None:
                on_shard(min(start + shard_size, len(missing)))
    bar.close()
    out = np.zeros((0, 0), np.float32)
    if writer:
        files: dict[str, np.ndarray] = {}
        parts = []
        for k in keys:
            name, first, count = index[k]
            if name not in files:
                files[name] = np.load(os.path.join(directory, name))
            parts.append(files[name][first:first + count])
        out = np.concatenate(parts).astype(np.float32, copy=False)
    if jax.process_count() > 1:
        shape = runtime.broadcast_from_writer(np.asarray(out.shape, np.int64))
        out = runtime.broadcast_from_writer(out if writer else np.zeros(tuple(shape), np.float32))
    return np.asarray(out)


def extract_whisper(encoder, decoder, examples: Sequence[Example], *, sot: int, language_ids: Sequence[int],
                    cache_dir: str, batch_size: int = 8, mesh: jax.sharding.Mesh | None = None,
                    shard_batches: int = 16, progress: bool = True) -> dict[str, np.ndarray]:
    """One pass of a pretrained Whisper over `examples` -> {"mean": (n, d), "masked_mean": (n, d),
    "lang_logprobs": (n, L)}: both poolings and Whisper's own language log-probabilities of
    `language_ids`, cached and resumable as in `extract` (the key adds the decoder and the token ids)."""
    if not examples:
        raise ValueError("no examples to embed")
    check_clip_lengths(encoder, examples)
    spec = cache_spec(encoder, pooling="whisper_features", pad_to=N_SAMPLES)
    spec.update(decoder=_fingerprint(decoder), sot=int(sot), language_ids=[int(i) for i in language_ids])
    prepare_mesh(encoder, mesh, batch_size)
    if mesh is not None:
        runtime.shard_model(decoder, mesh)
    ids = jnp.asarray(np.asarray(language_ids, np.int32))

    def compute(shard_examples, update):
        forward = lambda _, mel, mask: _whisper_features(encoder, decoder, mel, mask, jnp.int32(sot), ids)  # noqa: E731
        return np.stack(pooled_rows(forward, encoder, shard_examples, batch_size, N_SAMPLES, mesh, update))

    rows = cached_rows(cache_dir, spec, examples, example_keys(examples), batch_size * shard_batches, compute,
                       desc="whisper features", progress=progress)
    d = encoder.config.d_model
    return {"mean": rows[:, :d], "masked_mean": rows[:, d:2 * d], "lang_logprobs": rows[:, 2 * d:]}


def extract(encoder, examples: Sequence[Example], *, cache_dir: str, batch_size: int = 8,
            pooling: str | None = None, mesh: jax.sharding.Mesh | None = None, shard_batches: int = 16,
            progress: bool = True, on_shard: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 pooled embeddings aligned with `examples`, and their ids; cached and resumable.

    `pooling` defaults to the encoder's `default_pooling`. With `mesh`, the encoder is placed on it
    (`runtime.shard_model`, in place) and batches are split over its `batch` axis (`batch_size` must divide
    evenly); on several processes, each decodes its own clips and every process gets all rows.
    `on_shard(rows_done)` is called on process 0 after each shard is safely on disk.
    """
    if not examples:
        raise ValueError("no examples to embed")
    pooling = pooling or encoder.default_pooling
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    check_clip_lengths(encoder, examples)
    pad_to = encoder.input_samples or max(e.num_samples for e in examples)
    spec = cache_spec(encoder, pooling=pooling, pad_to=pad_to)
    prepare_mesh(encoder, mesh, batch_size)

    def compute(shard_examples, update):
        forward = lambda _, inputs, mask: _jit_forward(encoder, inputs, mask, pooling=pooling)  # noqa: E731
        return np.stack(pooled_rows(forward, encoder, shard_examples, batch_size, pad_to, mesh, update))

    embeddings = cached_rows(cache_dir, spec, examples, example_keys(examples), batch_size * shard_batches, compute,
                             desc="embeddings", progress=progress, on_shard=on_shard)
    if embeddings.shape[0] != len(examples):
        raise RuntimeError(f"cache under {cache_dir} holds {embeddings.shape[0]} rows for {len(examples)} examples")
    return embeddings, np.array([e.id for e in examples], object)
