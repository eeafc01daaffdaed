"""Pooled utterance embeddings of a frozen encoder, batched, jit-compiled, cached on disk and resumable.

    X, ids = extract(encoder, examples, cache_dir="outputs/embeddings", batch_size=8)   # (n, d) float32

Whisper: log-mel -> encoder -> `mean` over all 1500 frames (the CLD convention) or `masked_mean` over
the frames of real audio. wav2vec2 / XLS-R / MMS: `normalize` -> encoder (with the sample mask) ->
`masked_mean` over real frames (default) or `mean`. Every batch has `batch_size` rows (the last one is
filled with repeats that are dropped) and one padded length, so the forward compiles once.

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
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from encoders.audio import N_SAMPLES, log_mel_spectrogram, normalize
from encoders.pooling import masked_mean_pool, mean_pool, whisper_frame_mask
from encoders.sharding import shard_model
from encoders.whisper import WhisperEncoder
from experiments.cld_data import Example, audio_pipeline

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


def cache_spec(encoder, examples: Sequence[Example], *, pooling: str, pad_to: int | None, batch_size: int,
               shard_batches: int) -> dict:
    """Everything the cached embeddings depend on; its hash names the cache directory."""
    inputs = hashlib.sha256("\n".join(f"{e.id}\t{e.audio_path}\t{e.num_samples}" for e in examples).encode())
    return {"encoder": type(encoder).__name__, "config": dataclasses.asdict(encoder.config),
            "weights": _fingerprint(encoder), "pooling": pooling, "pad_to": pad_to, "batch_size": batch_size,
            "shard_batches": shard_batches, "n": len(examples), "inputs": inputs.hexdigest()}


def _atomic_write(path: str, write: Callable) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def cached_rows(cache_dir: str, spec: dict, items: Sequence, shard_size: int,
                compute: Callable[[Sequence, Callable[[int], None]], np.ndarray], *, desc: str,
                progress: bool = True, on_shard: Callable[[int], None] | None = None) -> np.ndarray:
    """Concatenated `compute(items[i:i + shard_size], update)` over shards, cached under cache_dir/hash(spec).

    Each shard's rows and the `index.json` of finished shards are written atomically, so a killed run
    resumes with the missing shards only. `compute` reports finished items through `update(count)`;
    `on_shard(items_done)` is called after each shard is on disk.
    """
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    directory = os.path.join(cache_dir, key)
    os.makedirs(directory, exist_ok=True)
    index_path = os.path.join(directory, "index.json")
    done = {}
    if os.path.exists(index_path):
        with open(index_path) as f:
            done = {int(k): v for k, v in json.load(f)["done"].items()}
    starts = range(0, len(items), shard_size)
    cached = sum(min(shard_size, len(items) - s) for s in starts if s // shard_size in done)
    bar = tqdm(total=len(items), initial=cached, unit="clip", desc=f"{desc} {key}", disable=not progress)
    for start in starts:
        shard = start // shard_size
        if shard in done:
            continue
        rows = compute(items[start:start + shard_size], bar.update)
        name = f"shard_{shard:06d}.npy"
        _atomic_write(os.path.join(directory, name), lambda f: np.save(f, rows))
        done[shard] = name
        _atomic_write(index_path, lambda f: f.write(json.dumps({"spec": spec, "done": done}, indent=1).encode()))
        if on_shard is not None:
            on_shard(min(start + shard_size, len(items)))
    bar.close()
    return np.concatenate([np.load(os.path.join(directory, done[s // shard_size])) for s in starts])


def extract_whisper(encoder, decoder, examples: Sequence[Example], *, sot: int, language_ids: Sequence[int],
                    cache_dir: str, batch_size: int = 8, mesh: jax.sharding.Mesh | None = None,
                    shard_batches: int = 16, progress: bool = True) -> dict[str, np.ndarray]:
    """One pass of a pretrained Whisper over `examples` -> {"mean": (n, d), "masked_mean": (n, d),
    "lang_logprobs": (n, L)}: both poolings and Whisper's own language log-probabilities of
    `language_ids`, cached and resumable as in `extract` (the key adds the decoder and the token ids)."""
    if not examples:
        raise ValueError("no examples to embed")
    spec = cache_spec(encoder, examples, pooling="whisper_features", pad_to=N_SAMPLES, batch_size=batch_size,
                      shard_batches=shard_batches)
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

    rows = cached_rows(cache_dir, spec, examples, batch_size * shard_batches, compute, desc="whisper features",
                       progress=progress)
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
    pad_to = N_SAMPLES if is_whisper else max(e.num_samples for e in examples)
    spec = cache_spec(encoder, examples, pooling=pooling, pad_to=pad_to, batch_size=batch_size,
                      shard_batches=shard_batches)
    prepare_mesh(encoder, mesh, batch_size)

    def compute(shard_examples, update):
        rows = []
        for batch, inputs in encoder_batches(encoder, shard_examples, batch_size, pad_to, mesh):
            with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
                pooled = _jit_forward(encoder, *inputs, pooling=pooling)
            rows.append(np.asarray(pooled, np.float32)[batch["valid"]])
            update(int(batch["valid"].sum()))
        return np.concatenate(rows)

    embeddings = cached_rows(cache_dir, spec, examples, batch_size * shard_batches, compute, desc="embeddings",
                             progress=progress, on_shard=on_shard)
    if embeddings.shape[0] != len(examples):
        raise RuntimeError(f"cache under {cache_dir} holds {embeddings.shape[0]} rows for {len(examples)} examples")
    return embeddings, np.array([e.id for e in examples], object)
