"""cronos: a standalone JAX solver for convex two-layer ReLU networks (CRONOS: ADMM + Nyström PCG).

    import cronos
    D = cronos.sample_patterns(key, X, 64)
    result = cronos.solve(cronos.ConvexReLU(X, y, patterns=D, beta=1e-3), cronos.ADMMConfig(), key=key)
    W1, w2 = result.mlp_weights()

or in one line: `cronos.ConvexReLUClassifier().fit(X, y).predict(X_test)`.
"""

from cronos.admm import ADMMConfig, SolveResult, solve
from cronos.estimator import ConvexReLUClassifier
from cronos.problems import (
    ConvexReLU,
    GatedReLU,
    constraint_violation,
    encode_targets,
    network_objective,
    objective,
    sample_gates,
    sample_patterns,
)

__all__ = [
    "ADMMConfig",
    "ConvexReLU",
    "ConvexReLUClassifier",
    "GatedReLU",
    "SolveResult",
    "constraint_violation",
    "encode_targets",
    "network_objective",
    "objective",
    "sample_gates",
    "sample_patterns",
    "solve",
]
