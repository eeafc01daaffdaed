"""CRONOS: scaled ADMM whose u-update is Nyström-preconditioned conjugate gradient.

Splitting u = (v, w) with slack s = G u >= 0 (Pilanci & Ergen 2020; Feng et al., CRONOS):

    u   <- solve (I + F^T F / rho + G^T G) u = F^T y / rho + v - lam + G^T (s - nu)
    v   <- group soft-threshold(u + lam, beta / rho)
    s   <- (G u + nu)_+
    lam <- lam + gamma (u - v),   nu <- nu + gamma (G u - s)

Structure used (no 2dP x 2dP matrix is ever formed):
  * G^T G = I_P (x) X^T X because (2 D_i - I)^2 = I, and F^T F only sees v - w. In the variables
    a = u_v - u_w, c = u_v + u_w the system splits exactly into
        (B + (2 / rho) F0^T F0) a = rhs_v - rhs_w,     B c = rhs_v + rhs_w,     B = I_P (x) (I + X^T X),
    so c is an exact solve through one d x d eigendecomposition and only `a` needs PCG.
  * PCG is preconditioned by B^{-1/2} P_nys^{-1} B^{-1/2}, where P_nys is the Nyström preconditioner
    of I + (2 / rho) H for the whitened operator H = B^{-1/2} F0^T F0 B^{-1/2} (rank r sketch,
    independent of rho: changing rho refreshes the preconditioner for free).
  * Every class shares X, D, the system and the preconditioner; only right-hand sides differ, so each
    operator application is one GEMM over all classes.

The gated-ReLU program is the same iteration without G, s, nu and with B = I.

Beyond the published iteration (fixed mode: relaxation 1, constraint scale 1; `JaxcldConfig` in
`jaxcld_mode.py` reproduces jaxcld 0.2.4's iterates themselves): tolerance mode divides X by its centred
spectral norm (and beta likewise; the program is unchanged, weights are scaled back), without which
I + X^T X of large-norm embeddings is not representable in float32 and the iteration diverged to NaN; it
stops on relative primal/dual residuals (or, with `gap_tol`, on the duality gap), over-relaxes with
alpha = 1.6, runs its first 1000 iterations at a small rho (1e-4), where the objective falls fastest and the
dual bound closes, and then balances rho against the residuals every 5 iterations (duals rescaled, solves
refreshed for free).
The a-system is solved either by PCG (inexact and warm-started; its relative tolerance is
PCG_RESIDUAL_FACTOR times the previous iteration's larger relative ADMM residual, so PCG works hard only once
ADMM is close) or exactly by Woodbury through the n x n matrix M = F0 B^{-1} F0^T = (X B^{-1} X^T) o (D D^T):
its eigendecomposition (`linear_solver="direct"`, any rho for free; `default_config` up to DIRECT_MAX_SAMPLES)
or a Cholesky factorisation of rho / kappa I + M applied by blocked substitution (`"cholesky"`, refactored in an
outer loop whenever rho changes, which it then does only on a 5x residual imbalance; `default_config` while three
n x n matrices fit in DIRECT_MAX_BYTES).
Every iteration records the objective, the network objective (the regularised loss of the ReLU network
the iterate defines) and a certified dual lower bound (`problems.dual_bound` at the dual point of the
u-step's optimality condition: the residual at u and the cone multipliers it pairs with). A non-finite
iterate stops the loop and raises `NonFiniteIterateError`.
An optional constraint scale s weights the cone block (G = s (2D - I) X).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cronos import nystrom
from cronos import pcg as pcg_lib
from cronos.problems import (
    ConvexReLU,
    GatedReLU,
    dual_bound,
    features_times_patterns,
    group_soft_threshold,
    patterns_times_features,
)

__all__ = ["ADMMConfig", "NonFiniteIterateError", "SolveResult", "default_config", "solve"]

_HISTORY_KEYS = ("objective", "network_objective", "dual_bound", "primal_residual", "dual_residual",
                 "constraint_violation", "pcg_iterations", "rho")


@dataclasses.dataclass(frozen=True)
class ADMMConfig:
    """Solver settings. Defaults reproduce the published CLD runs (fixed 6 ADMM x 32 PCG iterations).

    Attributes:
      rho: ADMM penalty (initial value when adapted). None means 0.1 (the published value) in fixed
        mode and 1e-4 in tolerance mode (on the scaled data of `scale_data`; 1e-3 with `linear_solver="pcg"`,
        whose inexact solves degrade as rho falls). The dual bound's constraint norms exceed beta by rho times
        the dual residual, so a small rho is what lets the certificate close.
      rank: Nyström sketch rank r.
      admm_iters: ADMM iterations (a maximum when `tol` is set).
      pcg_iters: PCG iterations per u-update (a maximum; PCG also stops once the relative residual
        reaches the working precision, or the inexact-ADMM tolerance when `tol` is set).
      gamma: dual step size, 0 < gamma < (1 + sqrt 5) / 2.
      tol: None for fixed iteration counts; otherwise the relative primal/dual residual tolerance.
      adapt_rho: OSQP-style residual balancing of rho every 5 iterations (tolerance mode only), from
        iteration `rho_warmup` on.
      rho_warmup: ADMM iterations run at the starting rho before residual balancing begins. On CLD-like
        problems balancing drives rho up 10-1000x, which enforces the cone constraints but stalls the
        objective; a small rho first makes the objective fall fast, then balancing makes the iterate
        feasible and converged within a few tens of iterations (on n ~ d embeddings a shorter warm-up at a
        larger rho stopped far above the optimum). The residual test only counts after RHO_SETTLE_ITERS
        iterations at an unchanged rho.
      constraint_scale: sigma in the cone constraint sigma * (2D - I) X u = s (penalty rho * sigma^2 on
        that block); 1 is the published iteration.
      relaxation: over-relaxation alpha in (0, 2); None means 1 (the published iteration) in fixed
        mode and 1.6 in tolerance mode.
      preconditioner: "nystrom" (default: exact block inverse of I + X^T X composed with the rank-r
        Nyström preconditioner of the whitened F^T F), "block" (block inverse only) or "none" (plain CG).
      linear_solver: "pcg" (Nyström-preconditioned CG on the a-system; any n), "direct" (exact
        Woodbury solve through one eigendecomposition of the n x n matrix F0 B^{-1} F0^T, so a change of
        rho costs nothing; for n up to a few thousand) or "cholesky" (the same exact solve through a Cholesky
        factorisation at the current rho, redone at each change of rho: an O(n^3) setup several times
        cheaper than the eigendecomposition, for n up to a few tens of thousands).
      cholesky_block: rows per block of the Cholesky solve's substitutions (its factor is kept as the inverses of
        the diagonal blocks and the panels beside them). Measured at n = 13,000, d = 512 on 2 CPU cores: 0.131 s
        per ADMM iteration at 2048, 0.141 s at 1024, 0.144 s at 512; fewer blocks also compile faster.
      scale_data: solve the equivalent program with X / s and beta / s, s = ||X - mean(X)||_2 (weights
        rescaled back; the objective is unchanged), which keeps I + X^T X representable in float32
        whatever the scale of the embeddings (unscaled, real whisper-base embeddings made it diverge).
        None means True in tolerance mode and False in fixed mode (the published iteration).
      gap_tol: also stop once the relative duality gap (objective - best dual bound) / objective and the
        relative cone violation are both <= gap_tol (tolerance mode only). The dual bound
        (`cronos.problems.dual_bound`) is recorded every iteration either way.
      dtype: "float32" (default) or "float64" (needs `jax.config.update("jax_enable_x64", True)`).
    """

    rho: float | None = None
    rank: int = 20
    admm_iters: int = 6
    pcg_iters: int = 32
    gamma: float = 1.0
    tol: float | None = None
    adapt_rho: bool = True
    rho_warmup: int = 1000
    constraint_scale: float = 1.0
    relaxation: float | None = None
    preconditioner: str = "nystrom"
    linear_solver: str = "pcg"
    cholesky_block: int = 2048
    scale_data: bool | None = None
    gap_tol: float | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.rho is not None and not (np.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"rho must be a positive finite number, got {self.rho}.")
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank}.")
        if int(self.admm_iters) != self.admm_iters or self.admm_iters < 1:
            raise ValueError(f"admm_iters must be a positive integer, got {self.admm_iters}.")
        if int(self.rho_warmup) != self.rho_warmup or self.rho_warmup < 0:
            raise ValueError(f"rho_warmup must be a non-negative integer, got {self.rho_warmup}.")
        if int(self.cholesky_block) != self.cholesky_block or self.cholesky_block < 1:
            raise ValueError(f"cholesky_block must be a positive integer, got {self.cholesky_block}.")
        if int(self.pcg_iters) != self.pcg_iters or self.pcg_iters < 1:
            raise ValueError(f"pcg_iters must be a positive integer, got {self.pcg_iters}.")
        if not 0 < self.gamma < (1 + 5**0.5) / 2:
            raise ValueError(f"gamma must lie in (0, 1.618) for ADMM to converge, got {self.gamma}.")
        if self.tol is not None and not (np.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"tol must be None (fixed iterations) or a positive number, got {self.tol}.")
        if not (np.isfinite(self.constraint_scale) and self.constraint_scale > 0):
            raise ValueError(f"constraint_scale must be a positive number, got {self.constraint_scale}.")
        if self.relaxation is not None and not 0 < self.relaxation < 2:
            raise ValueError(f"relaxation must lie in (0, 2), got {self.relaxation}.")
        if self.preconditioner not in ("nystrom", "block", "none"):
            raise ValueError(f"preconditioner must be 'nystrom', 'block' or 'none', got {self.preconditioner!r}.")
        if self.linear_solver not in ("pcg", "direct", "cholesky"):
            raise ValueError(f"linear_solver must be 'pcg', 'direct' or 'cholesky', got {self.linear_solver!r}.")
        if self.gap_tol is not None and not (np.isfinite(self.gap_tol) and self.gap_tol > 0):
            raise ValueError(f"gap_tol must be None or a positive number, got {self.gap_tol}.")
        if self.gap_tol is not None and self.tol is None:
            raise ValueError("gap_tol needs tolerance mode: set tol as well (fixed mode runs all iterations).")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}.")

    @property
    def effective_rho(self) -> float:
        """Initial penalty used: `rho`, or 0.1 (fixed mode) / 1e-4 (tolerance mode; 1e-3 on the PCG path) when None."""
        if self.rho is not None:
            return float(self.rho)
        if self.tol is None:
            return 0.1
        return 1e-3 if self.linear_solver == "pcg" else 1e-4

    @property
    def effective_scale_data(self) -> bool:
        """Whether X is divided by its centred spectral norm: `scale_data`, or True in tolerance mode when None."""
        return (self.tol is not None) if self.scale_data is None else bool(self.scale_data)

    @property
    def effective_relaxation(self) -> float:
        """Over-relaxation used: `relaxation`, or 1 (fixed mode) / 1.6 (tolerance mode) when None."""
        if self.relaxation is not None:
            return float(self.relaxation)
        return 1.0 if self.tol is None else 1.6


class _Statics(NamedTuple):
    has_cone: bool
    rank: int
    admm_iters: int
    pcg_iters: int
    tol: float | None
    adapt_rho: bool
    rho_warmup: int
    relaxation: float
    preconditioner: str
    linear_solver: str
    cholesky_block: int
    gap_tol: float | None
    with_validation: bool
    row_sharding: Any


class _Structure(NamedTuple):
    """Data-dependent pieces shared by every ADMM iteration.

    With s^2 X^T X = Q diag(lam) Q^T (s the constraint scale) restricted to its top k = min(n, d)
    eigenvectors Qk (the right singular vectors of X on the direct path), the block B = I + s^2 X^T X has
    B^{-1} = I + Qk diag(1/(1+lam) - 1) Qk^T and B^{-1/2} likewise. The
    preconditioner B^{-1/2} P_nys^{-1} B^{-1/2} = B^{-1} + (B^{-1/2} U) diag(f(rho)) (B^{-1/2} U)^T
    costs one B^{-1} application plus a rank-r update.
    """

    sigma: Any  # scale of the cone operator G = sigma * (2D - I) X
    eigvecs: Any  # (d, k) top eigenvectors of sigma^2 X^T X (None for gated ReLU)
    inv_minus_one: Any  # (k,) 1 / (1 + lam) - 1
    approx: nystrom.NystromApprox  # U already multiplied by B^{-1/2}
    fty: jax.Array  # (d, C, P) F0^T Y
    woodbury: Any = None  # (eigvals (n,), eigvecs (n, n)) of F0 B^{-1} F0^T for the direct solve
    patterns_gram: Any = None  # (n, n) F0 B^{-1} F0^T for the Cholesky solve


class _CholeskyFactor(NamedTuple):
    """shift I + M = L L^T in blocks of rows (`ADMMConfig.cholesky_block`), stored as the two substitutions read
    it, so every product is a plain GEMV: XLA's CPU GEMV with a transposed matrix ran 4x slower (0.09 s against
    0.023 s at n = 13,000, two right-hand sides)."""

    inverses: tuple  # inverses of L's diagonal blocks (forward substitution)
    inverses_t: tuple  # their transposes (backward substitution)
    row_panels: tuple  # L[block i, :start of block i], i >= 1 (forward)
    column_panels_t: tuple  # L[end of block i:, block i]^T, all but the last block (backward)


def _cholesky_factor(patterns_gram, shift, block: int) -> _CholeskyFactor:
    """The blocked Cholesky factor of shift I + M (LAPACK reads M's lower triangle only). Inverting only the
    diagonal blocks costs O(n b^2) where the full triangular inverse cost n^3 / 3 (more than the factorisation);
    rounding can make a float32 factor non-finite at a tiny shift, and the resulting NaN iterate stops the solve
    with NonFiniteIterateError."""
    n = patterns_gram.shape[0]
    chol = jnp.linalg.cholesky(patterns_gram + shift * jnp.eye(n, dtype=patterns_gram.dtype),
                               symmetrize_input=False)
    edges = tuple(range(0, n, block)) + (n,)
    blocks = tuple(zip(edges[:-1], edges[1:]))
    inverses = tuple(
        lax.linalg.triangular_solve(chol[a:b, a:b], jnp.eye(b - a, dtype=chol.dtype), left_side=True, lower=True)
        for a, b in blocks)
    return _CholeskyFactor(
        inverses=inverses,
        inverses_t=tuple(inverse.T for inverse in inverses),
        row_panels=tuple(chol[a:b, :a] for a, b in blocks[1:]),
        column_panels_t=tuple(chol[b:, a:b].T for a, b in blocks[:-1]),
    )


def _cholesky_solve(factor: _CholeskyFactor, f):
    """(L L^T)^{-1} f for f (n, C) by blocked forward, then backward substitution: each block of L below the
    diagonal is read once per direction, n^2 numbers in all, as many as one GEMV with a full L^{-1}."""
    edges = (0, *itertools.accumulate(inverse.shape[0] for inverse in factor.inverses))
    num_blocks = len(factor.inverses)
    solved = factor.inverses[0] @ f[:edges[1]]  # L y = f
    for i in range(1, num_blocks):
        a, b = edges[i], edges[i + 1]
        solved = jnp.concatenate([solved, factor.inverses[i] @ (f[a:b] - factor.row_panels[i - 1] @ solved)])
    x = factor.inverses_t[-1] @ solved[edges[-2]:]  # L^T x = y, from the last block up
    for i in reversed(range(num_blocks - 1)):
        a, b = edges[i], edges[i + 1]
        x = jnp.concatenate([factor.inverses_t[i] @ (solved[a:b] - factor.column_panels_t[i] @ x), x])
    return x


def _eigen_update(eigvecs, diag, x):
    """x + Qk diag(diag) Qk^T x, applied to axis 0 of x (d, ...)."""
    flat = x.reshape(x.shape[0], -1)
    return x + (eigvecs @ (diag[:, None] * (eigvecs.T @ flat))).reshape(x.shape)


def _system(X, XT, Dm, a, scale, sigma, has_cone: bool):
    """(B + scale * F0^T F0) a, B = I + sigma^2 X^T X (I for gated), with two GEMMs: X a, then X^T (...)."""
    d, c, p = a.shape
    Xa = (X @ a.reshape(d, c * p)).reshape(-1, c, p)
    f = jnp.einsum("ncp,np->nc", Xa, Dm)
    Z = scale * f[:, :, None] * Dm[:, None, :]
    if has_cone:
        Z = Z + sigma**2 * Xa
    return a + (XT @ Z.reshape(Z.shape[0], c * p)).reshape(d, c, p)


def _block_inverse(st: _Structure, x, has_cone: bool):
    """B^{-1} x (identity for gated ReLU)."""
    return _eigen_update(st.eigvecs, st.inv_minus_one, x) if has_cone else x


def _precondition(st: _Structure, scale, r, statics: _Statics):
    """B^{-1/2} P_nys^{-1} B^{-1/2} r for the system B + scale * F0^T F0 (or a weaker choice)."""
    if statics.preconditioner == "none":
        return r
    z = _block_inverse(st, r, statics.has_cone)
    if st.approx is not None:
        z = z + nystrom.nystrom_correction(st.approx, scale, r)
    return z


def _direct_solve(st: _Structure, X, XT, Dm, rest, Y, shift, factor, has_cone: bool):
    """(B + F0^T F0 / shift)^{-1} (F0^T Y / shift + rest), exactly (`factor`: the Cholesky solve's blocked factor, or
    None for the eigendecomposition).

    Woodbury on `rest` and the push-through identity (B + F0^T F0 / shift)^{-1} F0^T = B^{-1} F0^T (shift I + M)^{-1}
    shift on the data term combine into z + B^{-1} F0^T (shift I + M)^{-1} (Y - F0 z), z = B^{-1} rest. The data
    term never meets the cancellation z - B^{-1} F0^T (...) F0 z of the plain Woodbury formula, which at small
    rho (rhs ~ 1/rho, solution ~ 1) lost every digit of float32 on real embeddings.
    """
    z = _block_inverse(st, rest, has_cone)
    f = Y - patterns_times_features(X, Dm, z)  # (n, C)
    if factor is None:
        eigvals, eigvecs = st.woodbury
        f = eigvecs @ ((eigvecs.T @ f) / (shift + eigvals)[:, None])
    else:
        f = _cholesky_solve(factor, f)
    return z + _block_inverse(st, features_times_patterns(XT, Dm, f), has_cone)


def _setup(X, XT, Dm, Y, sigma, key, statics: _Statics) -> _Structure:
    n, d = X.shape
    p = Dm.shape[1]
    direct = statics.linear_solver != "pcg"

    def ftf(a):
        return features_times_patterns(XT, Dm, patterns_times_features(X, Dm, a))

    fty = features_times_patterns(XT, Dm, Y)
    sketch = statics.preconditioner == "nystrom" and not direct
    eigvecs = inv_minus_one = approx = woodbury = patterns_gram = None
    gram = None  # (n, n) X B^{-1} X^T on the direct path
    if statics.has_cone and direct:
        # The SVD of X, not eigh(X^T X): X B^{-1} X^T = U diag(s^2 / (1 + sigma^2 s^2)) U^T keeps the small
        # singular directions that forming X^T X (or X X^T - X Q (...) Q^T X^T) loses in float32.
        left, sv, right = jnp.linalg.svd(X, full_matrices=False)
        sig2, eigvecs = sigma**2 * sv * sv, right.T
        inv_minus_one = 1.0 / (1.0 + sig2) - 1.0
        gram = (left * (sv * sv / (1.0 + sig2))) @ left.T
    elif statics.has_cone:
        xtx = sigma**2 * (XT @ X)
        sig2, eigvecs = jnp.linalg.eigh(0.5 * (xtx + xtx.T))
        k = min(n, d)
        sig2, eigvecs = jnp.maximum(sig2[-k:], 0.0), eigvecs[:, -k:]
        inv_minus_one = 1.0 / (1.0 + sig2) - 1.0
        if sketch:
            whiten = functools.partial(_eigen_update, eigvecs, lax.rsqrt(1.0 + sig2) - 1.0)
            raw = nystrom.nystrom_sketch(lambda x: whiten(ftf(whiten(x))), key, d, p, statics.rank, X.dtype)
            approx = nystrom.NystromApprox(whiten(raw.U.transpose(0, 2, 1)).transpose(0, 2, 1), raw.eigvals)
    elif sketch:
        approx = nystrom.nystrom_sketch(ftf, key, d, p, statics.rank, X.dtype)
    if direct:
        gram = X @ XT if gram is None else gram  # B = I for gated ReLU
        M = gram * (Dm @ Dm.T)  # F0 B^{-1} F0^T = sum_i D_i X B^{-1} X^T D_i
        if statics.linear_solver == "cholesky":
            patterns_gram = M  # its factorisation reads one triangle: no symmetrisation pass over n^2
        else:
            w, V = jnp.linalg.eigh(0.5 * (M + M.T))
            woodbury = (jnp.maximum(w, 0.0), V)
    return _Structure(sigma, eigvecs, inv_minus_one, approx, fty, woodbury, patterns_gram)


class _State(NamedTuple):
    k: jax.Array
    u: jax.Array  # (d, C, H, P), H = 2 (v, w) or 1 (gated)
    v: jax.Array
    lam: jax.Array
    s: Any  # (n, C, 2, P) or None
    nu: Any
    gts: Any  # G^T s, (d, C, 2, P) or None
    gtnu: Any  # G^T nu
    a: jax.Array  # (d, C, P) PCG warm start
    rho: jax.Array
    converged: jax.Array
    finite: jax.Array  # every iterate so far finite
    best_bound: jax.Array  # largest dual bound so far (each one is a valid lower bound)
    residual: jax.Array  # max(relative primal, relative dual residual) of the previous iteration
    rho_since: jax.Array  # the iteration from which the current rho has been in use
    history: dict


def _kappa(statics: _Statics) -> float:
    """Weight of F0^T F0 in the a-system, B + (kappa / rho) F0^T F0: 2 with the cone block (a = v - w), else 1."""
    return 2.0 if statics.has_cone else 1.0


def _sq(x):
    return jnp.sum(x * x)


def _admm_step(state: _State, X, XT, Dm, Y, beta, gamma, Xval, yval, Dval, st: _Structure, statics: _Statics,
               factor=None) -> _State:
    """One ADMM iteration, including its u-solve (`factor`: the Cholesky solve's factor at the current rho),
    residuals, rho adaptation and history."""
    dtype = X.dtype
    eps = jnp.finfo(dtype).eps
    tiny = jnp.finfo(dtype).tiny
    kappa = _kappa(statics)
    rho, v, lam, k = state.rho, state.v, state.lam, state.k
    d, C, H, P = v.shape
    S = 2.0 * Dm - 1.0
    G_rows = st.sigma * S  # rows of the scaled cone operator sigma * (2D - I) X

    def system(a):
        return _system(X, XT, Dm, a, kappa / rho, st.sigma, statics.has_cone)

    def precondition(r):
        return _precondition(st, kappa / rho, r, statics)

    if statics.has_cone:  # rhs without its data term: kappa F0^T Y / rho on `a`, nothing on `c`
        rest = v - lam + state.gts - state.gtnu
        rest_a, rhs_c = rest[:, :, 0] - rest[:, :, 1], rest[:, :, 0] + rest[:, :, 1]
    else:
        rest_a = v[:, :, 0] - lam[:, :, 0]

    floor = 10.0 * eps
    if statics.tol is None:
        rtol = floor
    else:
        rtol = jnp.maximum(jnp.maximum(floor, 0.01 * statics.tol),
                           jnp.minimum(0.1, PCG_RESIDUAL_FACTOR * state.residual))
    if statics.linear_solver != "pcg":
        a = _direct_solve(st, X, XT, Dm, rest_a, Y, rho / kappa, factor, statics.has_cone)
        pcg_iterations = jnp.zeros((), jnp.int32)
    else:
        sol = pcg_lib.pcg(system, precondition, (kappa / rho) * st.fty + rest_a, state.a, rtol, statics.pcg_iters)
        a, pcg_iterations = sol.x, sol.iterations
    if statics.has_cone:
        c = _block_inverse(st, rhs_c, True)
        u = jnp.stack([0.5 * (c + a), 0.5 * (c - a)], axis=2)
    else:
        u = a[:, :, None]
    alpha = statics.relaxation
    u_hat = alpha * u + (1.0 - alpha) * v
    v_new = group_soft_threshold(u_hat + lam, beta / rho)
    lam_new = lam + gamma * (u_hat - v_new)
    pri2 = _sq(u - v_new)
    pri_scale2 = jnp.maximum(_sq(u), _sq(v_new))
    dual_vec = v_new - v

    if statics.has_cone:
        n = X.shape[0]
        Xu = (X @ u.reshape(d, -1)).reshape(n, C, 2, P)
        Gu = Xu * G_rows[:, None, None, :]
        Gu_hat = alpha * Gu + (1.0 - alpha) * state.s
        s_new = jnp.maximum(Gu_hat + state.nu, 0.0)
        nu_new = state.nu + gamma * (Gu_hat - s_new)
        nu_prox = Gu_hat + state.nu - s_new  # min(Gu_hat + nu, 0) <= 0, = nu_new when gamma = 1
        both = jnp.concatenate([s_new, nu_new], axis=2) * G_rows[:, None, None, :]
        gt = (XT @ both.reshape(n, -1)).reshape(d, C, 4, P)
        gts_new, gtnu_new = gt[:, :, :2], gt[:, :, 2:]
        pri2 = pri2 + _sq(Gu - s_new)
        pri_scale2 = jnp.maximum(_sq(u) + _sq(Gu), _sq(v_new) + _sq(s_new))
        dual_vec = dual_vec + gts_new - state.gts
        dual_scale = jnp.maximum(rho * jnp.sqrt(_sq(lam_new + gtnu_new)), jnp.sqrt(2.0 * _sq(st.fty)))
        Xv = (X @ v_new.reshape(d, -1)).reshape(n, C, 2, P)
        pred = jnp.einsum("ncp,np->nc", Xv[:, :, 0] - Xv[:, :, 1], Dm)
        relu = jnp.maximum(Xv, 0.0)
        network_pred = jnp.sum(relu[:, :, 0] - relu[:, :, 1], axis=-1)
        Gv = Xv * S[:, None, None, :]
        violation = jnp.sqrt(_sq(jnp.minimum(Gv, 0.0))) / jnp.maximum(jnp.sqrt(_sq(Gv)), tiny)
    else:
        s_new = nu_new = gts_new = gtnu_new = None
        dual_scale = jnp.maximum(rho * jnp.sqrt(_sq(lam_new)), jnp.sqrt(_sq(st.fty)))
        pred = patterns_times_features(X, Dm, v_new[:, :, 0])
        network_pred = pred
        violation = jnp.zeros((), dtype)

    primal = jnp.sqrt(pri2)
    dual = rho * jnp.sqrt(_sq(dual_vec))
    pri_scale = jnp.sqrt(pri_scale2)
    norms = jnp.sqrt(jnp.sum(v_new * v_new, axis=0))
    objective = 0.5 * _sq(pred - Y) + beta * jnp.sum(norms)
    network_objective = 0.5 * _sq(network_pred - Y) + beta * jnp.sum(norms)

    # The dual point of the u-step's optimality condition: the residual at u (not v) and the cone multipliers
    # it pairs with, mu = -rho sigma (nu_prox / alpha + (1 - 1 / alpha) nu) >= 0. Its dual constraint norms exceed
    # beta by at most the dual residual, so the bound closes on the optimum as ADMM converges.
    if statics.has_cone:
        pred_u = jnp.einsum("ncp,np->nc", Xu[:, :, 0] - Xu[:, :, 1], Dm)
        mixed = nu_prox / alpha + (1.0 - 1.0 / alpha) * state.nu
        multipliers = jnp.maximum(-rho * mixed, 0.0) * G_rows[:, None, None, :]
    else:
        pred_u = patterns_times_features(X, Dm, u[:, :, 0])
        multipliers = None
    bound = dual_bound(XT, Dm, Y, pred_u - Y, multipliers, beta)

    history = dict(state.history)
    for name, value in (
        ("objective", objective),
        ("dual_bound", bound),
        ("network_objective", network_objective),
        ("primal_residual", primal),
        ("dual_residual", dual),
        ("constraint_violation", violation),
        ("pcg_iterations", pcg_iterations),
        ("rho", rho),
    ):
        history[name] = history[name].at[k].set(value.astype(history[name].dtype))
    if statics.with_validation:
        m = Xval.shape[0]
        Xw = (Xval @ v_new.reshape(d, -1)).reshape(m, C, H, P)
        if statics.has_cone:
            scores = jnp.sum(jnp.maximum(Xw[:, :, 0], 0.0) - jnp.maximum(Xw[:, :, 1], 0.0), axis=-1)
        else:
            scores = jnp.einsum("ncp,np->nc", Xw[:, :, 0], Dval)
        accuracy = jnp.mean((jnp.argmax(scores, axis=1) == yval).astype(dtype))
        history["val_accuracy"] = history["val_accuracy"].at[k].set(accuracy)

    finite = state.finite & jnp.isfinite(objective) & jnp.all(jnp.isfinite(v_new))
    best_bound = jnp.maximum(state.best_bound, jnp.where(jnp.isfinite(bound), bound, -jnp.inf))
    converged = jnp.asarray(False)
    rho_new, rho_since = rho, state.rho_since
    residual = state.residual
    if statics.tol is not None:
        pri_rel = primal / jnp.maximum(pri_scale, tiny)
        dual_rel = dual / jnp.maximum(dual_scale, tiny)
        residual = jnp.maximum(pri_rel, dual_rel).astype(dtype)
        # Right after a rho increase the primal residual drops by construction (u is pulled onto v) while the
        # iterate has not moved; only residuals measured at a settled rho count.
        settled = k - state.rho_since >= RHO_SETTLE_ITERS
        converged = settled & (pri_rel <= statics.tol) & (dual_rel <= statics.tol)
        if statics.gap_tol is not None:
            gap_rel = (objective - best_bound) / jnp.maximum(jnp.abs(objective), tiny)
            converged = converged | ((gap_rel <= statics.gap_tol) & (violation <= statics.gap_tol))
        if statics.adapt_rho:
            ratio = jnp.sqrt(pri_rel / jnp.maximum(dual_rel, tiny))
            due = (k + 1 > statics.rho_warmup) & ((k + 1) % 5 == 0)
            # A Cholesky solve pays a refactorisation per change: it waits for OSQP's 5x imbalance, not 2x.
            band = 5.0 if statics.linear_solver == "cholesky" else 2.0
            adapt = (~converged) & due & ((ratio > band) | (ratio < 1.0 / band))
            rho_new = jnp.where(adapt, rho * jnp.clip(ratio, 1e-2, 1e2), rho)
            rho_since = jnp.where(adapt, k + 1, rho_since)
            shrink = rho / rho_new
            lam_new = lam_new * shrink
            if statics.has_cone:
                nu_new = nu_new * shrink
                gtnu_new = gtnu_new * shrink

    return _State(
        k=k + 1, u=u, v=v_new, lam=lam_new, s=s_new, nu=nu_new, gts=gts_new, gtnu=gtnu_new, a=a,
        rho=rho_new, converged=converged, finite=finite, best_bound=best_bound, residual=residual,
        rho_since=rho_since, history=history,
    )


def _initial_state(X, Y, Dm, rho, statics: _Statics) -> _State:
    n, d = X.shape
    C, P = Y.shape[1], Dm.shape[1]
    H = 2 if statics.has_cone else 1
    dtype = X.dtype
    zeros_w = jnp.zeros((d, C, H, P), dtype)
    if statics.has_cone:
        s = jnp.zeros((n, C, 2, P), dtype)
        if statics.row_sharding is not None:
            s = lax.with_sharding_constraint(s, statics.row_sharding)
        nu = s
        gts = gtnu = jnp.zeros((d, C, 2, P), dtype)
    else:
        s = nu = gts = gtnu = None
    history = {name: jnp.full((statics.admm_iters,), jnp.nan, dtype) for name in _HISTORY_KEYS}
    history["pcg_iterations"] = jnp.full((statics.admm_iters,), -1, jnp.int32)
    if statics.with_validation:
        history["val_accuracy"] = jnp.full((statics.admm_iters,), jnp.nan, dtype)
    return _State(
        k=jnp.asarray(0, jnp.int32), u=zeros_w, v=zeros_w, lam=zeros_w, s=s, nu=nu, gts=gts, gtnu=gtnu,
        a=jnp.zeros((d, C, P), dtype), rho=jnp.asarray(rho, dtype), converged=jnp.asarray(False),
        finite=jnp.asarray(True), best_bound=jnp.asarray(-jnp.inf, dtype), residual=jnp.asarray(1.0, dtype),
        rho_since=jnp.asarray(0, jnp.int32), history=history,
    )


def _factor_at(st: _Structure, rho, statics: _Statics):
    """The Cholesky solve's blocked factor at penalty rho (None on the other solvers)."""
    if statics.linear_solver != "cholesky":
        return None
    return _cholesky_factor(st.patterns_gram, rho / _kappa(statics), statics.cholesky_block)


def _solve_impl(X, XT, Dm, Y, beta, rho, gamma, sigma, key, Xval, yval, Dval, statics: _Statics):
    st = _setup(X, XT, Dm, Y, sigma, key, statics)
    state = _initial_state(X, Y, Dm, rho, statics)

    def cond(state):
        return (state.k < statics.admm_iters) & ~state.converged & state.finite

    def steps_at_one_rho(state):
        # The outer loop runs once per value of rho, so the Cholesky solve factors once per rho. The factor is a
        # constant of the inner loop: carried in the loop state instead, XLA copied all n^2 of it every iteration
        # (5x the cost of the iteration at n = 13,000).
        factor = _factor_at(st, state.rho, statics)
        return lax.while_loop(lambda s: cond(s) & (s.rho == state.rho),
                              lambda s: _admm_step(s, X, XT, Dm, Y, beta, gamma, Xval, yval, Dval, st, statics, factor),
                              state)

    state = lax.while_loop(cond, steps_at_one_rho, state)
    eigvals = st.approx.eigvals if st.approx is not None else jnp.zeros((0,), X.dtype)
    return state.v, state.k, state.converged & state.finite, state.rho, state.history, eigvals, state.best_bound


_COMPILED: dict = {}


def _compiled(fn, statics, args):
    """Compiles fn for these argument shapes/shardings once; returns (executable, compile seconds)."""
    signature = (fn.__name__, statics) + tuple(
        None if a is None else (a.shape, str(a.dtype), getattr(a, "sharding", None)) for a in args
    )
    if signature in _COMPILED:
        return _COMPILED[signature], 0.0
    start = time.perf_counter()
    jitted = jax.jit(functools.partial(fn, statics=statics))
    executable = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    _COMPILED[signature] = executable
    return executable, seconds


def _flops_of(executable) -> float:
    cost = executable.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


@dataclasses.dataclass
class SolveResult:
    """Solution of a convex ReLU (or gated ReLU) program.

    Attributes:
      v, w: (C, d, P) weights (w is None for gated ReLU).
      history: per-iteration numpy arrays (objective; network_objective, the regularised loss of the
        ReLU network the iterate defines, equal to the objective once the cone constraints hold;
        primal_residual, dual_residual, constraint_violation, pcg_iterations, rho, and val_accuracy
        when validation data was given).
      iterations: ADMM iterations run. converged: tolerance met (always False in fixed mode).
      rho: final penalty. compile_seconds / run_seconds: compilation (0 when cached) and execution.
      gates: (d, P) gate vectors if the problem carried them.
      lower_bound: the largest dual bound over the iterations (history["dual_bound"]): a certified lower
        bound on the program's optimum, valid whatever the iterate (weak duality); NaN where not computed.
    """

    v: jax.Array
    w: jax.Array | None
    history: dict
    iterations: int
    converged: bool
    rho: float
    compile_seconds: float
    run_seconds: float
    nystrom_eigvals: np.ndarray
    gates: np.ndarray | None
    has_cone: bool
    lower_bound: float = float("nan")
    _flop_counter: Any = dataclasses.field(repr=False, default=None)

    @property
    def duality_gap(self) -> float:
        """Relative gap (final objective - lower_bound) / |final objective|: how far from optimal at most,
        given the final cone violation (history["constraint_violation"]) is small."""
        final = float(self.history["objective"][-1])
        return (final - self.lower_bound) / max(abs(final), np.finfo(np.float64).tiny)

    def mlp_weights(self) -> tuple[jax.Array, jax.Array]:
        """Pilanci–Ergen Theorem 1: hidden (C, d, 2P) = v_i / sqrt||v_i||, output (C, 2P) = +-sqrt||.||.

        For gated ReLU the pair describes the gated network: hidden unit i is active where x^T g_i >= 0.
        """
        halves = [self.v] if self.w is None else [self.v, -self.w]
        hidden, output = [], []
        for sign, weights in zip((1.0, -1.0), halves):
            norm = jnp.sqrt(jnp.linalg.norm(weights, axis=1))  # (C, P)
            safe = jnp.where(norm > 0, norm, 1.0)
            hidden.append(jnp.where(norm[:, None, :] > 0, sign * weights / safe[:, None, :], 0.0))
            output.append(sign * norm)
        return jnp.concatenate(hidden, axis=2), jnp.concatenate(output, axis=1)

    def decision_function(self, X) -> jax.Array:
        """(n, C) scores of the trained network on new data."""
        X = jnp.asarray(X, self.v.dtype)
        if X.ndim != 2 or X.shape[1] != self.v.shape[1]:
            raise ValueError(f"X must be (n, {self.v.shape[1]}); got shape {X.shape}.")
        W1, w2 = self.mlp_weights()
        hidden = jnp.einsum("nd,cdh->nch", X, W1)
        if self.has_cone:
            return jnp.einsum("nch,ch->nc", jnp.maximum(hidden, 0.0), w2)
        if self.gates is None:
            raise ValueError("gated ReLU predictions need the gate vectors: build GatedReLU(..., gates=G).")
        active = (X @ jnp.asarray(self.gates, X.dtype) >= 0).astype(X.dtype)
        return jnp.einsum("nch,nh,ch->nc", hidden, active, w2)

    def predict(self, X) -> jax.Array:
        """(n,) argmax class indices."""
        return jnp.argmax(self.decision_function(X), axis=1)

    @functools.cached_property
    def flops(self) -> dict:
        """FLOPs counted by XLA's cost analysis of the compiled setup, ADMM step and PCG iteration.

        XLA counts a loop body once, so the total is setup + sum over ADMM iterations of
        (step with one PCG iteration + (PCG iterations - 1) * one PCG iteration), plus one factorisation per
        change of rho on the Cholesky solve, using the executed counts recorded in `history`. LAPACK calls
        (the eigendecomposition, SVD, Cholesky factorisation and diagonal-block inverses of the direct solves) are
        opaque to XLA's cost analysis and count as zero.
        """
        return self._flop_counter(self.history)


def _row_shards(mesh: Mesh | None, rows_axis: str | None) -> int:
    """Devices the rows are split over: the size of `rows_axis` of `mesh` (1 without a mesh or for None)."""
    if mesh is None or rows_axis is None:
        return 1
    if rows_axis not in mesh.axis_names:
        raise ValueError(f"rows_axis {rows_axis!r} is not an axis of the mesh (axes {tuple(mesh.axis_names)}); "
                         "name one of them, or None to replicate the rows.")
    return int(mesh.shape[rows_axis])


def _pad_rows(mesh: Mesh | None, rows_axis: str | None, *arrays):
    pad = (-arrays[0].shape[0]) % _row_shards(mesh, rows_axis)
    return tuple(np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a for a in arrays)


def check_validation(validation, problem) -> tuple[np.ndarray, np.ndarray]:
    """Validated (X_val (m, d) float64, y_val (m,) integer labels) for per-iteration validation accuracy."""
    d = problem.num_features
    Xval, yval = np.asarray(validation[0], np.float64), np.asarray(validation[1])
    if Xval.ndim != 2 or Xval.shape[1] != d:
        raise ValueError(f"validation X must be (m, {d}); got shape {Xval.shape}.")
    if yval.shape != (Xval.shape[0],) or not np.issubdtype(yval.dtype, np.integer):
        raise ValueError(f"validation y must be ({Xval.shape[0]},) integer labels; got {yval.shape} {yval.dtype}.")
    if problem.num_classes < 2:
        raise ValueError("validation accuracy needs at least two classes (argmax over class scores).")
    return Xval, yval


def place_rows(mesh: Mesh | None, rows_axis: str | None, X, Dm, Y):
    """Device copies (X, X^T, D, Y, row sharding or None): rows over the mesh's `rows_axis` when given.

    X^T is stored contiguously: X^T @ Z runs ~1.8x faster than a transposed GEMM on CPU.
    """
    XT = np.ascontiguousarray(X.T)
    if mesh is None:
        return jnp.asarray(X), jnp.asarray(XT), jnp.asarray(Dm), jnp.asarray(Y), None
    # GSPMD propagation inside the solve: view the same devices as an Auto-typed mesh.
    mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    row_sharding = NamedSharding(mesh, PartitionSpec(rows_axis))
    X, Dm, Y = (_place(a, row_sharding) for a in (X, Dm, Y))
    return X, _place(XT, NamedSharding(mesh, PartitionSpec(None, rows_axis))), Dm, Y, row_sharding


def _place(value, sharding: NamedSharding) -> jax.Array:
    """A host array identical on every process -> a global array with `sharding` (each process places its own
    shards: jax.device_put cannot reach devices of other processes)."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-process) array as NumPy, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _local(x: jax.Array) -> jax.Array:
    """`x`, or for an array spanning other processes its full value as an array of this process."""
    return x if x.is_fully_addressable else jnp.asarray(_to_host(x))


# Both direct solves pay O(n^3) once, then n^2 multiply-adds per iteration and class (every iteration exact).
# The eigendecomposition makes a change of rho free but grows fast (3 s at n = 3000, 23 s at 6000, 112 s at 10,000
# on 2 cores), so beyond DIRECT_MAX_SAMPLES a blocked Cholesky factorisation of shift I + M takes over (setup and
# factor 8 s at n = 13,000, d = 512 and 28 s at 20,000, d = 768 on 2 cores, a factorisation again per change of
# rho), while three n x n matrices fit in DIRECT_MAX_BYTES; Nystrom PCG (O(n d P) memory) beyond.
DIRECT_MAX_SAMPLES = 2048  # eigendecomposition up to here
DIRECT_MAX_BYTES = 8 * 2**30  # Cholesky while 3 n^2 x itemsize fits: n <= 26,754 in float32, 18,918 in float64
RHO_SETTLE_ITERS = 10  # iterations at an unchanged rho before the residual test may stop the solve
PCG_RESIDUAL_FACTOR = 0.03  # PCG relative tolerance = this x the previous relative ADMM residual (capped at 0.1)


def default_config(problem: ConvexReLU | GatedReLU, tol: float = 1e-4, dtype: str = "float32",
                   max_iters: int = 3000) -> ADMMConfig:
    """The fast exact path for this problem's shape: tolerance-mode ADMM on scaled data (`scale_data`), with the
    exact Woodbury u-solve (every iteration a few GEMMs, never inexact) through an n x n eigendecomposition up to
    n = DIRECT_MAX_SAMPLES, through a Cholesky factorisation while three n x n matrices fit in DIRECT_MAX_BYTES,
    and Nyström PCG beyond."""
    n = problem.num_samples
    if n <= DIRECT_MAX_SAMPLES:
        linear_solver = "direct"
    elif 3 * n * n * np.dtype(dtype).itemsize <= DIRECT_MAX_BYTES:
        linear_solver = "cholesky"
    else:
        linear_solver = "pcg"
    return ADMMConfig(tol=tol, admm_iters=max_iters, pcg_iters=50, dtype=dtype, linear_solver=linear_solver)


def solve(
    problem: ConvexReLU | GatedReLU,
    config: Any = None,
    key: jax.Array | None = None,
    *,
    tol: float | None = None,
    validation: tuple[Any, Any] | None = None,
    mesh: Mesh | None = None,
    rows_axis: str | None = "data",
) -> SolveResult:
    """Solves a convex ReLU or gated ReLU program with CRONOS.

    Args:
      problem: `ConvexReLU` or `GatedReLU`.
      config: solver settings: None (the fast exact path of `default_config(problem, tol)`), an
        `ADMMConfig` (`ADMMConfig()` is the published fixed 6 x 32 setting), or a `JaxcldConfig`
        (iterates equal to jaxcld 0.2.4's `admm`).
      key: PRNG key for the Nyström sketch (default `jax.random.key(0)`); same key, same result.
      tol: tolerance of the default exact path (default 1e-4); with an `ADMMConfig` it replaces `config.tol`.
      validation: optional (X_val, y_val) with integer labels; fills history["val_accuracy"].
      mesh: optional device mesh; rows of X, D and Y are sharded over its `rows_axis` (zero rows pad n to a
        multiple of the axis size, which leaves the program unchanged). On a mesh spanning several processes,
        `problem` and `validation` must be the full data, identical on every process; so is the result.
      rows_axis: the mesh axis the rows are split over (None: replicated on every device of the mesh).
    """
    if not isinstance(problem, (ConvexReLU, GatedReLU)):
        raise TypeError(f"problem must be cronos.ConvexReLU or cronos.GatedReLU, got {type(problem).__name__}.")
    from cronos import jaxcld_mode  # noqa: PLC0415 (it imports SolveResult from here)

    if isinstance(config, jaxcld_mode.JaxcldConfig):
        if tol is not None:
            raise ValueError("JaxcldConfig runs fixed iteration counts; it takes no tol.")
        return jaxcld_mode.solve_jaxcld(problem, config, key, validation=validation, mesh=mesh,
                                        rows_axis=rows_axis)
    if config is None:
        config = default_config(problem, 1e-4 if tol is None else tol)
    elif not isinstance(config, ADMMConfig):
        raise TypeError(f"config must be None, cronos.ADMMConfig or cronos.JaxcldConfig, got {type(config).__name__}.")
    elif tol is not None:
        config = dataclasses.replace(config, tol=tol)
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError('dtype="float64" needs 64-bit JAX: call jax.config.update("jax_enable_x64", True) first.')
    d, P = problem.num_features, problem.num_patterns
    if config.rank > d * P:
        raise ValueError(
            f"rank {config.rank} exceeds the dimension d * P = {d * P} of the operator being sketched; "
            f"use rank <= {d * P}."
        )
    dtype = np.dtype(config.dtype)
    key = jax.random.key(0) if key is None else key
    scale = _data_scale(problem.X) if config.effective_scale_data else 1.0
    X = (problem.X / scale).astype(dtype)
    Dm = problem.patterns.astype(dtype)
    Y = problem.Y.astype(dtype)
    X, Dm, Y = _pad_rows(mesh, rows_axis, X, Dm, Y)

    Xval = yval = Dval = None
    if validation is not None:
        Xval, yval = check_validation(validation, problem)
        if not problem.has_cone:
            if problem.gates is None:
                raise ValueError("validation of a GatedReLU problem needs its gates: GatedReLU(..., gates=G).")
            Dval = (Xval @ problem.gates.astype(np.float64) >= 0).astype(dtype)
        Xval, yval = jnp.asarray((Xval / scale).astype(dtype)), jnp.asarray(yval.astype(np.int32))
        Dval = None if Dval is None else jnp.asarray(Dval)

    X, XT, Dm, Y, row_sharding = place_rows(mesh, rows_axis, X, Dm, Y)

    statics = _Statics(
        has_cone=problem.has_cone, rank=int(config.rank), admm_iters=int(config.admm_iters),
        pcg_iters=int(config.pcg_iters), tol=config.tol, adapt_rho=bool(config.adapt_rho),
        rho_warmup=int(config.rho_warmup),
        preconditioner=config.preconditioner, relaxation=config.effective_relaxation,
        linear_solver=config.linear_solver, cholesky_block=int(config.cholesky_block), gap_tol=config.gap_tol,
        with_validation=validation is not None, row_sharding=row_sharding,
    )
    scalars = tuple(jnp.asarray(x, dtype) for x in (problem.beta / scale, config.effective_rho, config.gamma,
                                                    config.constraint_scale))
    args = (X, XT, Dm, Y) + scalars + (key, Xval, yval, Dval)
    executable, compile_seconds = _compiled(_solve_impl, statics, args)
    start = time.perf_counter()
    v, k, converged, rho, history, eigvals, best_bound = executable(*args)
    jax.block_until_ready(v)
    run_seconds = time.perf_counter() - start

    v = _local(v)
    k, converged, rho, history, eigvals, best_bound = jax.tree.map(_to_host, (k, converged, rho, history, eigvals,
                                                                              best_bound))
    iterations = int(k)
    history = {name: values[:iterations] for name, values in history.items()}
    _check_finite_iterates(history, v, problem, scale)
    v = jnp.transpose(v, (1, 2, 0, 3)) / jnp.asarray(scale, dtype)  # (C, H, d, P), back to the unscaled X

    def count_flops(history):
        return _count_flops(X, XT, Dm, Y, scalars, key, Xval, yval, Dval, statics, history)

    return SolveResult(
        v=v[:, 0], w=v[:, 1] if problem.has_cone else None, history=history, iterations=iterations,
        converged=bool(converged), rho=float(rho), compile_seconds=compile_seconds, run_seconds=run_seconds,
        nystrom_eigvals=eigvals, gates=problem.gates, has_cone=problem.has_cone,
        lower_bound=float(best_bound), _flop_counter=count_flops,
    )


def _data_scale(X: np.ndarray) -> float:
    """||X - mean(X)||_2 in float64 (through the smaller Gram matrix); 1 when that is 0.

    The centred norm, not ||X||_2: pooled embeddings share a large mean, whose direction alone would set
    ||X||_2 (500 against 25 for the next directions on whisper-base embeddings) and leave every other
    direction tiny after scaling. Dividing by the centred norm keeps I + X^T X well conditioned (the mean
    direction at a few hundred at most) and the discriminative directions at unit scale.
    """
    X = np.asarray(X, np.float64)
    X = X - X.mean(axis=0)
    gram = X.T @ X if X.shape[0] >= X.shape[1] else X @ X.T
    top = float(np.sqrt(max(np.linalg.eigvalsh(gram)[-1], 0.0)))
    return top if top > 0 else 1.0


class NonFiniteIterateError(FloatingPointError):
    """A solve produced a NaN or infinite iterate; its weights are never returned."""


def _check_finite_iterates(history: dict, v, problem, scale: float) -> None:
    """Raises NonFiniteIterateError when the solve left NaN/inf in the weights or the objective."""
    objective = history["objective"]
    bad = np.flatnonzero(~np.isfinite(objective))
    if bad.size == 0 and bool(np.all(np.isfinite(np.asarray(v)))):
        return
    where = f"at ADMM iteration {int(bad[0]) + 1}" if bad.size else "in the final weights"
    norms = np.linalg.norm(problem.X, axis=1)
    raise NonFiniteIterateError(
        f"the solve produced non-finite values {where} (row norms of X: median {np.median(norms):.3g}, "
        f"max {norms.max():.3g}; X was divided by {scale:.3g}). The weights are unusable and were not "
        "returned. Centre or standardise the inputs, solve in tolerance mode (which scales X), or use "
        'linear_solver="direct" / dtype="float64".')


def _setup_only(X, XT, Dm, Y, sigma, key, statics):
    return _setup(X, XT, Dm, Y, sigma, key, statics)


def _factored_setup_only(X, XT, Dm, Y, rho, sigma, key, statics):
    """The setup and one Cholesky factorisation (what a solve pays before its first step)."""
    st = _setup(X, XT, Dm, Y, sigma, key, statics)
    return st, _factor_at(st, rho, statics)


def _step_only(X, XT, Dm, Y, beta, rho, gamma, sigma, key, Xval, yval, Dval, statics):
    st = _setup(X, XT, Dm, Y, sigma, key, statics)
    state = _initial_state(X, Y, Dm, rho, statics)
    return _admm_step(state, X, XT, Dm, Y, beta, gamma, Xval, yval, Dval, st, statics, _factor_at(st, rho, statics))


def _pcg_iteration_only(X, XT, Dm, Y, sigma, key, statics):
    """One PCG loop body (operator, preconditioner, updates) for FLOP counting."""
    st = _setup(X, XT, Dm, Y, sigma, key, statics)
    p = st.fty
    Ap = _system(X, XT, Dm, p, 1.0, st.sigma, statics.has_cone)
    return p + jnp.sum(p * Ap) * _precondition(st, 1.0, Ap, statics)


def _count_flops(X, XT, Dm, Y, scalars, key, Xval, yval, Dval, statics, history) -> dict:
    setup_args = (X, XT, Dm, Y, scalars[3], key)
    setup_exe, _ = _compiled(_setup_only, statics, setup_args)
    step_exe, _ = _compiled(_step_only, statics, (X, XT, Dm, Y) + scalars + (key, Xval, yval, Dval))
    setup = _flops_of(setup_exe)
    pcg_body = 0.0  # the direct solves run no PCG (and XLA drops their unused setup from a PCG-only program)
    if statics.linear_solver == "pcg":
        pcg_body = _flops_of(_compiled(_pcg_iteration_only, statics, setup_args)[0]) - setup
    factorization, refactorizations = 0.0, 0
    if statics.linear_solver == "cholesky":  # one factorisation in the setup, one more per change of rho
        factored_args = (X, XT, Dm, Y, scalars[1], scalars[3], key)
        factorization = _flops_of(_compiled(_factored_setup_only, statics, factored_args)[0]) - setup
        refactorizations = int(np.count_nonzero(np.diff(history["rho"])))
        setup += factorization
    step = _flops_of(step_exe) - setup
    pcg_iterations = history["pcg_iterations"]
    pcg_total = int(np.sum(pcg_iterations))
    admm_iterations = len(pcg_iterations)
    total = setup + admm_iterations * (step - pcg_body) + pcg_total * pcg_body + refactorizations * factorization
    return {
        "total": total,
        "setup": setup,
        "per_admm_step_excluding_pcg": step - pcg_body,
        "per_pcg_iteration": pcg_body,
        "per_refactorization": factorization,
        "admm_iterations": admm_iterations,
        "pcg_iterations": pcg_total,
        "refactorizations": refactorizations,
    }
