"""Batched preconditioned conjugate gradient with `lax.while_loop`.

Solves A x_c = b_c for every class c at once; x, b are (d, C, P) tensors and each class is one
vector of dimension d * P. Classes that converge are frozen while the others continue.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class PCGResult(NamedTuple):
    """Solution, number of operator applications in the loop, and final relative residual per class."""

    x: jax.Array
    iterations: jax.Array
    relative_residual: jax.Array


def _class_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(a * b, axis=(0, 2))


def pcg(matvec: Callable, precondition: Callable, b: jax.Array, x0: jax.Array, rtol, max_iters: int) -> PCGResult:
    """Runs PCG from x0 until every class has ||b - A x|| <= rtol * ||b|| or max_iters is reached."""
    tiny = jnp.finfo(b.dtype).tiny
    b_norm = jnp.sqrt(_class_dot(b, b))
    denom = jnp.maximum(b_norm, tiny)
    r0 = b - matvec(x0)
    z0 = precondition(r0)
    rz0 = _class_dot(r0, z0)
    relres0 = jnp.sqrt(_class_dot(r0, r0)) / denom

    def active(relres, rz):
        return (relres > rtol) & (rz > tiny)

    def cond(state):
        x, r, z, p, rz, relres, k = state
        return (k < max_iters) & jnp.any(active(relres, rz))

    def body(state):
        x, r, z, p, rz, relres, k = state
        live = active(relres, rz)
        Ap = matvec(p)
        pAp = _class_dot(p, Ap)
        alpha = jnp.where(live & (pAp > tiny), rz / jnp.where(pAp > tiny, pAp, 1.0), 0.0)
        x = x + alpha[None, :, None] * p
        r = r - alpha[None, :, None] * Ap
        z = precondition(r)
        rz_new = _class_dot(r, z)
        beta = jnp.where(live, rz_new / jnp.where(rz > tiny, rz, 1.0), 0.0)
        p = jnp.where(live[None, :, None], z + beta[None, :, None] * p, p)
        rz = jnp.where(live, rz_new, rz)
        relres = jnp.where(live, jnp.sqrt(_class_dot(r, r)) / denom, relres)
        return x, r, z, p, rz, relres, k + 1

    state = (x0, r0, z0, z0, rz0, relres0, jnp.asarray(0, jnp.int32))
    x, _, _, _, _, relres, k = lax.while_loop(cond, body, state)
    return PCGResult(x=x, iterations=k, relative_residual=relres)
