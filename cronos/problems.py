"""Convex two-layer ReLU programs (Pilanci & Ergen 2020) and their linear operators.

A problem holds the data X (n, d), the activation patterns D (n, P) and the targets
Y (n, C), one column per class. For class c the convex ReLU program is

    minimize  1/2 || sum_i D_i X (v_i - w_i) - y_c ||^2 + beta * sum_i (||v_i|| + ||w_i||)
    s.t.      (2 D_i - I) X v_i >= 0,  (2 D_i - I) X w_i >= 0,

and the gated-ReLU program drops w and the cone constraints. All classes share X and D,
so every operator below acts on all classes at once with one GEMM.

Internal layout: weights are (d, C, P) per half (rows of X contract with axis 0), slacks are
(n, C, 2, P); the public layout (C, d, P) is produced by the solver at the end.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ConvexReLU",
    "GatedReLU",
    "sample_gates",
    "sample_patterns",
    "encode_targets",
]


def sample_gates(key: jax.Array, num_features: int, num_patterns: int, dtype=jnp.float32) -> jax.Array:
    """Draws gate vectors g_i ~ N(0, I) as a (d, P) matrix."""
    if num_patterns <= 0:
        raise ValueError(f"num_patterns must be a positive integer, got {num_patterns}.")
    return jax.random.normal(key, (num_features, num_patterns), dtype=dtype)


def sample_patterns(key: jax.Array, X, num_patterns: int) -> jax.Array:
    """Samples activation patterns D[:, i] = 1[X g_i >= 0] with g_i ~ N(0, I); returns (n, P) bool.

    The same key gives the gates of `sample_gates(key, d, P)`, so patterns of new data are
    `X_new @ sample_gates(key, d, P) >= 0`.
    """
    X = jnp.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n, d); got shape {X.shape}.")
    gates = sample_gates(key, X.shape[1], num_patterns, dtype=X.dtype if jnp.issubdtype(X.dtype, jnp.floating) else jnp.float32)
    return (X @ gates) >= 0


def encode_targets(y, num_classes: int | None = None) -> np.ndarray:
    """One-hot encodes integer labels 0..C-1 into an (n, C) float array (one-vs-all targets)."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"integer labels 0..C-1 expected, got dtype {y.dtype}; pass (n, C) float targets for regression.")
    if y.size and y.min() < 0:
        raise ValueError(f"labels must be in 0..C-1, found {y.min()}.")
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    if y.size and y.max() >= num_classes:
        raise ValueError(f"label {y.max()} is out of range for {num_classes} classes.")
    return np.eye(num_classes, dtype=np.float32)[y]


def _check_finite(name: str, array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{name} contains {bad} NaN or infinite values; clean or impute them before solving.")


def _validate(X, Y, patterns, gates, beta) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n, d); got shape {X.shape}.")
    n, d = X.shape
    if n == 0 or d == 0:
        raise ValueError(f"X is empty (shape {X.shape}); need at least one sample and one feature.")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float32)
    _check_finite("X", X)

    Y = np.asarray(Y)
    if Y.ndim == 1:
        if Y.shape[0] != n:
            raise ValueError(f"Y has {Y.shape[0]} labels but X has {n} rows; they must match.")
        Y = encode_targets(Y)
        if Y.shape[1] < 2:
            raise ValueError(
                "Y holds a single class; a classifier needs at least two classes "
                "(pass (n, 1) float targets for a single regression output)."
            )
    elif Y.ndim == 2:
        if Y.shape[0] != n:
            raise ValueError(f"Y has {Y.shape[0]} rows but X has {n}; they must match.")
        if Y.shape[1] == 0:
            raise ValueError("Y has zero columns; need at least one target column.")
        if not np.issubdtype(Y.dtype, np.floating):
            Y = Y.astype(np.float32)
        _check_finite("Y", Y)
    else:
        raise ValueError(f"Y must be (n,) integer labels or (n, C) float targets; got shape {Y.shape}.")

    D = np.asarray(patterns)
    if D.ndim != 2 or D.shape[0] != n:
        raise ValueError(
            f"patterns must be an (n, P) = ({n}, P) array of 0/1 activations; got shape {D.shape}. "
            "Build them with cronos.sample_patterns(key, X, P)."
        )
    if D.shape[1] <= 0:
        raise ValueError("patterns has P = 0 columns; need at least one activation pattern.")
    if D.dtype != np.bool_:
        _check_finite("patterns", D.astype(np.float64))
        if not np.all((D == 0) | (D == 1)):
            raise ValueError("patterns must be boolean or 0/1 valued (D[:, i] = 1[X g_i >= 0]).")
        D = D.astype(bool)

    if gates is not None:
        gates = np.asarray(gates)
        if gates.shape != (d, D.shape[1]):
            raise ValueError(f"gates must have shape (d, P) = ({d}, {D.shape[1]}); got {gates.shape}.")
        _check_finite("gates", gates)

    if not np.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite non-negative number, got {beta}.")
    return X, Y, D, gates


@dataclasses.dataclass(frozen=True)
class _Problem:
    """Shared fields of the two convex programs (validated, host-side numpy arrays)."""

    X: Any
    Y: Any
    patterns: Any
    beta: float = 1e-3
    gates: Any = None

    def __post_init__(self):
        X, Y, D, gates = _validate(self.X, self.Y, self.patterns, self.gates, self.beta)
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "Y", Y)
        object.__setattr__(self, "patterns", D)
        object.__setattr__(self, "gates", gates)
        object.__setattr__(self, "beta", float(self.beta))

    @property
    def num_samples(self) -> int:
        return self.X.shape[0]

    @property
    def num_features(self) -> int:
        return self.X.shape[1]

    @property
    def num_patterns(self) -> int:
        return self.patterns.shape[1]

    @property
    def num_classes(self) -> int:
        return self.Y.shape[1]


@dataclasses.dataclass(frozen=True)
class ConvexReLU(_Problem):
    """Convex reformulation of a two-layer ReLU network with cone constraints.

    Args:
      X: (n, d) data.
      Y: (n,) integer labels 0..C-1 (one-vs-all one-hot targets) or (n, C) float targets.
      patterns: (n, P) activation patterns, e.g. `sample_patterns(key, X, P)`.
      beta: group-lasso strength.
      gates: optional (d, P) gate vectors that produced `patterns` (kept for bookkeeping).
    """

    has_cone: bool = dataclasses.field(default=True, init=False)


@dataclasses.dataclass(frozen=True)
class GatedReLU(_Problem):
    """Convex gated-ReLU program: no cone constraints, predictions use the fixed gates.

    `gates` (d, P) is needed to predict on new data; patterns of the training data alone suffice
    to solve.
    """

    has_cone: bool = dataclasses.field(default=False, init=False)


# ----------------------------------------------------------------------------------------------
# Operators. `Xd` is the device copy of X, `Dm` the (n, P) 0/1 mask in X's dtype.


def patterns_times_features(X: jax.Array, Dm: jax.Array, a: jax.Array) -> jax.Array:
    """F0 a: sum_i D_i X a_i for weights a (d, C, P); returns (n, C)."""
    d, c, p = a.shape
    Xa = (X @ a.reshape(d, c * p)).reshape(-1, c, p)
    return jnp.einsum("ncp,np->nc", Xa, Dm)


def features_times_patterns(XT: jax.Array, Dm: jax.Array, r: jax.Array) -> jax.Array:
    """F0^T r: X^T (D_i * r) for residuals r (n, C), given XT = X^T (d, n); returns (d, C, P)."""
    n, c = r.shape
    p = Dm.shape[1]
    masked = (r[:, :, None] * Dm[:, None, :]).reshape(n, c * p)
    return (XT @ masked).reshape(-1, c, p)


def dual_bound(XT: jax.Array, Dm: jax.Array, Y: jax.Array, residual: jax.Array, cone_terms, beta) -> jax.Array:
    """A lower bound on the program's optimum (summed over classes) from a residual and cone multipliers.

    The Lagrange dual of the convex ReLU program is, per class,

        max_{lam, mu >= 0, xi >= 0}  -1/2 ||lam||^2 - lam^T y
        s.t. ||X^T (D_i lam - (2D_i - I) mu_i)|| <= beta,  ||X^T (-D_i lam - (2D_i - I) xi_i)|| <= beta,

    (gated ReLU: ||X^T D_i lam|| <= beta). The constraints are homogeneous, so lam = the residual F u - y
    and any multipliers, scaled by any t in [0, beta / max_i ||.||], are feasible;
    the best such t has a closed form, and weak duality makes its value a certified lower bound on the
    optimum whatever the inputs (at a primal-dual solution it equals the optimum).

    residual: (n, C) F u - y. cone_terms: (n, C, 2, P) (2D_i - I) mu_i and (2D_i - I) xi_i with
    mu, xi >= 0 (any scale of the cone rows included), or None for gated ReLU.
    """
    n, C = residual.shape
    P = Dm.shape[1]
    masked = residual[:, :, None] * Dm[:, None, :]  # (n, C, P)
    if cone_terms is None:
        terms = masked[:, :, None]
    else:
        terms = jnp.stack([masked, -masked], axis=2) - cone_terms
    H = terms.shape[2]
    norms = jnp.sqrt(jnp.sum(jnp.square((XT @ terms.reshape(n, C * H * P)).reshape(-1, C, H * P)), axis=0))
    largest = jnp.max(norms, axis=1)  # (C,)
    tiny = jnp.finfo(residual.dtype).tiny
    t_max = beta / jnp.maximum(largest, tiny)
    sq = jnp.sum(residual * residual, axis=0)
    lin = jnp.sum(residual * Y, axis=0)
    t = jnp.clip(-lin / jnp.maximum(sq, tiny), 0.0, t_max)
    return jnp.sum(-0.5 * t * t * sq - t * lin)


def group_soft_threshold(z: jax.Array, threshold) -> jax.Array:
    """Prox of threshold * sum ||z_i||_2 over columns of axis 0 (each (c, half, p) is one group)."""
    norms = jnp.sqrt(jnp.sum(z * z, axis=0, keepdims=True))
    return z * jnp.maximum(0.0, 1.0 - threshold / jnp.maximum(norms, jnp.finfo(z.dtype).tiny))



def objective(problem: _Problem, v, w=None) -> float:
    """The program's objective in float64 NumPy, independent of the solver: loss + group lasso.

    v, w: (C, d, P) weights (w None for gated ReLU). Cone constraints are not checked here; see
    `constraint_violation`.
    """
    X = problem.X.astype(np.float64)
    D = problem.patterns.astype(np.float64)
    v = np.asarray(v, np.float64)
    z = v if w is None else v - np.asarray(w, np.float64)
    pred = np.einsum("ncp,np->nc", np.einsum("nd,cdp->ncp", X, z), D)
    reg = np.linalg.norm(v, axis=1).sum() + (0.0 if w is None else np.linalg.norm(np.asarray(w, np.float64), axis=1).sum())
    return float(0.5 * np.sum((pred - problem.Y) ** 2) + problem.beta * reg)


def network_objective(problem: _Problem, v, w) -> float:
    """Regularised loss of the two-layer ReLU network that convex weights (v, w) define, in float64 NumPy.

        1/2 || sum_i relu(X v_i) - relu(X w_i) - y_c ||^2 + beta * sum_i (||v_i|| + ||w_i||),  summed over classes,

    v, w: (C, d, P). Equals `objective` when the cone constraints hold (then D_i X v_i = relu(X v_i));
    when they do not, it is the loss of the network one actually gets (Theorem-1 weights).
    """
    X = problem.X.astype(np.float64)
    v, w = np.asarray(v, np.float64), np.asarray(w, np.float64)
    C, d, P = v.shape

    def hidden(a):  # (n, C, P) relu(X a_i) for every class and pattern, one GEMM
        return np.maximum(X @ a.transpose(1, 0, 2).reshape(d, C * P), 0.0).reshape(-1, C, P)

    pred = (hidden(v) - hidden(w)).sum(axis=2)
    reg = np.linalg.norm(v, axis=1).sum() + np.linalg.norm(w, axis=1).sum()
    return float(0.5 * np.sum((pred - problem.Y) ** 2) + problem.beta * reg)


def constraint_violation(problem: _Problem, v, w) -> float:
    """Relative cone-constraint violation ||min((2D - I) X [v, w], 0)|| / ||(2D - I) X [v, w]||."""
    X = problem.X.astype(np.float64)
    S = 2.0 * problem.patterns.astype(np.float64) - 1.0
    G = np.einsum("nd,cdp->ncp", X, np.concatenate([np.asarray(v, np.float64), np.asarray(w, np.float64)], axis=2))
    G = G * np.concatenate([S, S], axis=1)[:, None, :]
    return float(np.linalg.norm(np.minimum(G, 0.0)) / max(np.linalg.norm(G), np.finfo(np.float64).tiny))


def _refined_multipliers(X, XT, E, terms, steps: int):
    """mu >= 0 minimising every block's ||X^T (terms_b - E_i mu_b)||^2 by `steps` FISTA steps from 0.

    terms: (n, B, P) with B blocks per pattern i, E: (n, P) the signs 2 D_i - 1. The blocks are independent, so
    minimising their sum minimises each block, and with it the largest constraint norm of the dual point.
    """
    n, B, P = terms.shape
    step = 1.0 / jnp.linalg.norm(X, 2) ** 2  # 1 / Lipschitz constant of the gradient (|E| = 1)

    def gradient(mu):
        r = (terms - E[:, None, :] * mu).reshape(n, B * P)
        return -E[:, None, :] * (X @ (XT @ r)).reshape(n, B, P)

    def body(_, state):
        mu, z, t = state
        mu_next = jnp.maximum(z - step * gradient(z), 0.0)
        t_next = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
        return mu_next, mu_next + (t - 1.0) / t_next * (mu_next - mu), t_next

    zeros = jnp.zeros_like(terms)
    return jax.lax.fori_loop(0, steps, body, (zeros, zeros, jnp.asarray(1.0, terms.dtype)))[0]


def certified_lower_bound(problem: _Problem, v, w=None, steps: int = 200) -> float:
    """A lower bound on the program's optimum from weights (v, w), certified by weak duality, in float64.

    The dual point is the residual lam = F (v, w) - y of the weights, with cone multipliers mu >= 0 refined by
    `steps` accelerated projected-gradient steps on ||X^T (+-D_i lam - (2 D_i - I) mu_i)||^2 (zero multipliers
    if that is better), scaled to feasibility as in `dual_bound`. It needs no reference solver and holds for
    any (v, w); it is tight at an exact optimum, but at small beta it needs the residual accurate to about
    beta / ||X||, so from the weights of a tol = 1e-4 solve it is usually far looser than that solve's own
    `lower_bound`. For a `SolveResult` the certified bound is max(result.lower_bound, this).
    Cost: 2 * steps GEMMs of X with (n, 2 C P) blocks (gated ReLU: none).
    """
    if not (isinstance(steps, (int, np.integer)) and steps >= 0):
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}.")
    with jax.enable_x64(True):
        X = jnp.asarray(problem.X, jnp.float64)
        XT, Dm, Y = X.T, jnp.asarray(problem.patterns, jnp.float64), jnp.asarray(problem.Y, jnp.float64)
        v = jnp.asarray(v, jnp.float64)
        z = v if w is None else v - jnp.asarray(w, jnp.float64)
        residual = patterns_times_features(X, Dm, jnp.transpose(z, (1, 0, 2))) - Y
        if not problem.has_cone:
            return float(dual_bound(XT, Dm, Y, residual, None, problem.beta))
        n, C = residual.shape
        E = 2.0 * Dm - 1.0
        masked = residual[:, :, None] * Dm[:, None, :]
        terms = jnp.stack([masked, -masked], axis=2).reshape(n, 2 * C, -1)  # (n, C * 2, P)
        mu = jax.jit(_refined_multipliers, static_argnums=4)(X, XT, E, terms, int(steps))
        cone_terms = (E[:, None, :] * mu).reshape(n, C, 2, -1)
        refined = dual_bound(XT, Dm, Y, residual, cone_terms, problem.beta)
        plain = dual_bound(XT, Dm, Y, residual, jnp.zeros_like(cone_terms), problem.beta)
        return float(jnp.maximum(refined, plain))
