"""cronos: a standalone JAX solver for convex two-layer ReLU networks (CRONOS: ADMM + Nyström PCG).

    import cronos
    D = cronos.sample_patterns(key, X, 64)
    result = cronos.solve(cronos.ConvexReLU(X, y, patterns=D, beta=1e-3), cronos.ADMMConfig(), key=key)
    W1, w2 = result.mlp_weights()

or in one line: `cronos.ConvexReLUClassifier().fit(X, y).predict(X_test)` (a scikit-learn-style
estimator). `cronos.enable_compilation_cache()` keeps compiled solves on disk across processes.
"""

from cronos.admm import (
    ADMMConfig,
    NonFiniteIterateError,
    SolveResult,
    default_config,
    solve,
)
from cronos.compilation_cache import enable_compilation_cache
from cronos.estimator import ConvexReLUClassifier, NotFittedError
from cronos.jaxcld_mode import JaxcldConfig
from cronos.problems import (
    ConvexReLU,
    GatedReLU,
    certified_lower_bound,
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
    "JaxcldConfig",
    "NotFittedError",
    "NonFiniteIterateError",
    "SolveResult",
    "certified_lower_bound",
    "constraint_violation",
    "default_config",
    "enable_compilation_cache",
    "encode_targets",
    "network_objective",
    "objective",
    "sample_gates",
    "sample_patterns",
    "solve",
]
