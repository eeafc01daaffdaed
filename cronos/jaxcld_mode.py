"""jaxcld-compatible fixed mode: jaxcld 0.2.4's `admm` iteration, reproduced operation for operation.

Why it exists: the published CLD heads were trained with jaxcld 0.2.4's `CVX_ReLU_MLP` + `admm`
(rank-20 Nyström PCG, 6 ADMM x 32 PCG iterations, rho 0.1). `cronos.solve(problem, JaxcldConfig(...), key=key)`
reproduces those weights without importing jaxcld, so the published heads can be retrained and checked from
this repository alone.

What it computes, for the same data X, activation patterns D (jaxcld's `d_diags`, `e_diags = 2 D - 1`),
targets and PRNG key (jaxcld's `seed`):

  * the Nyström sketch of the full operator A = I + F^T F / rho + G^T G on weights u = (v, w), shape
    (2, d, P) vectorised row-major: `key, subkey = split(key)`, Omega = qr(normal(subkey, (2 P d, rank)))[0],
    Y = A Omega, shift nu = sqrt(rank) 1e-16 ||Y||, Y += nu Omega, C = chol(Omega^T Y),
    B = C^{-1} Y^T, U, S = svd(B^T), S = relu(S^2 - nu);
  * the preconditioner M u = (S_r + rho) U diag(1 / (S + rho)) U^T u + u - U U^T u;
  * PCG from zero for exactly `pcg_iters` iterations, run jointly over all classes: its step sizes
    alpha = (r . z) / (p . A p) and beta = (r' . z') / (r . z) sum over every class;
  * scaled ADMM from zeros: b = F^T Y / rho + v - lam + G^T (s - nu) (one-hot targets for labels),
    u = PCG(A, b), v = prox_{(beta / rho) ||.||}(u + lam) per column of each half,
    s = relu(G u + nu), lam += gamma (u - v), nu += gamma (G u - s).

Why operation for operation: with the published settings jaxcld's fixed-length PCG runs past the float32
floor, where every further iteration amplifies rounding, so jaxcld's own output moves by ~1e-2 relative under
any change of rounding (another XLA fusion, a reordered sum) on embedding-sized problems. A vectorised
reimplementation (one GEMM for all classes) agreed with it to 1e-5 on small problems but only to ~2e-2 on
n = 1000, d = 768. So this mode issues the same JAX operations in the same order, with the same jit
boundaries (per-class operators under `vmap`, one jitted 32-step PCG, eager ADMM updates, the same Python
scalars): XLA then compiles the same programs and, on the same JAX version and machine, the iterates are
jaxcld's bit for bit (tests/test_cronos_jaxcld.py). It is therefore as slow as jaxcld; `cronos.ADMMConfig`
(the same 6 x 32 iteration, vectorised) and the default tolerance path are the fast modes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular
from jax.sharding import Mesh

from cronos.admm import (
    SolveResult,
    _flops_of,
    _local,
    _pad_rows,
    _to_host,
    check_validation,
    place_rows,
)
from cronos.problems import ConvexReLU, GatedReLU, dual_bound

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


# ----------------------------------------------------------------------------------------------
# Operators, as jaxcld's CVX_ReLU_MLP: one class's weights are a (2, d, P) tensor, batches over classes are
# vmapped, every operator is jitted with the operator object as a pytree and rho as a static Python float.


@jax.tree_util.register_pytree_node_class
class _Operators:
    """F, G and A = I + F^T F / rho + G^T G of the ConvexReLU program (jaxcld's CVX_ReLU_MLP operators)."""

    def __init__(self, X, d_diags, e_diags, num_patterns: int, rho: float):
        self.X, self.d_diags, self.e_diags = X, d_diags, e_diags
        self.num_patterns, self.rho = num_patterns, rho

    def tree_flatten(self):
        return (self.X, self.d_diags, self.e_diags), (self.num_patterns, self.rho)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @jax.jit
    def matvec_F(self, vec):
        """F u = sum_i D_i X (v_i - w_i) for one class: (n,)."""
        Xdiff = self.X @ (vec[0, :, :] - vec[1, :, :])
        return (self.d_diags * Xdiff).sum(axis=1)

    @jax.jit
    def rmatvec_Fi(self, i, vec):
        """X^T D_i vec."""
        return self.X.T @ (self.d_diags[:, i] * vec)

    @jax.jit
    def rmatvec_F(self, vec):
        """F^T vec for one class: (2, d, P)."""
        out = jnp.zeros((2, self.X.shape[1], self.num_patterns))
        for i in range(self.num_patterns):
            column = self.rmatvec_Fi(i, vec)
            out = out.at[0, :, i].set(column)
            out = out.at[1, :, i].set(-column)
        return out

    @jax.jit
    def matvec_G(self, vec):
        """G u = ((2D - I) X v_i, (2D - I) X w_i) for one class: (2, n, P)."""
        out = jnp.zeros((2, self.X.shape[0], self.num_patterns))
        out = out.at[0, :, :].set(self.e_diags * (self.X @ vec[0, :, :]))
        return out.at[1, :, :].set(self.e_diags * (self.X @ vec[1, :, :]))

    @jax.jit
    def rmatvec_G(self, vec):
        """G^T vec for one class: (2, d, P)."""
        out = jnp.zeros((2, self.X.shape[1], self.num_patterns))
        out = out.at[0, :, :].set(self.X.T @ (self.e_diags * vec[0, :, :]))
        return out.at[1, :, :].set(self.X.T @ (self.e_diags * vec[1, :, :]))

    @jax.jit
    def matvec_A(self, vec):
        """A u for one class."""
        out = vec + 1 / self.rho * self.rmatvec_F(self.matvec_F(vec))
        return out + self.rmatvec_G(self.matvec_G(vec))

    def batch(self, name: str, vecs):
        """Operator `name` on every class of `vecs` (vmapped)."""
        return jax.vmap(getattr(self, name))(vecs)


@jax.tree_util.register_pytree_node_class
class _Preconditioner:
    """jaxcld's Nys_Precond: M u = (S_r + rho) U diag(1 / (S + rho)) U^T u + u - U U^T u."""

    def __init__(self, U, S, d: int, rho: float, num_patterns: int):
        self.U, self.S, self.d, self.rho, self.num_patterns = U, S, d, rho, num_patterns

    def tree_flatten(self):
        return (self.U, self.S), (self.d, self.rho, self.num_patterns)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @jax.jit
    def apply(self, u):
        """M u for one class's (2, d, P) tensor."""
        u = jnp.reshape(u, (-1,))
        Utu = self.U.T @ u
        u = (self.S[-1] + self.rho) * (self.U @ (Utu / (self.S + self.rho))) + u - self.U @ Utu
        return jnp.reshape(u, (2, self.d, self.num_patterns))

    def batch_apply(self, vecs):
        """M on every class."""
        return jax.vmap(self.apply)(vecs)


def _nystrom(ops: _Operators, rank: int, key) -> _Preconditioner:
    """jaxcld's rand_nys_appx of A (eager operations, as jaxcld runs them)."""
    d, P = ops.X.shape[1], ops.num_patterns
    _, subkey = jax.random.split(key)
    omega = jax.random.normal(subkey, (2 * P * d, rank))
    omega = jnp.linalg.qr(omega)[0]
    Y = jax.vmap(lambda col: jnp.reshape(ops.matvec_A(jnp.reshape(col, (2, d, P))), (-1,)))(omega.T).T
    shift = jnp.sqrt(rank) * 10**-16 * (jnp.linalg.norm(Y))
    Y += shift * omega
    chol = jnp.linalg.cholesky(omega.T @ Y)
    B = solve_triangular(chol, Y.T, lower=True)
    U, S, _ = lax.linalg.svd(B.T, full_matrices=False)
    return _Preconditioner(U, jax.nn.relu(S**2 - shift), d, ops.rho, P)


def _pcg_step(state, ops: _Operators, precond: _Preconditioner):
    """One PCG iteration on all classes at once; state (x, r, z, p, r.z, k) with the scalars joint over classes."""
    x, r, _, p, rz, k = state
    w = ops.batch("matvec_A", p)
    alpha = rz / jnp.sum(w * p)
    x = x + alpha * p
    r = r - alpha * w
    z = precond.batch_apply(r)
    rz_new = jnp.sum(r * z)
    return x, r, z, z + (rz_new / rz) * p, rz_new, k + 1


@functools.partial(jax.jit, static_argnames=["iters"])
def _pcg(b, ops: _Operators, precond: _Preconditioner, iters: int):
    """jaxcld's _pcg: `iters` PCG iterations from zero, unrolled. Returns (x, r, k) as jaxcld's does: the
    outputs a program returns steer XLA's fusion, hence its rounding."""
    z = precond.batch_apply(b)
    state = (jnp.zeros_like(b), b, z, jnp.copy(z), jnp.sum(b * z), 0)
    for _ in range(iters):
        state = _pcg_step(state, ops, precond)
    return state[0], state[1], state[5]


@jax.jit
def _prox_group_l2(z, beta, gamma):
    """prox of gamma beta ||.||_2 on every column of a (d, P) block."""
    norms = jnp.linalg.norm(z, axis=0)
    return (1 - beta * gamma / jnp.maximum(beta * gamma, norms)) * z


def _admm_step(ops: _Operators, precond: _Preconditioner, b_1, iterate, beta: float, gamma: float, pcg_iters: int):
    """One jaxcld ADMM iteration on (u, v, s, lam, nu); returns the new iterate and G u."""
    _, v, s, lam, nu = iterate
    b = b_1 + v - lam + ops.batch("rmatvec_G", s - nu)
    u, _, _ = _pcg(b, ops, precond, pcg_iters)
    prox = jax.vmap(lambda Z: _prox_group_l2(Z, beta, 1 / ops.rho))
    v = v.at[:, 0, :].set(prox(u[:, 0, :] + lam[:, 0, :]))
    v = v.at[:, 1, :].set(prox(u[:, 1, :] + lam[:, 1, :]))
    Gu = ops.batch("matvec_G", u)
    s = jax.nn.relu(Gu + nu)
    lam += (u - v) * gamma
    nu += (Gu - s) * gamma
    return (u, v, s, lam, nu), Gu


def _setup(ops: _Operators, Y, rank: int, key):
    """(preconditioner, b_1 = F^T Y / rho), as jaxcld builds them before its loop."""
    return _nystrom(ops, rank, key), ops.batch("rmatvec_F", Y.T) / ops.rho


# ----------------------------------------------------------------------------------------------
# History: a record of every iterate, computed beside the iteration (it never feeds back into it).


def _sq(x):
    return jnp.sum(x * x)


@functools.partial(jax.jit, static_argnames=["with_validation"])
def _record(X, XT, Dm, Y, u, v_old, v, s, nu, Gu, gts_old, beta, rho, Xval, yval, *, with_validation: bool):
    """(history record of v, G^T s): objectives, dual bound, residuals and cone violation of the iterate."""
    u, v_old, v = (jnp.transpose(a, (2, 0, 1, 3)) for a in (u, v_old, v))  # (C, 2, d, P) -> (d, C, 2, P)
    s, nu, Gu = (jnp.transpose(a, (2, 0, 1, 3)) for a in (s, nu, Gu))  # (C, 2, n, P) -> (n, C, 2, P)
    E = (2.0 * Dm - 1.0)[:, None, None, :]
    n, C, _, P = s.shape
    gts = (XT @ (E * s).reshape(n, -1)).reshape(-1, C, 2, P)
    Xv = (X @ v.reshape(v.shape[0], -1)).reshape(n, C, 2, P)
    pred = jnp.einsum("ncp,np->nc", Xv[:, :, 0] - Xv[:, :, 1], Dm)
    reg = beta * jnp.sum(jnp.sqrt(jnp.sum(v * v, axis=0)))
    Gv = E * Xv
    record = {
        "objective": 0.5 * _sq(pred - Y) + reg,
        "network_objective": 0.5 * _sq(jnp.sum(jnp.maximum(Xv[:, :, 0], 0) - jnp.maximum(Xv[:, :, 1], 0), axis=-1) - Y)
        + reg,
        "dual_bound": dual_bound(XT, Dm, Y, pred - Y, jnp.maximum(-rho * nu, 0.0) * E, beta),
        "primal_residual": jnp.sqrt(_sq(u - v) + _sq(Gu - s)),
        "dual_residual": rho * jnp.sqrt(_sq(v - v_old + gts - gts_old)),
        "constraint_violation": jnp.sqrt(_sq(jnp.minimum(Gv, 0.0))) / jnp.maximum(jnp.sqrt(_sq(Gv)),
                                                                                 jnp.finfo(_DTYPE).tiny),
    }
    if with_validation:
        # Theorem-1 network, as jaxcld's get_ncvx_weights + stacked_predict: relu(X W1) W2.
        col = jnp.sqrt(jnp.sqrt(jnp.sum(v * v, axis=0)))  # (C, 2, P) sqrt ||v_i||, sqrt ||w_i||
        hidden = jnp.where(col > 0, v / jnp.where(col > 0, col, 1.0), 0.0)
        outer = col * jnp.asarray([1.0, -1.0], _DTYPE)[None, :, None]
        Xh = (Xval @ hidden.reshape(hidden.shape[0], -1)).reshape(-1, C, 2, P)
        scores = jnp.einsum("mchp,chp->mc", jax.nn.relu(Xh), outer)
        record["val_accuracy"] = jnp.mean((jnp.argmax(scores, axis=1) == yval).astype(_DTYPE))
    return record, gts


@contextlib.contextmanager
def _compile_time():
    """Collects the seconds XLA spends compiling inside the block (JAX's backend-compile events)."""
    seconds = [0.0]

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            seconds[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seconds
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _count_flops(ops, Y, key, b_1, precond, iterate, config: JaxcldConfig, beta, pcg_iterations) -> dict:
    """XLA cost analysis of jitted copies of the setup, one ADMM step with one PCG iteration, and one PCG
    iteration (XLA counts a loop body once; these programs are loop-free)."""

    def cost(fn, *args):
        return _flops_of(jax.jit(fn).lower(*args).compile())

    setup = cost(lambda o, y, k: _setup(o, y, config.rank, k), ops, Y, key)
    step_once = cost(lambda o, m, b, it: _admm_step(o, m, b, it, beta, config.gamma, 1), ops, precond, b_1, iterate)
    state = (b_1, b_1, b_1, b_1, jnp.asarray(1.0, _DTYPE), 0)
    pcg_body = cost(_pcg_step, state, ops, precond)
    admm_iterations, pcg_total = len(pcg_iterations), int(np.sum(pcg_iterations))
    return {
        "total": setup + admm_iterations * (step_once - pcg_body) + pcg_total * pcg_body,
        "setup": setup,
        "per_admm_step_excluding_pcg": step_once - pcg_body,
        "per_pcg_iteration": pcg_body,
        "admm_iterations": admm_iterations,
        "pcg_iterations": pcg_total,
    }


def solve_jaxcld(problem, config: JaxcldConfig, key=None, *, validation=None, mesh: Mesh | None = None,
                 rows_axis: str | None = "data") -> SolveResult:
    """Runs jaxcld 0.2.4's `admm` on a ConvexReLU program; on one device its iterates are jaxcld's bit for bit.

    Args:
      problem: `cronos.ConvexReLU` (GatedReLU is refused: jaxcld's ADMM solves the cone-constrained program).
      config: `JaxcldConfig`.
      key: PRNG key, jaxcld's `seed` (default `jax.random.key(0)`).
      validation: optional (X_val, y_val) with integer labels; fills history["val_accuracy"] with the accuracy
        of the Theorem-1 network after every iteration (jaxcld's metrics["val_acc"]).
      mesh, rows_axis: optional mesh whose `rows_axis` (None: replicated) the rows of X, D and Y are sharded over
        (zero rows pad n; sharded sums round differently, so there the match is to float32 rounding); as in
        `cronos.solve`, on several processes the data is the full data on every one.
    Usually called as `cronos.solve(problem, JaxcldConfig(...), key=key)`. `nystrom_eigvals` of the result are
    jaxcld's S: the sketched eigenvalues of the full operator A = I + F^T F / rho + G^T G (so >= 1).
    compile_seconds is XLA's compilation time during the call (0 once every program is cached); run_seconds
    the rest of the wall time.
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

    X, Dm, Y = _pad_rows(mesh, rows_axis, *(a.astype(_DTYPE) for a in (problem.X, problem.patterns, problem.Y)))
    Xval = yval = None
    if validation is not None:
        Xval, yval = check_validation(validation, problem)
        Xval, yval = jnp.asarray(Xval.astype(_DTYPE)), jnp.asarray(yval.astype(np.int32))
    X, XT, Dm, Y, _ = place_rows(mesh, rows_axis, X, Dm, Y)
    # jaxcld's Python scalars, as its admm receives them (rho and 1/rho are computed in double precision).
    rho, beta, gamma = float(config.rho), float(problem.beta), float(config.gamma)
    n, C = Y.shape

    with _compile_time() as compile_seconds:
        start = time.perf_counter()
        ops = _Operators(X, Dm, 2 * Dm - 1, P, rho)
        precond, b_1 = _setup(ops, Y, config.rank, key)
        iterate = (None, jnp.zeros((C, 2, d, P)), jnp.zeros((C, 2, n, P)), jnp.zeros((C, 2, d, P)),
                   jnp.zeros((C, 2, n, P)))
        gts = jnp.zeros((d, C, 2, P), _DTYPE)
        records = []
        for _ in range(config.admm_iters):
            v_old = iterate[1]
            iterate, Gu = _admm_step(ops, precond, b_1, iterate, beta, gamma, config.pcg_iters)
            u, v, s, _, nu = iterate
            record, gts = _record(X, XT, Dm, Y, u, v_old, v, s, nu, Gu, gts, beta, rho, Xval, yval,
                                  with_validation=validation is not None)
            records.append(record)
        jax.block_until_ready(iterate)
        wall = time.perf_counter() - start

    history = {name: np.stack([_to_host(r[name]) for r in records]) for name in records[0]}
    history["pcg_iterations"] = np.full(config.admm_iters, config.pcg_iters, np.int32)
    history["rho"] = np.full(config.admm_iters, rho, _DTYPE)
    v = _local(iterate[1])
    first_iterate = (None,) + tuple(jnp.zeros_like(a) for a in iterate[1:])

    def count_flops(history):
        return _count_flops(ops, Y, key, b_1, precond, first_iterate, config, beta, history["pcg_iterations"])

    return SolveResult(
        v=v[:, 0], w=v[:, 1], history=history, iterations=int(config.admm_iters), converged=False,
        rho=rho, compile_seconds=compile_seconds[0], run_seconds=wall - compile_seconds[0],
        nystrom_eigvals=_to_host(precond.S), gates=problem.gates, has_cone=True, _flop_counter=count_flops,
    )
