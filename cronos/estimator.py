"""scikit-learn-style one-line interface: `ConvexReLUClassifier().fit(X, y).predict(X)`."""

from __future__ import annotations

from typing import Hashable, Sequence

import jax
import numpy as np

from cronos.admm import ADMMConfig, SolveResult, solve
from cronos.problems import ConvexReLU, GatedReLU, sample_gates

__all__ = ["ConvexReLUClassifier"]


def _sorted_classes(y: Sequence[Hashable]) -> list:
    """Distinct labels, sorted when comparable, else in order of first appearance."""
    unique = list(dict.fromkeys(y))
    try:
        return sorted(unique)
    except TypeError:
        return unique


class ConvexReLUClassifier:
    """Two-layer ReLU network trained to the global optimum of its convex reformulation by CRONOS.

    Defaults solve to a relative primal/dual residual of 1e-3, which float32 reaches reliably (use
    dtype="float64" with 64-bit JAX for tighter tolerances); pass `tol=None, admm_iters=6,
    pcg_iters=32` to reproduce the published fixed-iteration CLD runs.

    Args:
      n_patterns: activation patterns P (the network has 2P hidden units; P for `gated=True`).
      beta: group-lasso strength.
      rho, rank, admm_iters, pcg_iters, gamma, tol, dtype: see `cronos.ADMMConfig`.
      gated: solve the gated-ReLU program instead.
      random_state: seed of the gates and of the Nyström sketch.
      mesh: optional device mesh with a `data` axis to shard the rows over.
    """

    def __init__(self, n_patterns: int = 64, beta: float = 1e-3, *, rho: float | None = None, rank: int = 20,
                 admm_iters: int = 1000, pcg_iters: int = 50, gamma: float = 1.0, tol: float | None = 1e-3,
                 gated: bool = False, random_state: int = 0, dtype: str = "float32", mesh=None):
        self.n_patterns = n_patterns
        self.beta = beta
        self.rho = rho
        self.rank = rank
        self.admm_iters = admm_iters
        self.pcg_iters = pcg_iters
        self.gamma = gamma
        self.tol = tol
        self.gated = gated
        self.random_state = random_state
        self.dtype = dtype
        self.mesh = mesh

    def fit(self, X, y, validation=None) -> "ConvexReLUClassifier":
        """Fits on (n, d) features and n labels of any hashable type; returns self."""
        X = np.asarray(X)
        labels = list(np.asarray(y).tolist()) if isinstance(y, np.ndarray) else list(y)
        if X.ndim != 2:
            raise ValueError(f"X must be a 2-D array (n, d); got shape {X.shape}.")
        if len(labels) != X.shape[0]:
            raise ValueError(f"y has {len(labels)} labels but X has {X.shape[0]} rows; they must match.")
        self.classes_ = _sorted_classes(labels)
        if len(self.classes_) < 2:
            raise ValueError(f"y holds a single class {self.classes_}; a classifier needs at least two.")
        index = {c: i for i, c in enumerate(self.classes_)}
        y_int = np.array([index[c] for c in labels], np.int32)
        if validation is not None:
            validation = (validation[0], np.array([index[c] for c in validation[1]], np.int32))
        gate_key, sketch_key = jax.random.split(jax.random.key(self.random_state))
        X = X.astype(self.dtype) if np.issubdtype(X.dtype, np.floating) else X.astype(np.float32)
        gates = np.asarray(sample_gates(gate_key, X.shape[1], self.n_patterns, dtype=X.dtype))
        patterns = X @ gates >= 0
        program = GatedReLU if self.gated else ConvexReLU
        problem = program(X, y_int, patterns=patterns, beta=self.beta, gates=gates)
        config = ADMMConfig(rho=self.rho, rank=self.rank, admm_iters=self.admm_iters, pcg_iters=self.pcg_iters,
                            gamma=self.gamma, tol=self.tol, dtype=self.dtype)
        self.result_: SolveResult = solve(problem, config, sketch_key, validation=validation, mesh=self.mesh)
        self.n_features_in_ = X.shape[1]
        return self

    def _check_fitted(self):
        if not hasattr(self, "result_"):
            raise ValueError("this ConvexReLUClassifier is not fitted yet; call fit(X, y) first.")

    def decision_function(self, X) -> np.ndarray:
        """(n, C) class scores."""
        self._check_fitted()
        return np.asarray(self.result_.decision_function(np.asarray(X)))

    def predict(self, X) -> np.ndarray:
        """Predicted labels: a 1-D array of the training labels' values (object dtype for tuples and mixes)."""
        picked = [self.classes_[i] for i in self.decision_function(X).argmax(axis=1)]
        if all(isinstance(c, (int, float, str, np.generic)) for c in self.classes_):
            return np.asarray(picked)
        out = np.empty(len(picked), dtype=object)
        out[:] = picked
        return out

    def score(self, X, y) -> float:
        """Mean accuracy on (X, y)."""
        predicted = self.predict(X)
        return float(np.mean([p == t for p, t in zip(predicted.tolist(), list(y))]))
