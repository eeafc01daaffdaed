"""Pooled utterance embeddings of a frozen encoder, batched, jit-compiled, cached on disk and resumable.

    X, ids = extract(encoder, examples, cache_dir="outputs/embeddings", batch_size=8)   # (n, d) float32

Whisper: log-mel -> encoder -> `mean` over all 1500 frames (the CLD convention) or `masked_mean` over
the frames of real audio. wav2vec2 / XLS-R / MMS: `normalize` -> encoder (with the sample mask) ->
`masked_mean` over real frames (default) or `mean`. Every batch has `batch_size` rows (the last one is
filled with repeats that are dropped) and one padded length, so the forward compiles once. Before any
encoding, `check_clip_lengths` refuses clips over Whisper's 30 s window or under one wav2vec2 frame.

Cache: `cache_dir/<key>/` holds `shard_XXXXXX.npy` files of `shard_batches` batches each and
`index.json` listing the finished shards; both are written to a temporary file and renamed
(`os.replace`), so a killed run leaves only whole shards and a restart computes only the missing ones.
The key hashes the encoder class, config and a weight fingerprint, the pooling, padding, batch and
shard sizes, and the ids and sources of the examples, so a different encoder or input never reuses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from encoders import runtime
from encoders.audio import (
    CHUNK_SECONDS,
    N_SAMPLES,
    SAMPLE_RATE,
    log_mel_spectrogram,
    normalize,
)
from encoders.input_pipeline import Example, audio_pipeline
from encoders.pooling import masked_mean_pool, mean_pool, whisper_frame_mask
from encoders.runtime import shard_model
from encoders.whisper import WhisperEncoder

POOLINGS = ("mean", "masked_mean")


def _forward(encoder, inputs, sample_mask, pooling: str):
    """Encoder hidden states pooled to (B, d) float32."""
    if isinstance(encoder, WhisperEncoder):
        hidden = encoder(inputs)
        frame_mask = whisper_frame_mask(sample_mask.sum(-1), hidden.shape[1])
    else:
        hidden = encoder(inputs, attention_mask=sample_mask)
        frame_mask = encoder.frame_mask(sample_mask, hidden.shape[1])
    return mean_pool(hidden) if pooling == "mean" else masked_mean_pool(hidden, frame_mask)


_jit_forward = nnx.jit(_forward, static_argnames="pooling")


@nnx.jit
def _whisper_features(encoder, decoder, mel, sample_mask, sot, language_ids):
    """(B, 2d + L): mean over all 1500 frames, mean over the frames covering the audio, and Whisper's own
    language log-probabilities (first step after `<|startoftranscript|>`, over the whole vocabulary) of the
    L tokens `language_ids`."""
    hidden = encoder(mel)
    logits = decoder(jnp.full((mel.shape[0], 1), sot, jnp.int32), hidden)[:, 0]
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, language_ids]
    frame_mask = whisper_frame_mask(sample_mask.sum(-1), hidden.shape[1])
    return jnp.concatenate([mean_pool(hidden), masked_mean_pool(hidden, frame_mask), logprobs], axis=-1)


def _encoder_inputs(encoder, audio: np.ndarray, sample_mask: np.ndarray) -> np.ndarray:
    """Host front end: Whisper log-mel, or wav2vec2 normalisation over real samples."""
    if isinstance(encoder, WhisperEncoder):
        return log_mel_spectrogram(audio, n_mels=encoder.config.num_mel_bins)
    return normalize(audio, sample_mask)


def _fingerprint(encoder) -> str:
    """Hash of every parameter's path, shape, dtype, float32 sum and a strided sample of its values."""
    digest = hashlib.sha256()
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.state(encoder, nnx.Param)):
        stride = max(value.size // 1024, 1)
        digest.update(f"{jax.tree_util.keystr(path)}{value.shape}{value.dtype}".encode())
        digest.update(np.asarray(jnp.sum(value.astype(jnp.float32)), np.float32).tobytes())
        digest.update(np.asarray(value.ravel()[::stride], np.float32).tobytes())
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


def check_clip_lengths(encoder, examples: Sequence[Example]) -> None:
    """Raises ValueError, before any encoding, for clips `encoder` cannot embed whole: over Whisper's 30 s window,
    or shorter than one wav2vec2 frame. Lengths are the examples' `num_samples`, recorded by the `cld_data`
    loaders when they decode every clip, so the check reads no audio."""
    if not isinstance(encoder, WhisperEncoder):
        encoder.check_lengths([e.num_samples for e in examples], [f"clip {e.id!r}" for e in examples])
        return
    long = [f"{e.id!r} ({e.num_samples / SAMPLE_RATE:.2f} s)" for e in examples if e.num_samples > N_SAMPLES]
    if long:
        raise ValueError(f"{len(long)} clip(s) longer than Whisper's {CHUNK_SECONDS} s window: {', '.join(long[:10])}"
                         f"{', ...' if len(long) > 10 else ''}; trim or split them into clips of at most "
                         f"{CHUNK_SECONDS} s before embedding them")


def encoder_batches(encoder, examples: Sequence[Example], batch_size: int, pad_to: int,
                    mesh: jax.sharding.Mesh | None = None):
    """Yields (batch, (inputs, sample_mask)) of fixed shape for `examples`, the inputs placed on `mesh`'s
    `data` axis when given (run the forward under `jax.set_mesh(mesh)`)."""
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec("data"))
    for batch in audio_pipeline(examples, batch_size, pad_to=pad_to, fill_last_batch=True):
        mask = np.arange(pad_to)[None, :] < batch["lengths"][:, None]
        inputs = (_encoder_inputs(encoder, batch["audio"], mask), mask)
        yield batch, inputs if sharding is None else jax.device_put(inputs, sharding)


def prepare_mesh(encoder, mesh: jax.sharding.Mesh | None, batch_size: int) -> None:
    """Places `encoder` on `mesh` (in place) after checking that batches split over its `data` axis."""
    if mesh is None:
        return
    if batch_size % mesh.shape["data"]:
        raise ValueError(f"batch_size {batch_size} is not divisible by the mesh's data axis ({mesh.shape['data']})")
    shard_model(encoder, mesh)


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
    counts = list(rows_per_item) if rows_per_item is not None else [1] * len(items)
    directory = os.path.join(cache_dir, hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20])
    os.makedirs(directory, exist_ok=True)
    index_path = os.path.join(directory, "index.json")
    index = {}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)["items"]
    missing = [i for i, k in enumerate(keys) if k not in index]
    bar = tqdm(total=len(items), initial=len(items) - len(missing), unit="clip",
               desc=f"{desc} {os.path.basename(directory)}", disable=not progress)
    for start in range(0, len(missing), shard_size):
        shard = missing[start:start + shard_size]
        rows = compute([items[i] for i in shard], bar.update)
        if rows.shape[0] != sum(counts[i] for i in shard):
            raise RuntimeError(f"compute returned {rows.shape[0]} rows for {sum(counts[i] for i in shard)} expected")
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
    files: dict[str, np.ndarray] = {}
    out = []
    for k in keys:
        name, first, count = index[k]
        if name not in files:
            files[name] = np.load(os.path.join(directory, name))
        out.append(files[name][first:first + count])
    return np.concatenate(out)


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
        shard_model(decoder, mesh)
    ids = jnp.asarray(np.asarray(language_ids, np.int32))

    def compute(shard_examples, update):
        rows = []
        for batch, inputs in encoder_batches(encoder, shard_examples, batch_size, N_SAMPLES, mesh):
            with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
                features = _whisper_features(encoder, decoder, *inputs, jnp.int32(sot), ids)
            rows.append(np.asarray(features, np.float32)[batch["valid"]])
            update(int(batch["valid"].sum()))
        return np.concatenate(rows)

    rows = cached_rows(cache_dir, spec, examples, example_keys(examples), batch_size * shard_batches, compute,
                       desc="whisper features", progress=progress)
    d = encoder.config.d_model
    return {"mean": rows[:, :d], "masked_mean": rows[:, d:2 * d], "lang_logprobs": rows[:, 2 * d:]}


def extract(encoder, examples: Sequence[Example], *, cache_dir: str, batch_size: int = 8,
            pooling: str | None = None, mesh: jax.sharding.Mesh | None = None, shard_batches: int = 16,
            progress: bool = True, on_shard: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 pooled embeddings aligned with `examples`, and their ids; cached and resumable.

    `pooling` defaults to "mean" for Whisper and "masked_mean" otherwise. With `mesh`, the encoder is
    placed on it (`shard_model`, in place) and batches are split over its `data` axis (`batch_size` must
    divide evenly). `on_shard(rows_done)` is called after each shard is safely on disk.
    """
    if not examples:
        raise ValueError("no examples to embed")
    is_whisper = isinstance(encoder, WhisperEncoder)
    pooling = pooling or ("mean" if is_whisper else "masked_mean")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    check_clip_lengths(encoder, examples)
    pad_to = N_SAMPLES if is_whisper else max(e.num_samples for e in examples)
    spec = cache_spec(encoder, pooling=pooling, pad_to=pad_to)
    prepare_mesh(encoder, mesh, batch_size)

    def compute(shard_examples, update):
        rows = []
        for batch, inputs in encoder_batches(encoder, shard_examples, batch_size, pad_to, mesh):
            with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
                pooled = _jit_forward(encoder, *inputs, pooling=pooling)
            rows.append(np.asarray(pooled, np.float32)[batch["valid"]])
            update(int(batch["valid"].sum()))
        return np.concatenate(rows)

    embeddings = cached_rows(cache_dir, spec, examples, example_keys(examples), batch_size * shard_batches, compute,
                             desc="embeddings", progress=progress, on_shard=on_shard)
    if embeddings.shape[0] != len(examples):
        raise RuntimeError(f"cache under {cache_dir} holds {embeddings.shape[0]} rows for {len(examples)} examples")
    return embeddings, np.array([e.id for e in examples], object)
