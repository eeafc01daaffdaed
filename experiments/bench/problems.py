"""Benchmark problems shared by the cronos benchmarks: embedding-like synthetic data, and pyscnn run on our gates."""

from __future__ import annotations

import time

import numpy as np


def make_data(n: int, n_val: int, d: int, seed: int = 0, num_classes: int = 2, separation_scale: float = 1.0):
    """C-class embedding-like data: power-law covariance, class means apart along 8 directions.

    `separation_scale` multiplies the class offsets (0.25 per direction at 1): below 1 weak, above strong.

    Two classes have means -offset / +offset (the data of the original two-class benchmark, reproduced
    exactly); more classes get independent random means in the same 8-dimensional subspace.
    """
    if num_classes < 2 or d < 8:
        raise ValueError(f"need at least 2 classes and d >= 8; got {num_classes} classes, d = {d}.")
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = 1.0 / np.sqrt(1.0 + np.arange(d))
    if num_classes == 2:
        offset = basis[:, :8] @ rng.standard_normal(8) * 0.25 * separation_scale
        means = np.stack([-offset, offset])
    else:
        means = (basis[:, :8] @ rng.standard_normal((8, num_classes)) * 0.25 * separation_scale).T
    def draw(m):
        y = rng.integers(0, num_classes, m)
        X = (rng.standard_normal((m, d)) * scales) @ basis.T + means[y]
        return X.astype(np.float32), y.astype(np.int32)
    return draw(n), draw(n_val)


def pyscnn_to_cronos_layout(X, D, gates, v, w):
    """Maps pyscnn's convex weights, (C, P', d) in its pattern order, to cronos's (C, d, P) in the order of D.

    pyscnn drops duplicate (and all-zero) activation patterns and reorders the rest; its gates (d, P')
    define its patterns 1[X g > 0], which are matched column by column to D. Patterns of D that pyscnn
    dropped as duplicates or as all-zero get zero weights (they would add nothing to the model).
    """
    D = np.asarray(D, bool)
    ours: dict[bytes, int] = {}
    for i, column in enumerate(D.T):
        ours.setdefault(column.tobytes(), i)
    theirs = [column.tobytes() for column in ((np.asarray(X, np.float64) @ np.asarray(gates, np.float64)) > 0).T]
    zero = np.zeros(D.shape[0], bool).tobytes()
    unknown = sum(key not in ours for key in theirs)
    missing = len(set(ours) - set(theirs) - {zero})
    repeated = len(theirs) - len(set(theirs))
    if unknown or missing or repeated:
        raise ValueError(
            f"pyscnn's activation patterns do not match ours: {unknown} of its {len(theirs)} patterns are not among "
            f"our {D.shape[1]}, {missing} of our distinct non-zero patterns are not among its, {repeated} of its "
            "are repeated; its weights cannot be mapped to our pattern order.")
    index = np.array([ours[key] for key in theirs], dtype=int)
    v, w = np.asarray(v, np.float64), np.asarray(w, np.float64)
    out_v = np.zeros((v.shape[0], v.shape[2], D.shape[1]))
    out_w = np.zeros_like(out_v)
    out_v[:, :, index] = v.transpose(0, 2, 1)
    out_w[:, :, index] = w.transpose(0, 2, 1)
    return out_v, out_w


def run_pyscnn(data, out, tol: float, max_seconds: float) -> None:
    """pyscnn's augmented Lagrangian (its defaults apart from tol; unitize_data off) on our gates.

    A wall-clock cap (`--pyscnn_max_seconds`) is added to pyscnn's own outer stopping test, so a run that
    would take hours returns its iterate at the cap (recorded as `capped`).
    """
    import scnn.optimize
    from scnn.metrics import Metrics
    from scnn.models import ConvexReLU
    from scnn.regularizers import NeuronGL1
    from scnn.solvers import AL
    X, Y, G = data["X"], data["Y"], data["G"]
    n, C = Y.shape
    start = time.perf_counter()
    capped = []
    build = scnn.optimize.build_optimizer

    def build_with_deadline(*args, **kwargs):
        """pyscnn's own procedure, whose outer stopping test also fires once max_seconds have passed."""
        procedure = build(*args, **kwargs)
        criterion = procedure.outer_term_criterion

        def stop(*a):
            if time.perf_counter() - start > max_seconds:
                capped.append(True)
                return True
            return criterion(*a)

        procedure.outer_term_criterion = stop
        return procedure

    scnn.optimize.build_optimizer = build_with_deadline
    model = ConvexReLU(G.astype(np.float64), c=C)
    # scnn: (1/(2nC)) ||r||^2 + lam * sum(||v_i|| + ||w_i||); lam = beta / (nC) makes it our objective / (nC).
    model, _ = scnn.optimize.optimize_model(model, AL(model, tol=tol), Metrics(), X, Y, regularizer=NeuronGL1(float(data["beta"]) / (n * C)),
                              return_convex=True, unitize_data=False, verbose=False)
    wall = time.perf_counter() - start
    v, w = model.parameters  # (C, P', d) each, in pyscnn's pattern order (gates model.G)
    np.savez(out, v=np.asarray(v), w=np.asarray(w), gates=np.asarray(model.G), wall=wall, capped=bool(capped))
