"""jaxcld-compatible fixed mode: jaxcld 0.2.4's `admm` iteration, reimplemented in vectorised JAX.

Why it exists: the published CLD heads were trained with jaxcld 0.2.4's `CVX_ReLU_MLP` + `admm`
(rank-20 Nyström PCG, 6 ADMM x 32 PCG iterations, rho 0.1). `cronos.solve(problem, JaxcldConfig(...), key=key)`
reproduces those weights (float32 rounding apart) without importing jaxcld, so the published heads can be
retrained and checked from this repository alone.

What it reproduces, for the same data X, activation patterns D (jaxcld's `d_diags`, `e_diags = 2 D - 1`),
targets and PRNG key (jaxcld's `seed`):

  * the Nyström sketch of the full operator A = I + F^T F / rho + G^T G on weights u = (v, w), shape
    (2, d, P) vectorised row-major: `key, subkey = split(key)`, Omega = qr(normal(subkey, (2 P d, rank)))[0],
    Y = A Omega, shift nu = sqrt(rank) 1e-16 ||Y||, Y += nu Omega, C = chol(Omega^T Y),
    B = C^{-1} Y^T, U, S = svd(B^T), S = relu(S^2 - nu);
  * the preconditioner M u = (S_r + rho) U diag(1 / (S + rho)) U^T u + u - U U^T u;
  * PCG from zero for exactly `pcg_iters` iterations, run jointly over all classes: its step sizes
    alpha = (r . z) / (p . A p) and beta = (r' . z') / (r . z) sum over every class, as jaxcld's batched
    `pcg` does;
  * scaled ADMM from zeros: b = F^T Y / rho + v - lam + G^T (s - nu) (one-hot targets for labels),
    u = PCG(A, b), v = prox_{(beta / rho) ||.||}(u + lam) per column of each half,
    s = relu(G u + nu), lam += gamma (u - v), nu += gamma (G u - s).

Here F u = sum_i D_i X (v_i - w_i) and G u = ((2D - I) X v_i, (2D - I) X w_i). jaxcld's ADMM solves only
the cone-constrained ConvexReLU program, in float32, so this mode does too. Internally weights are
(d, C, 2, P), so every operator is one GEMM with X or X^T over all classes at once.

Agreement is up to float32 rounding, which jaxcld's iteration can amplify: once its fixed-length PCG has
reached the float32 floor, further iterations move the iterate by ~cond * eps, so jaxcld's own output
changes under any rounding change (another XLA fusion, thread count or reduction order; e.g. by ~6e-3 on
n = 1000, d = 128, P = 16 embedding-like data with the published 6 x 32 settings). Where jaxcld is itself
reproducible (tests/test_cronos_jaxcld.py), v and w agree to ~1e-5 relative.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular
from jax.sharding import Mesh

from cronos.admm import (
    SolveResult,
    _compiled,
    _flops_of,
    _local,
    _pad_rows,
    _place,
    _to_host,
    check_validation,
    place_rows,
)
from cronos.problems import ConvexReLU, GatedReLU, dual_bound, features_times_patterns

__all__ = ["JaxcldConfig", "solve_jaxcld"]

_GOLDEN = (1 + 5**0.5) / 2
_DTYPE = np.float32


def _positive_int(name: str, value) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 1
    if not ok:
        raise ValueError(f"JaxcldConfig.{name} must be a positive integer, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class JaxcldConfig:
    """jaxcld 0.2.4 `admm` settings (its `admm_params` and the model's `rho`).

    Attributes:
      rank: Nyström sketch rank (jaxcld `rank`); at most 2 d P, checked at solve.
      admm_iters: ADMM iterations (jaxcld `admm_iters`), always all run.
      pcg_iters: PCG iterations per u-update (jaxcld `pcg_iters`), always all run, from zero.
      rho: ADMM penalty (jaxcld `CVX_ReLU_MLP(..., rho, ...)`), positive and finite.
      gamma: dual step (jaxcld `gamma_ratio`), 0 < gamma < (1 + sqrt 5) / 2.
    The group-lasso strength beta is the problem's `beta`.
    """

    rank: int = 20
    admm_iters: int = 6
    pcg_iters: int = 32
    rho: float = 0.1
    gamma: float = 1.0

    def __post_init__(self):
        for name in ("rank", "admm_iters", "pcg_iters"):
            _positive_int(name, getattr(self, name))
        for name in ("rho", "gamma"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"JaxcldConfig.{name} must be a real number, got {value!r}.")  # noqa: TRY004
        if not (np.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"JaxcldConfig.rho must be a positive finite number, got {self.rho!r}.")
        if not 0 < self.gamma < _GOLDEN:
            raise ValueError(f"JaxcldConfig.gamma must lie in (0, {_GOLDEN:.3f}) for ADMM to converge, got {self.gamma!r}.")


class _Statics(NamedTuple):
    rank: int
    admm_iters: int
    pcg_iters: int
    with_validation: bool
    row_sharding: Any


# ----------------------------------------------------------------------------------------------
# Operators on weight batches u (d, B, 2, P): B vectors of jaxcld's (2, d, P) tensors.


def _gemm(X, u):
    """X u for u (d, ...): (n, ...)."""
    return (X @ u.reshape(u.shape[0], -1)).reshape((X.shape[0],) + u.shape[1:])


def _apply_A(X, XT, Dm, rho, u):
    """(I + F^T F / rho + G^T G) u; G^T G = I (x) X^T X since (2D - I)^2 = I."""
    Xu = _gemm(X, u)  # (n, B, 2, P)
    f = jnp.einsum("nbp,np->nb", Xu[:, :, 0] - Xu[:, :, 1], Dm)  # F u
    fd = (f / rho)[:, :, None] * Dm[:, None, :]
    return u + _gemm(XT, Xu + jnp.stack([fd, -fd], axis=2))


def _apply_M(U, S, rho, x):
    """jaxcld's Nys_Precond.apply on every vector of x (d, B, 2, P); U is (d, 2, P, r)."""
    coef = jnp.einsum("dhpr,dbhp->br", U, x)
    low = (S[-1] + rho) * jnp.einsum("dhpr,br->dbhp", U, coef / (S + rho))
    return low + x - jnp.einsum("dhpr,br->dbhp", U, coef)


def _nystrom(X, XT, Dm, rho, key, rank: int):
    """jaxcld's rand_nys_appx of A (rho inside); returns U (d, 2, P, r) and S (r,)."""
    d, P = X.shape[1], Dm.shape[1]
    N = 2 * d * P
    _, subkey = jax.random.split(key)
    omega = jnp.linalg.qr(jax.random.normal(subkey, (N, rank), dtype=_DTYPE))[0]
    batch = omega.reshape(2, d, P, rank).transpose(1, 3, 0, 2)  # (d, r, 2, P)
    Y = _apply_A(X, XT, Dm, rho, batch).transpose(2, 0, 3, 1).reshape(N, rank)
    shift = jnp.sqrt(jnp.asarray(rank, _DTYPE)) * jnp.asarray(1e-16, _DTYPE) * jnp.linalg.norm(Y)
    Y = Y + shift * omega
    chol = jnp.linalg.cholesky(omega.T @ Y)
    B = solve_triangular(chol, Y.T, lower=True)
    U, S, _ = lax.linalg.svd(B.T, full_matrices=False)
    S = jax.nn.relu(S**2 - shift)
    return U.reshape(2, d, P, rank).transpose(1, 0, 2, 3), S


# ----------------------------------------------------------------------------------------------
# PCG (jaxcld's `_pcg`: from zero, fixed iteration count, scalars joint over the whole batch).


class _PCGState(NamedTuple):
    x: jax.Array
    r: jax.Array
    z: jax.Array
    p: jax.Array
    rz: jax.Array


def _pcg_body(state: _PCGState, X, XT, Dm, U, S, rho) -> _PCGState:
    w = _apply_A(X, XT, Dm, rho, state.p)
    alpha = state.rz / jnp.sum(w * state.p)
    x = state.x + alpha * state.p
    r = state.r - alpha * w
    z = _apply_M(U, S, rho, r)
    rz = jnp.sum(r * z)
    p = z + (rz / state.rz) * state.p
    return _PCGState(x, r, z, p, rz)


def _pcg(b, X, XT, Dm, U, S, rho, iters: int):
    z = _apply_M(U, S, rho, b)
    state = _PCGState(jnp.zeros_like(b), b, z, z, jnp.sum(b * z))
    if iters == 1:  # no loop: keeps XLA's cost analysis of the step exact
        return _pcg_body(state, X, XT, Dm, U, S, rho).x
    return lax.fori_loop(0, iters, lambda _, st: _pcg_body(st, X, XT, Dm, U, S, rho), state).x


# ----------------------------------------------------------------------------------------------
# ADMM.


class _Carry(NamedTuple):
    v: jax.Array  # (d, C, 2, P)
    lam: jax.Array  # (d, C, 2, P)
    s: jax.Array  # (n, C, 2, P)
    nu: jax.Array  # (n, C, 2, P)
    gts: jax.Array  # G^T s
    gt_rhs: jax.Array  # G^T (s - nu), the slack part of the next right-hand side


def _sq(x):
    return jnp.sum(x * x)


def _step(carry: _Carry, X, XT, Dm, Y, b1, U, S, beta, rho, gamma, Xval, yval, pcg_iters: int, with_validation: bool):
    """One jaxcld ADMM iteration and its history record."""
    v, lam = carry.v, carry.lam
    E = 2.0 * Dm - 1.0
    u = _pcg(b1 + v - lam + carry.gt_rhs, X, XT, Dm, U, S, rho, pcg_iters)

    z = u + lam
    t = beta / rho
    norms = jnp.sqrt(jnp.sum(z * z, axis=0, keepdims=True))
    v_new = (1.0 - t / jnp.maximum(jnp.maximum(t, norms), jnp.finfo(_DTYPE).tiny)) * z

    Gu = E[:, None, None, :] * _gemm(X, u)
    s_new = jax.nn.relu(Gu + carry.nu)
    lam_new = lam + (u - v_new) * gamma
    nu_new = carry.nu + (Gu - s_new) * gamma
    gt = _gemm(XT, E[:, None, None, :] * jnp.concatenate([s_new, s_new - nu_new], axis=2))  # one GEMM
    gts_new, gt_rhs_new = gt[:, :, :2], gt[:, :, 2:]

    # History of the v iterate (solver dtype).
    Xv = _gemm(X, v_new)
    pred = jnp.einsum("ncp,np->nc", Xv[:, :, 0] - Xv[:, :, 1], Dm)
    relu = jnp.maximum(Xv, 0.0)
    reg = beta * jnp.sum(jnp.sqrt(jnp.sum(v_new * v_new, axis=0)))
    Gv = E[:, None, None, :] * Xv
    record = {
        "objective": 0.5 * _sq(pred - Y) + reg,
        "network_objective": 0.5 * _sq(jnp.sum(relu[:, :, 0] - relu[:, :, 1], axis=-1) - Y) + reg,
        "dual_bound": dual_bound(XT, Dm, Y, pred - Y, jnp.maximum(-rho * nu_new, 0.0) * E[:, None, None, :], beta),
        "primal_residual": jnp.sqrt(_sq(u - v_new) + _sq(Gu - s_new)),
        "dual_residual": rho * jnp.sqrt(_sq(v_new - v + gts_new - carry.gts)),
        "constraint_violation": jnp.sqrt(_sq(jnp.minimum(Gv, 0.0))) / jnp.maximum(jnp.sqrt(_sq(Gv)), jnp.finfo(_DTYPE).tiny),
        "pcg_iterations": jnp.asarray(pcg_iters, jnp.int32),
        "rho": rho,
    }
    if with_validation:
        # Theorem-1 network, as jaxcld's get_ncvx_weights + stacked_predict: relu(X W1) W2.
        col = jnp.sqrt(jnp.sqrt(jnp.sum(v_new * v_new, axis=0)))  # (C, 2, P) sqrt ||v_i||, sqrt ||w_i||
        hidden = jnp.where(col > 0, v_new / jnp.where(col > 0, col, 1.0), 0.0)
        outer = col * jnp.asarray([1.0, -1.0], _DTYPE)[None, :, None]
        scores = jnp.einsum("mchp,chp->mc", jax.nn.relu(_gemm(Xval, hidden)), outer)
        record["val_accuracy"] = jnp.mean((jnp.argmax(scores, axis=1) == yval).astype(_DTYPE))
    return _Carry(v_new, lam_new, s_new, nu_new, gts_new, gt_rhs_new), record


def _initial_carry(n, d, C, P, statics: _Statics) -> _Carry:
    zeros_w = jnp.zeros((d, C, 2, P), _DTYPE)
    zeros_s = jnp.zeros((n, C, 2, P), _DTYPE)
    if statics.row_sharding is not None:
        zeros_s = lax.with_sharding_constraint(zeros_s, statics.row_sharding)
    return _Carry(zeros_w, zeros_w, zeros_s, zeros_s, zeros_w, zeros_w)


def _jaxcld_setup(X, XT, Dm, Y, rho, key, *, statics: _Statics):
    U, S = _nystrom(X, XT, Dm, rho, key, statics.rank)
    fty = features_times_patterns(XT, Dm, Y) / rho
    return U, S, jnp.stack([fty, -fty], axis=2)


def _jaxcld_solve(X, XT, Dm, Y, beta, rho, gamma, key, Xval, yval, *, statics: _Statics):
    U, S, b1 = _jaxcld_setup(X, XT, Dm, Y, rho, key, statics=statics)
    carry = _initial_carry(X.shape[0], X.shape[1], Y.shape[1], Dm.shape[1], statics)

    def body(carry, _):
        return _step(carry, X, XT, Dm, Y, b1, U, S, beta, rho, gamma, Xval, yval, statics.pcg_iters, statics.with_validation)

    carry, history = lax.scan(body, carry, None, length=statics.admm_iters)
    return carry.v, history, S


# FLOP counting: loop-free executables (XLA's cost analysis counts a loop body once).


def _jaxcld_step_once(X, XT, Dm, Y, b1, U, S, v, lam, s, nu, gts, gt_rhs, beta, rho, gamma, Xval, yval, *, statics):
    """One ADMM step with a single PCG iteration."""
    return _step(_Carry(v, lam, s, nu, gts, gt_rhs), X, XT, Dm, Y, b1, U, S, beta, rho, gamma, Xval, yval, 1,
                 statics.with_validation)


def _jaxcld_pcg_iteration(X, XT, Dm, U, S, rho, x, r, z, p, rz, *, statics):
    """One PCG iteration."""
    return _pcg_body(_PCGState(x, r, z, p, rz), X, XT, Dm, U, S, rho)


def _count_flops(X, XT, Dm, Y, beta, rho, gamma, key, Xval, yval, statics: _Statics, pcg_iterations) -> dict:
    setup_args = (X, XT, Dm, Y, rho, key)
    setup_exe, _ = _compiled(_jaxcld_setup, statics, setup_args)
    U, S, b1 = setup_exe(*setup_args)
    carry = _initial_carry(X.shape[0], X.shape[1], Y.shape[1], Dm.shape[1], statics._replace(row_sharding=None))
    if statics.row_sharding is not None:
        carry = carry._replace(s=_place(carry.s, statics.row_sharding),
                               nu=_place(carry.nu, statics.row_sharding))
    step_exe, _ = _compiled(_jaxcld_step_once, statics, (X, XT, Dm, Y, b1, U, S) + tuple(carry) + (beta, rho, gamma, Xval, yval))
    pcg_args = (X, XT, Dm, U, S, rho, b1, b1, b1, b1, jnp.asarray(1.0, _DTYPE))
    pcg_exe, _ = _compiled(_jaxcld_pcg_iteration, statics, pcg_args)
    setup, step_once, pcg_body = _flops_of(setup_exe), _flops_of(step_exe), _flops_of(pcg_exe)
    admm_iterations = len(pcg_iterations)
    pcg_total = int(np.sum(pcg_iterations))
    outside = step_once - pcg_body
    return {
        "total": setup + admm_iterations * outside + pcg_total * pcg_body,
        "setup": setup,
        "per_admm_step_excluding_pcg": outside,
        "per_pcg_iteration": pcg_body,
        "admm_iterations": admm_iterations,
        "pcg_iterations": pcg_total,
    }


def solve_jaxcld(problem, config: JaxcldConfig, key=None, *, validation=None, mesh: Mesh | None = None,
                 rows_axis: str | None = "data") -> SolveResult:
    """Runs jaxcld 0.2.4's `admm` on a ConvexReLU program; iterates equal jaxcld's up to float32 rounding.

    Args:
      problem: `cronos.ConvexReLU` (GatedReLU is refused: jaxcld's ADMM solves the cone-constrained program).
      config: `JaxcldConfig`.
      key: PRNG key, jaxcld's `seed` (default `jax.random.key(0)`).
      validation: optional (X_val, y_val) with integer labels; fills history["val_accuracy"] with the accuracy
        of the Theorem-1 network after every iteration (jaxcld's metrics["val_acc"]).
      mesh, rows_axis: optional mesh whose `rows_axis` (None: replicated) the rows of X, D and Y are sharded over
        (zero rows pad n); as in `cronos.solve`, on several processes the data is the full data on every one.
    Usually called as `cronos.solve(problem, JaxcldConfig(...), key=key)`. `nystrom_eigvals` of the result are
    jaxcld's S: the sketched eigenvalues of the full operator A = I + F^T F / rho + G^T G (so >= 1).
    """
    if isinstance(problem, GatedReLU):
        raise ValueError(  # noqa: TRY004 (a valid problem, the wrong program for this mode)
            "JaxcldConfig reproduces jaxcld's ADMM for ConvexReLU; a GatedReLU program has no jaxcld "
            "counterpart (use cronos.ADMMConfig).")
    if not isinstance(problem, ConvexReLU):
        raise TypeError(f"problem must be cronos.ConvexReLU, got {type(problem).__name__}.")
    if not isinstance(config, JaxcldConfig):
        raise TypeError(f"config must be a cronos.JaxcldConfig, got {type(config).__name__}.")
    d, P = problem.num_features, problem.num_patterns
    if config.rank > 2 * d * P:
        raise ValueError(f"JaxcldConfig.rank {config.rank} exceeds the dimension 2 d P = {2 * d * P} of the sketched "
                         f"operator; use rank <= {2 * d * P}.")
    key = jax.random.key(0) if key is None else key

    X = problem.X.astype(_DTYPE)
    Dm = problem.patterns.astype(_DTYPE)
    Y = problem.Y.astype(_DTYPE)
    X, Dm, Y = _pad_rows(mesh, rows_axis, X, Dm, Y)

    Xval = yval = None
    if validation is not None:
        Xval, yval = check_validation(validation, problem)
        Xval, yval = jnp.asarray(Xval.astype(_DTYPE)), jnp.asarray(yval.astype(np.int32))

    X, XT, Dm, Y, row_sharding = place_rows(mesh, rows_axis, X, Dm, Y)

    statics = _Statics(rank=int(config.rank), admm_iters=int(config.admm_iters), pcg_iters=int(config.pcg_iters),
                       with_validation=validation is not None, row_sharding=row_sharding)
    beta, rho, gamma = (jnp.asarray(x, _DTYPE) for x in (problem.beta, config.rho, config.gamma))
    args = (X, XT, Dm, Y, beta, rho, gamma, key, Xval, yval)
    executable, compile_seconds = _compiled(_jaxcld_solve, statics, args)
    start = time.perf_counter()
    v, history, S = executable(*args)
    jax.block_until_ready(v)
    run_seconds = time.perf_counter() - start

    v, (history, S) = _local(v), jax.tree.map(_to_host, (history, S))
    v = jnp.transpose(v, (1, 2, 0, 3))  # (C, 2, d, P)

    def count_flops(pcg_iterations):
        return _count_flops(X, XT, Dm, Y, beta, rho, gamma, key, Xval, yval, statics, pcg_iterations)

    return SolveResult(
        v=v[:, 0], w=v[:, 1], history=history, iterations=int(config.admm_iters), converged=False,
        rho=float(config.rho), compile_seconds=compile_seconds, run_seconds=run_seconds,
        nystrom_eigvals=S, gates=problem.gates, has_cone=True, _flop_counter=count_flops,
    )
