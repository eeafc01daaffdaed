"""Phone-span manifests and span-mean pooled encoder features, cached and resumable.

    utts = load_phone_manifest("outputs/phone_corpus/manifest.jsonl")
    X, labels, sources = extract_spans(encoder, utts, cache_dir="outputs/embeddings")   # X: (num_spans, d)

A manifest is JSONL, one audio file per row: {"id", "audio_path" (relative to the manifest), "source"
(language / corpus), "spans": [[start_s, end_s, ipa_label], ...]}. Loading validates every span against
the audio's duration. Features are the encoder's last hidden state (build it truncated, e.g.
`Wav2Vec2Encoder.from_pretrained(path, num_layers=15)`) mean-pooled over each span's frames at 50 frames/s
(at least one frame, `encoders.pooling.span_mean_pool`), cached in shards like `encoders.extraction`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
import soundfile as sf
from flax import nnx

from encoders import extraction, runtime
from encoders.audio import SAMPLE_RATE
from encoders.input_pipeline import Example
from encoders.pooling import span_mean_pool


@dataclasses.dataclass(frozen=True, eq=False)
class Utterance:
    """One audio file with its phone spans (S, 2) in seconds and their IPA labels."""

    id: str
    audio_path: str
    source: str
    spans: np.ndarray
    labels: tuple[str, ...]
    num_samples: int


def check_spans(spans, labels, num_samples: int, where: str) -> np.ndarray:
    """(S, 2) float array of validated spans: non-empty, labelled, 0 <= start < end <= audio duration."""
    spans = np.asarray(spans, np.float64).reshape(-1, 2)
    if len(spans) == 0:
        raise ValueError(f"{where}: no phone spans.")
    if len(labels) != len(spans) or any(not isinstance(l, str) or not l.strip() for l in labels):
        raise ValueError(f"{where}: every span needs a non-empty label; got {list(labels)}.")
    duration = num_samples / SAMPLE_RATE
    bad = np.flatnonzero(spans[:, 1] <= spans[:, 0])
    if bad.size:
        raise ValueError(f"{where}: span {bad[0]} ends before it starts: {spans[bad[0]].tolist()}.")
    outside = np.flatnonzero((spans[:, 0] < 0) | (spans[:, 1] > duration + 1e-3))
    if outside.size:
        raise ValueError(f"{where}: span {outside[0]} {spans[outside[0]].tolist()} lies outside the audio "
                         f"(0 to {duration:.3f} s).")
    return spans


def load_phone_manifest(path: str) -> list[Utterance]:
    """Utterances of a JSONL phone-span manifest, validated (clear errors for bad spans or labels)."""
    root = os.path.dirname(os.path.abspath(path))
    utterances = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            where = f"{path}:{line_no} ({row.get('id')})"
            missing = {"id", "audio_path", "source", "spans"} - set(row)
            if missing:
                raise ValueError(f"{where}: missing fields {sorted(missing)}.")
            audio_path = os.path.join(root, row["audio_path"])
            info = sf.info(audio_path)
            num_samples = int(round(info.frames * SAMPLE_RATE / info.samplerate))
            spans = row["spans"]
            labels = tuple(s[2] if len(s) == 3 else None for s in spans)
            utterances.append(Utterance(row["id"], audio_path, row["source"],
                                        check_spans([s[:2] for s in spans], labels, num_samples, where), labels,
                                        num_samples))
    if not utterances:
        raise ValueError(f"{path}: no utterances.")
    return utterances


def _span_forward(encoder, inputs, sample_mask, spans):
    return span_mean_pool(encoder.encode(inputs, sample_mask), spans)


_jit_span_forward = nnx.jit(_span_forward)


def extract_spans(encoder, utterances: Sequence[Utterance], *, cache_dir: str, batch_size: int = 8,
                  mesh: jax.sharding.Mesh | None = None, shard_batches: int = 16,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(num_spans, d) span-pooled features in manifest order, with each span's label and source.

    Fixed shapes (padded audio and span count), so the forward compiles once; cached and resumable
    (`encoders.extraction.cached_rows`); with `mesh`, batches split over its `batch` axis, on one or several
    processes (as `encoders.extraction.extract`).
    """
    if not utterances:
        raise ValueError("no utterances to embed")
    pad_to = max(u.num_samples for u in utterances)
    max_spans = max(len(u.spans) for u in utterances)
    examples = [Example(u.id, u.source, audio_path=u.audio_path, num_samples=u.num_samples) for u in utterances]
    spans_by_id = {u.id: u.spans for u in utterances}
    if len(spans_by_id) != len(utterances):
        raise ValueError("utterance ids must be unique")
    spec = extraction.cache_spec(encoder, pooling="span_mean", pad_to=pad_to)
    spec["max_spans"] = max_spans
    keys = [f"{k}|{hashlib.sha256(np.ascontiguousarray(u.spans, np.float32).tobytes()).hexdigest()}"
            for k, u in zip(extraction.example_keys(examples), utterances)]
    extraction.prepare_mesh(encoder, mesh, batch_size)

    def compute(shard_examples, update):
        def forward(batch, inputs, sample_mask):
            spans = np.zeros((len(batch["ids"]), max_spans, 2), np.float32)
            for row, uid in enumerate(batch["ids"]):
                spans[row, :len(spans_by_id[uid])] = spans_by_id[uid]
            if mesh is not None:
                spans = runtime.global_rows(spans, mesh, batch_size, ("batch", None, None))
            return _jit_span_forward(encoder, inputs, sample_mask, spans)

        rows = extraction.pooled_rows(forward, encoder, shard_examples, batch_size, pad_to, mesh, update,
                                      select=lambda row, e: row[:len(spans_by_id[e.id])])
        return np.concatenate(rows)

    features = extraction.cached_rows(cache_dir, spec, examples, keys, batch_size * shard_batches, compute,
                                      desc="span features", rows_per_item=[len(u.spans) for u in utterances],
                                      progress=progress)
    labels = np.array([l for u in utterances for l in u.labels], object)
    sources = np.array([u.source for u in utterances for _ in u.labels], object)
    if features.shape[0] != len(labels):
        raise RuntimeError(f"cache under {cache_dir} holds {features.shape[0]} rows for {len(labels)} spans")
    return features, labels, sources


def load_span_encoder(spec: str, layer: int, seed: int = 0):
    """wav2vec2 encoder truncated to `layer` transformer layers; returns (encoder, identity string).

    `spec` is a checkpoint directory / Hub id (XLS-R: layer 15), or `random:small` for a random-weight
    XLS-R-style encoder (stable layer norm, hidden 256, 6 layers, 4 heads, 128-channel feature encoder)
    for offline smoke runs.
    """
    from encoders import wav2vec2

    if spec == "random:small":
        config = wav2vec2.Wav2Vec2Config(hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                                         intermediate_size=1024, conv_dim=(128,) * 7, feat_extract_norm="layer",
                                         conv_bias=True, do_stable_layer_norm=True, num_conv_pos_embeddings=64)
        if not 1 <= layer <= config.num_hidden_layers:
            raise ValueError(f"layer must be in [1, {config.num_hidden_layers}] for {spec}, got {layer}")
        config = dataclasses.replace(config, num_hidden_layers=layer)
        return wav2vec2.Wav2Vec2Encoder(config, rngs=nnx.Rngs(seed)), f"random-init XLS-R-style small (seed {seed}), layer {layer}"
    return wav2vec2.Wav2Vec2Encoder.from_pretrained(spec, num_layers=layer), f"{spec}, layer {layer}"


def split_by_source(sources, heldout: Sequence[str]) -> np.ndarray:
    """(n,) bool mask of spans from held-out sources; errors if a held-out source is absent or all are."""
    sources = np.asarray(sources, object)
    missing = sorted(set(heldout) - set(sources))
    if not heldout or missing:
        raise ValueError(f"held-out sources {missing or list(heldout)} are absent from the manifest "
                         f"(sources: {sorted(set(sources))}).")
    mask = np.isin(sources, list(heldout))
    if mask.all():
        raise ValueError("every source is held out: nothing to train on.")
    return mask


def manifest_features(manifest: str, encoder_spec: str, layer: int, cache_dir: str, *, seed: int = 0,
                      batch_size: int = 8, mesh=None):
    """(features, labels, sources, encoder identity) of every span of `manifest` (cached)."""
    encoder, identity = load_span_encoder(encoder_spec, layer, seed)
    features, labels, sources = extract_spans(encoder, load_phone_manifest(manifest), cache_dir=cache_dir,
                                              batch_size=batch_size, mesh=mesh)
    return features, labels, sources, identity
