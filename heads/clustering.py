"""K-means in JAX and phone-clustering metrics (PNMI, phone purity, cluster purity, rare-phone tail purity).

    from heads import clustering
    km = clustering.kmeans(X, k=100, seed=0)            # km.centroids (k, d), km.assignments (n,), km.inertia
    clustering.pnmi(phones, km.assignments)             # I(phone; cluster) / H(phone)

K-means: greedy k-means++ initialisation (scikit-learn's: 2 + log k candidates per centre, the one that
lowers the potential most is kept), Lloyd iterations in a `lax.while_loop` until the squared centre shift
falls below tol x mean feature variance (scikit-learn's criterion) or `max_iter`; `n_init` restarts run
under `lax.map` and the lowest inertia wins. Everything is one jitted program, deterministic given `seed`.
With `mesh`, rows are split over the mesh axis of the "rows" sharding rule (`encoders.runtime`; zero-weight
rows pad n to a multiple of it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from encoders import runtime

__all__ = ["KMeansResult", "cluster_purity", "contingency", "kmeans", "phone_purity", "pnmi", "rare_phone_purity"]


class KMeansResult(NamedTuple):
    centroids: np.ndarray  # (k, d)
    assignments: np.ndarray  # (n,) int32
    inertia: float  # sum of squared distances to the assigned centroid
    n_iter: int  # Lloyd iterations of the best restart


def _sq_distances(x, x_sq, c):
    """(n, k) squared Euclidean distances, clamped at 0."""
    return jnp.maximum(x_sq[:, None] - 2.0 * x @ c.T + jnp.sum(c * c, axis=1)[None, :], 0.0)


def _kmeans_plus_plus(key, x, x_sq, w, k: int):
    """(k, d) greedy k-means++ centres of rows x with weights w."""
    n_trials = 2 + int(math.log(k))
    first_key, key = jax.random.split(key)
    first = jax.random.categorical(first_key, jnp.log(w))
    centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    closest = _sq_distances(x, x_sq, x[first][None])[:, 0]

    def body(i, carry):
        centres, closest = carry
        logits = jnp.log(jnp.maximum(closest * w, 0.0))
        logits = jnp.where(jnp.isfinite(logits), logits, jnp.where(w > 0, 0.0, -jnp.inf))  # all-zero potential
        candidates = jax.random.categorical(jax.random.fold_in(key, i), logits, shape=(n_trials,))
        trial = jnp.minimum(closest[:, None], _sq_distances(x, x_sq, x[candidates]))  # (n, trials)
        best = jnp.argmin(jnp.sum(trial * w[:, None], axis=0))
        return centres.at[i].set(x[candidates[best]]), trial[:, best]

    centres, _ = jax.lax.fori_loop(1, k, body, (centres, closest))
    return centres


def _lloyd(centres, x, x_sq, w, k: int, max_iter: int, tol):
    def step(centres):
        assign = jnp.argmin(_sq_distances(x, x_sq, centres), axis=1)
        sums = jax.ops.segment_sum(x * w[:, None], assign, num_segments=k)
        counts = jax.ops.segment_sum(w, assign, num_segments=k)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1e-30)[:, None], centres)  # empty: kept

    def cond(carry):
        _, i, shift = carry
        return (i < max_iter) & (shift > tol)

    def body(carry):
        centres, i, _ = carry
        new = step(centres)
        return new, i + 1, jnp.sum((new - centres) ** 2)

    centres, n_iter, _ = jax.lax.while_loop(cond, body, (centres, jnp.asarray(0), jnp.asarray(jnp.inf, x.dtype)))
    d = _sq_distances(x, x_sq, centres)
    assign = jnp.argmin(d, axis=1)
    inertia = jnp.sum(jnp.take_along_axis(d, assign[:, None], axis=1)[:, 0] * w)
    return centres, assign, inertia, n_iter


@jax.jit(static_argnames=("k", "n_init", "max_iter"))
def _kmeans(x, w, key, tol, *, k: int, n_init: int, max_iter: int):
    x_sq = jnp.sum(x * x, axis=1)
    mean = jnp.sum(x * w[:, None], 0) / jnp.sum(w)
    tol_abs = tol * jnp.mean(jnp.sum(w[:, None] * (x - mean) ** 2, 0) / jnp.sum(w))

    def restart(key):
        return _lloyd(_kmeans_plus_plus(key, x, x_sq, w, k), x, x_sq, w, k, max_iter, tol_abs)

    centres, assign, inertia, n_iter = jax.lax.map(restart, jax.random.split(key, n_init))
    best = jnp.argmin(inertia)
    return centres[best], assign[best], inertia[best], n_iter[best]


def kmeans(X, k: int, *, seed: int = 0, n_init: int = 3, max_iter: int = 100, tol: float = 1e-4,
           mesh: jax.sharding.Mesh | None = None) -> KMeansResult:
    """K-means of (n, d) rows into `k` clusters (best of `n_init` k-means++ restarts; see the module docstring).

    On a mesh spanning several processes, X must be the full data, identical on every process; so is the result.
    """
    x = np.asarray(X, np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"X must be a non-empty (n, d) array, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("X contains NaN or inf.")
    n = x.shape[0]
    if not 1 <= k <= n or n_init < 1 or max_iter < 1:
        raise ValueError(f"need 1 <= k <= n ({n}), n_init >= 1 and max_iter >= 1; got k={k}, n_init={n_init}, max_iter={max_iter}.")
    w = np.ones(n, np.float32)
    if mesh is not None:
        rows = runtime.logical_sharding(mesh, ("rows",))
        pad = -n % (1 if rows.spec[0] is None else runtime.data_shards(mesh, rows.spec[0]))
        x, w = np.pad(x, ((0, pad), (0, 0))), np.pad(w, (0, pad))
        x, w = runtime.place(x, runtime.logical_sharding(mesh, ("rows", None))), runtime.place(w, rows)
    out = _kmeans(x, w, jax.random.key(seed), tol, k=k, n_init=n_init, max_iter=max_iter)
    centres, assign, inertia, n_iter = jax.tree.map(runtime.to_host, out)
    return KMeansResult(centres, assign.astype(np.int32)[:n], float(inertia), int(n_iter))


def contingency(phone_labels, cluster_ids) -> np.ndarray:
    """(phones, clusters) count table of two equally long, non-empty label sequences."""
    phones, clusters = np.asarray(phone_labels), np.asarray(cluster_ids)
    if phones.ndim != 1 or phones.shape != clusters.shape:
        raise ValueError(f"phone labels and cluster ids must be 1-D of equal length; got {phones.shape} and {clusters.shape}.")
    if phones.size == 0:
        raise ValueError("empty label set: no phones to score.")
    _, p = np.unique(phones, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    table = np.zeros((p.max() + 1, c.max() + 1))
    np.add.at(table, (p, c), 1.0)
    return table


def pnmi(phone_labels, cluster_ids) -> float:
    """Phone-normalised mutual information I(phone; cluster) / H(phone) (natural logs; needs two phones)."""
    joint = contingency(phone_labels, cluster_ids)
    joint /= joint.sum()
    p_phone, p_cluster = joint.sum(1), joint.sum(0)
    h_phone = -np.sum(p_phone * np.log(p_phone))
    if h_phone <= 0:
        raise ValueError("PNMI needs at least two distinct phones (H(phone) = 0).")
    nz = joint > 0
    mutual = np.sum(joint[nz] * np.log(joint[nz] / np.outer(p_phone, p_cluster)[nz]))
    return float(mutual / h_phone)


def phone_purity(phone_labels, cluster_ids) -> float:
    """E_cluster[max_phone p(phone | cluster)], clusters weighted by size."""
    table = contingency(phone_labels, cluster_ids)
    return float(table.max(0).sum() / table.sum())


def cluster_purity(phone_labels, cluster_ids) -> float:
    """E_phone[max_cluster p(cluster | phone)], phones weighted by frequency."""
    table = contingency(phone_labels, cluster_ids)
    return float(table.max(1).sum() / table.sum())


def rare_phone_purity(phone_labels, cluster_ids, tail_fraction: float = 0.2) -> float:
    """Phone purity of the rare tail: the fraction of spans of the ceil(tail_fraction x #phones) least
    frequent phones (ties by label order) that lie in a cluster whose majority phone is their own."""
    if not 0 < tail_fraction <= 1:
        raise ValueError(f"tail_fraction must be in (0, 1], got {tail_fraction}.")
    table = contingency(phone_labels, cluster_ids)
    rare = np.argsort(table.sum(1), kind="stable")[:math.ceil(tail_fraction * table.shape[0])]
    majority = table.argmax(0)
    hits = np.isin(majority, rare) * table[majority, np.arange(table.shape[1])]
    return float(hits.sum() / table[rare].sum())
