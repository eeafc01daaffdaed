"""Convex ReLU language-detection head: a two-layer ReLU network fitted by `cronos` on pooled embeddings.

Class-c score = relu(x @ W1[c]) @ w2[c] with W1 (C, d, 2P), w2 (C, 2P) from `SolveResult.mlp_weights()`
(one-vs-all: each class has its own 2P hidden units, as in the published jaxcld heads).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

import cronos
from encoders import runtime
from heads import legacy
from heads.base import (
    Head,
    check_embeddings,
    check_languages,
    encode_labels,
    input_statistics,
    normalize_inputs,
)

__all__ = ["ConvexReLUHead", "convex_relu_logits"]


@jax.jit
def convex_relu_logits(params: dict, x: jax.Array) -> jax.Array:
    """(B, C) logits relu(x @ W1[c]) @ w2[c], computed exactly as jaxcld's `stacked_predict`."""
    return jax.vmap(lambda w1, w2: jax.nn.relu(x @ w1) @ w2)(params["W1"], params["w2"]).T


class ConvexReLUHead(Head):
    """Two-layer ReLU head trained to the optimum of its convex reformulation (CRONOS ADMM)."""

    head_type = legacy.HEAD_TYPE
    forward = staticmethod(convex_relu_logits)

    @classmethod
    def fit(cls, embeddings, labels, languages, *, n_patterns: int = 64, beta: float = 1e-3, rho: float | None = None,
            rank: int = 20, admm_iters: int = 6, pcg_iters: int = 32, gamma: float = 1.0, tol: float | None = None,
            seed: int = 1024, mesh=None, encoder: str | None = None, pooling: str = "mean",
            validation=None, input_norm: str = "none") -> "ConvexReLUHead":
        """Fits on (n, d) pooled embeddings; labels are ints 0..C-1 in sorted-language order or ISO codes.

        Defaults are the published CLD settings (P = 64 patterns, 6 ADMM x 32 PCG iterations, rho 0.1). With
        `tol`, the fast exact path `cronos.default_config` runs instead (at most `admm_iters` iterations; rho
        None = its default). `seed` draws the activation patterns and the Nyström sketch; `mesh` goes to
        `cronos.solve`, rows split over the mesh axis of the "rows" rule (`encoders.runtime`); on several
        processes the embeddings and labels must be the full data, identical on every process (so is the head).
        `validation=(embeddings, labels)` records the validation accuracy of every ADMM iteration in
        `train_info["val_accuracy_history"]`. `input_norm` ("none", "center", "standardize") stores training
        statistics in the head and applies them to every input (see `heads.base.input_statistics`).
        """
        languages = check_languages(languages)
        x = check_embeddings(embeddings)
        y = encode_labels(labels, languages, x.shape[0])
        stats = input_statistics(x, input_norm)
        x = normalize_inputs(stats, x)
        pattern_key, sketch_key = jax.random.split(jax.random.key(seed))
        patterns = cronos.sample_patterns(pattern_key, x, n_patterns)
        problem = cronos.ConvexReLU(x, y, patterns=np.asarray(patterns), beta=beta)
        if tol is None:  # the published fixed iteration
            config = cronos.ADMMConfig(rho=0.1 if rho is None else rho, rank=rank, admm_iters=admm_iters,
                                       pcg_iters=pcg_iters, gamma=gamma)
        else:  # the fast exact path, at most admm_iters iterations
            config = dataclasses.replace(cronos.default_config(problem, tol, max_iters=admm_iters), rho=rho,
                                         rank=rank, pcg_iters=pcg_iters, gamma=gamma)
        if validation is not None:
            validation = (normalize_inputs(stats, check_embeddings(validation[0], x.shape[1])),
                          encode_labels(validation[1], languages, len(validation[0])))
        rows_axis = None if mesh is None else runtime.logical_sharding(mesh, ("rows",)).spec[0]
        result = cronos.solve(problem, config, key=sketch_key, mesh=mesh, rows_axis=rows_axis, validation=validation)
        W1, w2 = result.mlp_weights()
        hyperparameters = dict(n_patterns=n_patterns, beta=beta, rho=rho, rank=rank, admm_iters=admm_iters,
                               pcg_iters=pcg_iters, gamma=gamma, tol=tol)
        metadata = cls.make_metadata(languages, x.shape[1], hyperparameters=hyperparameters, seeds=dict(seed=seed),
                                     encoder=encoder, pooling=pooling, trainer="cronos", input_norm=input_norm)
        start = time.perf_counter()
        flops = result.flops["total"]  # compiles three more executables (setup, step, PCG body) for XLA's count
        train_info = dict(compile_seconds=result.compile_seconds, run_seconds=result.run_seconds,
                          flop_count_seconds=time.perf_counter() - start,
                          flops=flops, admm_iterations=result.iterations, converged=result.converged,
                          objective=result.history["objective"].tolist(),
                          val_accuracy_history=result.history.get("val_accuracy", np.zeros(0)).tolist())
        return cls(dict(W1=np.asarray(W1), w2=np.asarray(w2), **stats), metadata, train_info)

    @classmethod
    def from_legacy(cls, pkl_path: str, languages=None, *, encoder: str | None = None,
                    pooling: str = "mean") -> "ConvexReLUHead":
        """Head from a released jaxcld `model.pkl` (restricted unpickling, see `heads.legacy`).

        `languages` default to the published label order for 2 classes (en, zh) or 5 (en, hi, id, ms, zh);
        other class counts need them explicitly.
        """
        return cls(*legacy.read_legacy_head(pkl_path, languages, encoder=encoder, pooling=pooling))

    @classmethod
    def load(cls, path: str, languages=None) -> "ConvexReLUHead":
        """Loads a saved directory, or a legacy jaxcld `model.pkl` (then see `from_legacy` for `languages`)."""
        if legacy.is_legacy_path(path):
            return cls.from_legacy(path, languages)
        head = super().load(path)
        if languages is not None and tuple(check_languages(languages)) != head.languages:
            raise ValueError(f"{path} was saved with languages {list(head.languages)}, not {sorted(languages)}.")
        return head
