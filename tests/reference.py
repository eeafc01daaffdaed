"""Independent references for the solver tests: the same convex programs written in CVXPY."""

from __future__ import annotations

import cvxpy as cp
import numpy as np


def cvxpy_optimum(X: np.ndarray, Y: np.ndarray, D: np.ndarray, beta: float, cone: bool,
                  tol: float = 1e-10) -> tuple[float, list]:
    """Solves the convex ReLU (cone=True) or gated ReLU program per class with Clarabel.

    tol: Clarabel's gap and feasibility tolerances (n <= d problems, which nearly interpolate, need ~1e-8).
    Returns the total optimal objective over classes and the per-class (v, w) solutions (w None for gated).
    """
    X = np.asarray(X, np.float64)
    D = np.asarray(D, np.float64)
    S = 2.0 * D - 1.0
    n, d = X.shape
    P = D.shape[1]
    total, weights = 0.0, []
    for c in range(Y.shape[1]):
        v = cp.Variable((d, P))
        pred = cp.sum(cp.multiply(D, X @ v), axis=1)
        reg = cp.sum(cp.norm(v, 2, axis=0))
        constraints = []
        w = None
        if cone:
            w = cp.Variable((d, P))
            pred = pred - cp.sum(cp.multiply(D, X @ w), axis=1)
            reg = reg + cp.sum(cp.norm(w, 2, axis=0))
            constraints = [cp.multiply(S, X @ v) >= 0, cp.multiply(S, X @ w) >= 0]
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(pred - Y[:, c]) + beta * reg), constraints)
        problem.solve(solver=cp.CLARABEL, tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol)
        assert problem.status == cp.OPTIMAL, problem.status
        total += problem.value
        weights.append((v.value, None if w is None else w.value))
    return total, weights
