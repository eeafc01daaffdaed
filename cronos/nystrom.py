"""Randomized Nyström approximation and the Nyström PCG preconditioner (Frangella, Tropp & Udell 2023).

Vectors are weight tensors of shape (d, C, P): C independent vectors of dimension N = d * P, so a
sketch of rank r is one batched operator application with C = r.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class NystromApprox(NamedTuple):
    """Rank-r approximation H ~ U diag(eigvals) U^T with U stored as (d, P, r), eigvals descending."""

    U: jax.Array
    eigvals: jax.Array


def _orthonormal_columns(A: jax.Array, eps) -> tuple[jax.Array, jax.Array]:
    """Orthonormal basis of A's column space through the eigendecomposition of A^T A (r x r).

    Returns (A V diag(s^-1), s^2) with columns of negligible singular value s zeroed. Cheaper to
    compile than a QR or SVD of the tall matrix and exact for the well-conditioned sketches here.
    """
    gram = A.T @ A
    vals, vecs = jnp.linalg.eigh(0.5 * (gram + gram.T))
    vals, vecs = vals[::-1], vecs[:, ::-1]  # descending
    keep = vals > jnp.max(vals) * A.shape[1] * eps
    inv_sing = jnp.where(keep, lax.rsqrt(jnp.where(keep, vals, 1.0)), 0.0)
    return A @ (vecs * inv_sing[None, :]), jnp.where(keep, vals, 0.0)


def nystrom_sketch(operator: Callable[[jax.Array], jax.Array], key: jax.Array, d: int, p: int, rank: int, dtype) -> NystromApprox:
    """Stable randomized Nyström approximation of a PSD operator on (d, C, P) tensors.

    Uses a shift nu = sqrt(N) * eps(dtype) * ||Y||_F that is meaningful in the working precision
    and eigendecompositions of r x r matrices (instead of Cholesky, QR and SVD), so a rank-deficient
    sketch (rank larger than the operator's rank, duplicate data, an all-zero operator) gives zero
    eigenvalues instead of NaN.
    """
    n_dim = d * p
    eps = jnp.finfo(dtype).eps
    omega, _ = _orthonormal_columns(jax.random.normal(key, (n_dim, rank), dtype=dtype), eps)
    omega_t = omega.reshape(d, p, rank).transpose(0, 2, 1)  # (d, r, P): r vectors
    sketch = operator(omega_t).transpose(0, 2, 1).reshape(n_dim, rank)
    shift = jnp.sqrt(jnp.asarray(n_dim, dtype)) * eps * jnp.linalg.norm(sketch)
    sketch = sketch + shift * omega
    core = omega.T @ sketch
    core_vals, core_vecs = jnp.linalg.eigh(0.5 * (core + core.T))
    keep = core_vals > jnp.max(core_vals) * rank * eps
    inv_sqrt = jnp.where(keep, lax.rsqrt(jnp.where(keep, core_vals, 1.0)), 0.0)
    U, sing2 = _orthonormal_columns(sketch @ (core_vecs * inv_sqrt[None, :]), eps)
    eigvals = jnp.maximum(sing2 - shift, 0.0)
    return NystromApprox(U=U.reshape(d, p, rank), eigvals=eigvals)


def nystrom_correction(approx: NystromApprox, scale, x: jax.Array) -> jax.Array:
    """Rank-r part of the inverse Nyström preconditioner of I + scale * H, applied to x (d, C, P).

    P^{-1} = I + U diag((scale * lam_r + 1) / (scale * lam + 1) - 1) U^T with lam_r the smallest
    eigenvalue; this returns P^{-1} x - x. Only `scale` depends on the ADMM penalty, so refreshing the
    preconditioner after a rho change costs nothing. U may carry an extra left factor (whitening).
    """
    lam = scale * approx.eigvals
    factors = (lam[-1] + 1.0) / (lam + 1.0) - 1.0
    coef = jnp.einsum("dpr,dcp->rc", approx.U, x)
    return jnp.einsum("dpr,rc->dcp", approx.U, factors[:, None] * coef)
