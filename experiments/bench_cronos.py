"""Benchmark cronos against pyscnn, jaxcld 0.2.4 and an optax-Adam-trained ReLU MLP; writes a markdown report.

    pip install --no-deps jaxcld==0.2.4             # the published reference solver (pure JAX)
    pip install --no-deps pyscnn linalg_backends    # pyscnn (`import scnn`): augmented Lagrangian for convex ReLU
    python -m experiments.bench_cronos --flagfile=experiments/configs/bench_cronos.flags          # jaxcld, adam
    python -m experiments.bench_cronos --flagfile=experiments/configs/bench_cronos_pyscnn.flags   # pyscnn
    python -m experiments.bench_cronos --flagfile=experiments/configs/bench_cronos_quick.flags    # a smoke test

Sections (`--sections`, any of jaxcld, pyscnn, adam):

  * jaxcld: cronos vs jaxcld 0.2.4, both at the published fixed settings (6 ADMM x 32 PCG), for the
    two-class sizes `--sizes`, and cronos's counted FLOPs against single-GEMM rates.
  * adam: time for an optax-Adam MLP to reach cronos's validation accuracy (sizes `--adam_sizes`).
  * pyscnn: time for cronos (settings of `cronos_config`) to reach the objective at which pyscnn's
    augmented-Lagrangian solver stops, for each problem `n:d:C` of `--pyscnn_problems` and each pyscnn
    tolerance (`--pyscnn_tol`, or the problem's own `:tol1/tol2`); jaxcld's fixed-settings result on
    the same problem alongside.

Every solver runs in a fresh subprocess of this binary (`--worker=...`), so each wall time includes
its JIT compilation and nothing else shares the interpreter (imports excluded). All solvers of a
problem get the same data and the same activation patterns; their objectives are evaluated by the
driver from the returned weights with one set of float64 NumPy functions, never taken from the
solvers: `cronos.objective` (the convex program), `cronos.constraint_violation` and
`cronos.network_objective` (the regularised training loss of the two-layer ReLU network the weights define,
honest when the cone constraints do not hold). FLOPs come from XLA's cost analysis (`SolveResult.flops`).

Data: embedding-like synthetic C-class data (power-law spectrum, class means offset along a few
directions), standing in for mean-pooled speech-encoder embeddings, which cannot be fetched here.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from experiments import report

SECTIONS = ("jaxcld", "pyscnn", "adam")
_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS),
                              "Report sections to run: jaxcld (fixed-settings table and FLOPs), pyscnn, adam.")
_SIZES = flags.DEFINE_list("sizes", ["200", "1000", "2000", "20000"], "Training-set sizes n.")
_DIM = flags.DEFINE_integer("dim", 768, "Feature dimension d.")
_PATTERNS = flags.DEFINE_integer("patterns", 64, "Activation patterns P (2P hidden units).")
_BETA = flags.DEFINE_float("beta", 1e-3, "Group-lasso strength.")
_JAXCLD = flags.DEFINE_bool("jaxcld", True, "Run the jaxcld 0.2.4 reference (pip install --no-deps jaxcld==0.2.4).")
_ADAM_SIZES = flags.DEFINE_list("adam_sizes", ["2000", "20000"], "Sizes for the Adam comparison.")
_ADAM_SECONDS = flags.DEFINE_float("adam_max_seconds", 600.0, "Cap on the Adam baseline's training time.")
_VAL = flags.DEFINE_integer("val_size", 2000, "Validation samples.")
_PYSCNN_PROBLEMS = flags.DEFINE_list("pyscnn_problems", ["1000:768:2", "5000:768:2", "20000:768:2", "12000:1280:5"],
                                     "Problems n:d:C (C classes) of the pyscnn comparison.")
_PYSCNN_TOL = flags.DEFINE_list("pyscnn_tol", ["1e-4", "1e-6"], "pyscnn AL tolerances: one pyscnn run and one target each.")
_PYSCNN_MAX_SECONDS = flags.DEFINE_float("pyscnn_max_seconds", 1200.0,
                                         "Wall-clock cap on one pyscnn run (stopped through its outer stopping test).")
_PYSCNN_JAXCLD = flags.DEFINE_bool("pyscnn_jaxcld", True, "Also run jaxcld 0.2.4 (fixed settings) on every pyscnn problem.")
_CRONOS_MAX_ITERS = flags.DEFINE_integer("cronos_max_iters", 3000,
                                         "ADMM iteration cap of cronos's trace run (internal: of a timed run).")
_OUTPUT = flags.DEFINE_string("output", "experiments/results/bench_cronos.md", "Markdown table to write.")
_WORKER = flags.DEFINE_enum("worker", None, ["cronos", "jaxcld", "adam", "gemm", "pyscnn", "cronos_trace", "cronos_target"],
                            "Internal: run one solver.")
_DATA = flags.DEFINE_string("data", None, "Internal: npz with the problem.")
_RESULT = flags.DEFINE_string("result", None, "Internal: npz/json to write.")
_TARGET = flags.DEFINE_float("target_accuracy", 0.0, "Internal: Adam stops at this validation accuracy.")
_PYSCNN_WORKER_TOL = flags.DEFINE_float("pyscnn_worker_tol", None, "Internal: the AL tolerance of a pyscnn worker.")

RHO, RANK, ADMM_ITERS, PCG_ITERS, GAMMA = 0.1, 20, 6, 32, 1.0  # the published CLD settings
TARGET_SLACK = 1e-4  # cronos reaches a target when its objective is <= target * (1 + TARGET_SLACK)
TARGET_RETRIES = 5  # timed re-runs with more iterations when the first one misses the target


def cronos_config(max_iters: int):
    """cronos's settings in the pyscnn comparison (trace and timed runs); `max_iters` caps ADMM iterations."""
    import cronos
    return cronos.ADMMConfig(tol=1e-4, admm_iters=max_iters)  # tolerance-mode defaults, pyscnn's tol


def make_data(n: int, n_val: int, d: int, seed: int = 0, num_classes: int = 2):
    """C-class embedding-like data: power-law covariance, class means apart along 8 directions.

    Two classes have means -offset / +offset (the data of the original two-class benchmark, reproduced
    exactly); more classes get independent random means in the same 8-dimensional subspace.
    """
    if num_classes < 2 or d < 8:
        raise ValueError(f"need at least 2 classes and d >= 8; got {num_classes} classes, d = {d}.")
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = 1.0 / np.sqrt(1.0 + np.arange(d))
    if num_classes == 2:
        offset = basis[:, :8] @ rng.standard_normal(8) * 0.25
        means = np.stack([-offset, offset])
    else:
        means = (basis[:, :8] @ rng.standard_normal((8, num_classes)) * 0.25).T
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


# ------------------------------------------------------------------------------------------------ workers


def _worker_cronos(data, out):
    import jax
    import cronos
    start = time.perf_counter()
    problem = cronos.ConvexReLU(data["X"], data["y"], patterns=data["D"], beta=float(data["beta"]))
    config = cronos.ADMMConfig(rho=RHO, rank=RANK, admm_iters=ADMM_ITERS, pcg_iters=PCG_ITERS, gamma=GAMMA)
    result = cronos.solve(problem, config, key=jax.random.key(0))
    wall = time.perf_counter() - start
    accuracy = float(np.mean(np.asarray(result.predict(data["Xval"])) == data["yval"]))
    flops = result.flops
    np.savez(out, v=np.asarray(result.v), w=np.asarray(result.w), wall=wall, compile=result.compile_seconds,
             run=result.run_seconds, flops=flops["total"], val_accuracy=accuracy,
             pcg=result.history["pcg_iterations"])


def _worker_jaxcld(data, out):
    import jax
    import jax.numpy as jnp
    from jaxcld.models.cvx_relu_mlp import CVX_ReLU_MLP
    from jaxcld.optimizers.admm import admm
    start = time.perf_counter()
    num_classes = int(data["C"]) if "C" in data else 2
    model = CVX_ReLU_MLP(jnp.asarray(data["X"]), jnp.asarray(data["y"]), num_classes, int(data["P"]),
                         float(data["beta"]), RHO, jax.random.PRNGKey(0))
    model.d_diags = jnp.asarray(data["D"], jnp.float32)  # the same patterns as cronos
    model.e_diags = 2 * model.d_diags - 1
    params = dict(rank=RANK, beta=float(data["beta"]), gamma_ratio=GAMMA, admm_iters=ADMM_ITERS,
                  pcg_iters=PCG_ITERS, check_opt=False)
    v, _ = admm(model, params)
    v.block_until_ready()
    wall = time.perf_counter() - start
    scores = model.stacked_predict(jnp.asarray(data["Xval"]), model.theta1, model.theta2)
    accuracy = float(np.mean(np.asarray(scores).argmax(1) == data["yval"]))
    np.savez(out, v=np.asarray(v[:, 0]), w=np.asarray(v[:, 1]), wall=wall, val_accuracy=accuracy)


def _worker_pyscnn(data, out, tol, max_seconds):
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


def _worker_cronos_tol(data, out, max_iters, trace):
    """cronos with `cronos_config(max_iters)`; the trace run also saves its history and counted FLOPs."""
    import jax
    import cronos
    start = time.perf_counter()
    problem = cronos.ConvexReLU(data["X"], data["Y"], patterns=data["D"], beta=float(data["beta"]))
    result = cronos.solve(problem, cronos_config(max_iters), key=jax.random.key(0))
    wall = time.perf_counter() - start
    arrays = dict(v=np.asarray(result.v), w=np.asarray(result.w), wall=wall, compile=result.compile_seconds,
                  run=result.run_seconds, iterations=result.iterations, converged=result.converged)
    if trace:
        arrays["flops"] = result.flops["total"]
        arrays.update({f"history_{name}": values for name, values in result.history.items()})
    np.savez(out, **arrays)


def _worker_adam(data, out, target, max_seconds):
    """Two-layer ReLU MLP (2P hidden units), cross-entropy, optax Adam 1e-3, batch 256, until target."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    X, y, Xval, yval = (jnp.asarray(data[k]) for k in ("X", "y", "Xval", "yval"))
    start = time.perf_counter()
    model = nnx.Sequential(nnx.Linear(X.shape[1], 2 * int(data["P"]), rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(2 * int(data["P"]), 2, rngs=nnx.Rngs(1)))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def accuracy(model):
        return jnp.mean(jnp.argmax(model(Xval), axis=1) == yval)

    rng = np.random.default_rng(0)
    n, batch, epochs, best, reached = X.shape[0], min(256, X.shape[0]), 0, 0.0, None
    while time.perf_counter() - start < max_seconds:
        order = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            step(model, optimizer, X[order[i:i + batch]], y[order[i:i + batch]])
        epochs += 1
        acc = float(accuracy(model))
        best = max(best, acc)
        if acc >= target:
            reached = time.perf_counter() - start
            break
    report.atomic_write_text(out, json.dumps({"reached_seconds": reached, "epochs": epochs, "best_accuracy": best,
                                              "elapsed": time.perf_counter() - start}))


def _worker_gemm(out, sizes, d, columns):
    """Single-GEMM GFLOP/s: square 4096 and the solve's (n x d) @ (d x C*P) shape; best of 10."""
    import jax

    def rate(a, b):
        f = jax.jit(lambda a, b: a @ b)
        f(a, b).block_until_ready()
        best = min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(10))
        return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9

    key = jax.random.key(0)
    rates = {"square_4096": rate(jax.random.normal(key, (4096, 4096)), jax.random.normal(key, (4096, 4096)))}
    for n in sizes:
        rates[f"solve_{n}"] = rate(jax.random.normal(key, (n, d)), jax.random.normal(key, (d, columns)))
    report.atomic_write_text(out, json.dumps(rates))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ driver


def _spawn(worker: str, data_path: str | None, result_path: str, *extra: str) -> None:
    command = [sys.executable, "-m", "experiments.bench_cronos", f"--worker={worker}", f"--result={result_path}"]
    if data_path:
        command.append(f"--data={data_path}")
    out = subprocess.run(command + list(extra), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {worker} failed:\n{out.stderr[-4000:]}")


def _parse_problem(spec: str) -> tuple[int, int, int, list[float]]:
    """n:d:C, optionally :tol1/tol2 (pyscnn tolerances for this problem; default --pyscnn_tol)."""
    parts = spec.split(":")
    try:
        if len(parts) not in (3, 4):
            raise ValueError
        n, d, c = (int(part) for part in parts[:3])
        tols = [float(t) for t in (parts[3].split("/") if len(parts) == 4 else _PYSCNN_TOL.value)]
    except ValueError:
        raise app.UsageError(f"--pyscnn_problems entries are n:d:C or n:d:C:tol1/tol2, got {spec!r}") from None
    return n, d, c, tols


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKER.value:
        data = None if _DATA.value is None else np.load(_DATA.value)
        if _WORKER.value == "cronos":
            _worker_cronos(data, _RESULT.value)
        elif _WORKER.value == "jaxcld":
            _worker_jaxcld(data, _RESULT.value)
        elif _WORKER.value == "adam":
            _worker_adam(data, _RESULT.value, _TARGET.value, _ADAM_SECONDS.value)
        elif _WORKER.value == "pyscnn":
            _worker_pyscnn(data, _RESULT.value, _PYSCNN_WORKER_TOL.value, _PYSCNN_MAX_SECONDS.value)
        elif _WORKER.value in ("cronos_trace", "cronos_target"):
            _worker_cronos_tol(data, _RESULT.value, _CRONOS_MAX_ITERS.value, trace=_WORKER.value == "cronos_trace")
        else:
            _worker_gemm(_RESULT.value, [int(s) for s in _SIZES.value], _DIM.value, 2 * _PATTERNS.value)
        return

    sections = [s.strip() for s in _SECTIONS.value]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise app.UsageError(f"unknown --sections {unknown}; choose from {list(SECTIONS)}")
    problems = [_parse_problem(spec) for spec in _PYSCNN_PROBLEMS.value] if "pyscnn" in sections else []
    report.run_facts()  # the machine line of the stamp, GEMM rate measured before the work starts
    load_before = os.getloadavg()
    rows, adam_rows, gemm, pyscnn_rows = [], [], None, []
    with tempfile.TemporaryDirectory() as tmp:
        if "jaxcld" in sections or "adam" in sections:
            rows, adam_rows, gemm = _run_fixed(tmp, sections)
        if problems:
            pyscnn_rows = _run_pyscnn(tmp, problems)
    load_after = os.getloadavg()
    _write_report(sections, rows, adam_rows, gemm, pyscnn_rows, load_before, load_after)


def _run_fixed(tmp, sections):
    """The published fixed-settings runs: cronos (and jaxcld) per size, the GEMM reference, Adam."""
    import jax
    import cronos

    sizes = [int(s) for s in _SIZES.value]
    adam_sizes = {int(s) for s in _ADAM_SIZES.value} if "adam" in sections else set()
    if "jaxcld" not in sections:
        sizes = [n for n in sizes if n in adam_sizes]  # Adam needs cronos's validation accuracy as its target
    rows, adam_rows, gemm = [], [], None
    if "jaxcld" in sections:
        gemm_path = os.path.join(tmp, "gemm.json")
        _spawn("gemm", None, gemm_path, f"--sizes={','.join(map(str, sizes))}", f"--dim={_DIM.value}",
               f"--patterns={_PATTERNS.value}")
        gemm = json.load(open(gemm_path))
    for n in sizes:
        (X, y), (Xval, yval) = make_data(n, _VAL.value, _DIM.value)
        D = np.asarray(cronos.sample_patterns(jax.random.key(1), X, _PATTERNS.value))
        data_path = os.path.join(tmp, f"data_{n}.npz")
        np.savez(data_path, X=X, y=y, D=D, Xval=Xval, yval=yval, beta=_BETA.value, P=_PATTERNS.value)
        problem = cronos.ConvexReLU(X, y, patterns=D, beta=_BETA.value)
        ours_path = os.path.join(tmp, f"cronos_{n}.npz")
        _spawn("cronos", data_path, ours_path)
        ours = np.load(ours_path)
        row = {"n": n, "cronos_wall": float(ours["wall"]), "cronos_compile": float(ours["compile"]),
               "cronos_run": float(ours["run"]), "cronos_objective": cronos.objective(problem, ours["v"], ours["w"]),
               "cronos_val": float(ours["val_accuracy"]), "flops": float(ours["flops"]),
               "pcg": int(ours["pcg"].sum())}
        if gemm is not None:
            row.update(gemm_solve=gemm[f"solve_{n}"], gemm_square=gemm["square_4096"])
        row["gflops"] = row["flops"] / row["cronos_run"] / 1e9
        print(f"n={n}: cronos {row['cronos_wall']:.2f}s (compile {row['cronos_compile']:.2f}s) "
              f"objective {row['cronos_objective']:.5g} val {row['cronos_val']:.4f} {row['gflops']:.1f} GFLOP/s",
              flush=True)
        if _JAXCLD.value and "jaxcld" in sections:
            ref_path = os.path.join(tmp, f"jaxcld_{n}.npz")
            _spawn("jaxcld", data_path, ref_path)
            ref = np.load(ref_path)
            row.update(jaxcld_wall=float(ref["wall"]), jaxcld_objective=cronos.objective(problem, ref["v"], ref["w"]),
                       jaxcld_val=float(ref["val_accuracy"]))
            print(f"n={n}: jaxcld {row['jaxcld_wall']:.2f}s objective {row['jaxcld_objective']:.5g} "
                  f"val {row['jaxcld_val']:.4f}", flush=True)
        rows.append(row)
        if n in adam_sizes:
            adam_path = os.path.join(tmp, f"adam_{n}.json")
            _spawn("adam", data_path, adam_path, f"--target_accuracy={row['cronos_val']}",
                   f"--adam_max_seconds={_ADAM_SECONDS.value}")
            adam = json.load(open(adam_path))
            adam_rows.append({"n": n, "target": row["cronos_val"], "cronos_wall": row["cronos_wall"], **adam})
            print(f"n={n}: adam {adam}", flush=True)
    return rows, adam_rows, gemm


def _run_pyscnn(tmp, problems):
    """Per problem: pyscnn per tolerance, one cronos trace run, timed cronos runs to each target, jaxcld."""
    import jax
    import cronos

    rows = []
    for n, d, C, tols in problems:
        tag = f"{n}_{d}_{C}"
        (X, y), (Xval, yval) = make_data(n, _VAL.value, d, num_classes=C)
        G = np.asarray(cronos.sample_gates(jax.random.key(1), d, _PATTERNS.value))
        D = (X.astype(np.float64) @ G.astype(np.float64)) >= 0  # the patterns of every solver
        Y = cronos.encode_targets(y, C)
        problem = cronos.ConvexReLU(X, Y, patterns=D, beta=_BETA.value)
        data_path = os.path.join(tmp, f"pyscnn_data_{tag}.npz")
        np.savez(data_path, X=X, y=y, Y=Y, D=D, G=G, Xval=Xval, yval=yval, beta=_BETA.value, P=_PATTERNS.value, C=C)

        def evaluate(v, w):
            return {"network": cronos.network_objective(problem, v, w), "convex": cronos.objective(problem, v, w),
                    "violation": cronos.constraint_violation(problem, v, w)}

        pyscnn = {}
        for tol in tols:
            path = os.path.join(tmp, f"pyscnn_{tag}_{tol:g}.npz")
            _spawn("pyscnn", data_path, path, f"--pyscnn_worker_tol={tol!r}", f"--pyscnn_max_seconds={_PYSCNN_MAX_SECONDS.value}")
            out = np.load(path)
            v, w = pyscnn_to_cronos_layout(X, D, out["gates"], out["v"], out["w"])
            pyscnn[tol] = {"wall": float(out["wall"]), "capped": bool(out["capped"]), "patterns": int(out["gates"].shape[1]), **evaluate(v, w)}
            print(f"{tag} tol {tol:g}: pyscnn {pyscnn[tol]['wall']:.2f}s network objective {pyscnn[tol]['network']:.7g} "
                  f"convex {pyscnn[tol]['convex']:.7g} violation {pyscnn[tol]['violation']:.1e}", flush=True)

        trace_path = os.path.join(tmp, f"cronos_trace_{tag}.npz")
        _spawn("cronos_trace", data_path, trace_path, f"--cronos_max_iters={_CRONOS_MAX_ITERS.value}")
        out = np.load(trace_path)
        trace = {"wall": float(out["wall"]), "compile": float(out["compile"]), "run": float(out["run"]),
                 "iterations": int(out["iterations"]), "converged": bool(out["converged"]),
                 "flops": float(out["flops"]), **evaluate(out["v"], out["w"])}
        trace["gflops"] = trace["flops"] / trace["run"] / 1e9
        history = np.asarray(out["history_network_objective"], np.float64)
        print(f"{tag}: cronos trace {trace['wall']:.2f}s (compile {trace['compile']:.2f}s), {trace['iterations']} "
              f"iterations (converged {trace['converged']}), network objective {trace['network']:.7g} violation "
              f"{trace['violation']:.1e}, {trace['gflops']:.1f} GFLOP/s", flush=True)

        jaxcld = None
        if _PYSCNN_JAXCLD.value:
            path = os.path.join(tmp, f"pyscnn_jaxcld_{tag}.npz")
            _spawn("jaxcld", data_path, path)
            out = np.load(path)
            jaxcld = {"wall": float(out["wall"]), **evaluate(out["v"], out["w"])}
            print(f"{tag}: jaxcld {jaxcld['wall']:.2f}s network objective {jaxcld['network']:.7g}", flush=True)

        for tol in tols:
            timed = _time_to_target(data_path, os.path.join(tmp, f"cronos_target_{tag}.npz"), problem, history,
                                    pyscnn[tol]["network"], trace)
            print(f"{tag} tol {tol:g}: cronos to target {timed}", flush=True)
            rows.append({"n": n, "d": d, "C": C, "tol": tol, "pyscnn": pyscnn[tol], "cronos": trace, "timed": timed,
                         "jaxcld": jaxcld})
    return rows


def _time_to_target(data_path, result_path, problem, history, target, trace) -> dict:
    """Times a fresh cronos run of k* iterations, k* read off the trace; verifies the objective independently.

    The iteration is deterministic given its count, so the k*-iteration run ends at the trace's k*-th
    iterate. The trace records the (float32) network objective of each iterate; the target is checked
    against the network objective, so a run that misses it is repeated with max(5, 10%) more iterations.
    """
    import cronos
    threshold = target * (1.0 + TARGET_SLACK)
    hits = np.flatnonzero(history <= threshold)
    if hits.size:
        iterations = int(hits[0]) + 1
    elif trace["network"] <= threshold:
        iterations = trace["iterations"]  # only the final iterate, checked independently, gets there
    else:
        return {"status": "not reached"}
    k_star = iterations
    for attempt in range(1, TARGET_RETRIES + 2):
        _spawn("cronos_target", data_path, result_path, f"--cronos_max_iters={iterations}")
        out = np.load(result_path)
        result = {"k_star": k_star, "iterations": int(out["iterations"]), "wall": float(out["wall"]),
                  "compile": float(out["compile"]), "run": float(out["run"]), "attempts": attempt,
                  "network": cronos.network_objective(problem, out["v"], out["w"])}
        if result["network"] <= threshold:
            return {"status": "reached", **result}
        if iterations >= trace["iterations"]:
            break
        iterations = min(trace["iterations"], iterations + max(5, math.ceil(0.1 * iterations)))
    return {"status": "not verified", **result}


def _write_report(sections, rows, adam_rows, gemm, pyscnn_rows, load_before, load_after):
    extras = ["float32"]
    if "pyscnn" in sections:
        extras += [f"numpy {np.__version__}", f"pyscnn {_version('pyscnn')}"]
    lines = [
        "# cronos benchmark",
        "",
        f"Generated by `python -m experiments.bench_cronos` on {datetime.date.today()}.",
        f"Machine: {report.machine(*extras)}. Load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}.",
        "",
    ]
    if "jaxcld" in sections or "adam" in sections:
        lines += [
            f"Problem: two classes, d = {_DIM.value}, P = {_PATTERNS.value} patterns ({2 * _PATTERNS.value} hidden units), beta = {_BETA.value}, "
            f"published fixed settings for both solvers (rho {RHO}, rank {RANK}, {ADMM_ITERS} ADMM x {PCG_ITERS} PCG, "
            f"gamma {GAMMA}); cronos's PCG also stops once its relative residual reaches 10 * float32 eps. "
            "Same data and patterns for both; objectives evaluated by `cronos.objective` in float64. "
            "Wall time includes JIT compilation (each solver in a fresh process, imports excluded).",
            "",
        ]
    if "jaxcld" in sections:
        lines += _fixed_lines(rows)
    if adam_rows:
        lines += _adam_lines(adam_rows)
    if "pyscnn" in sections:
        lines += _pyscnn_lines(pyscnn_rows)
    while lines and lines[-1] == "":
        lines.pop()
    report.write_markdown(_OUTPUT.value, "\n".join(lines))


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _fixed_lines(rows):
    lines = [
        "## cronos vs jaxcld 0.2.4",
        "",
        "| n | jaxcld wall (s) | cronos wall (s) | cronos compile / run (s) | speed-up | jaxcld objective | cronos objective | objective ratio | jaxcld val acc | cronos val acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "jaxcld_wall" in r:
            lines.append(
                f"| {r['n']} | {r['jaxcld_wall']:.2f} | {r['cronos_wall']:.2f} | {r['cronos_compile']:.2f} / {r['cronos_run']:.2f} "
                f"| {r['jaxcld_wall'] / r['cronos_wall']:.1f}x | {r['jaxcld_objective']:.5g} | {r['cronos_objective']:.5g} "
                f"| {r['cronos_objective'] / r['jaxcld_objective']:.4f} | {r['jaxcld_val']:.4f} | {r['cronos_val']:.4f} |")
    lines += [
        "",
        "## Counted FLOPs and achieved rate",
        "",
        "FLOPs: XLA cost analysis of the compiled setup, ADMM step and PCG iteration, times the executed iteration "
        "counts. Rate = FLOPs / run time (compilation excluded). GEMM reference: best of 10 single `jnp.matmul` calls "
        "of the solve's shape (n x d) @ (d x 128) and of a square 4096 GEMM.",
        "",
        "| n | PCG iterations | XLA GFLOP | run (s) | achieved GFLOP/s | GEMM (n x d x 128) GFLOP/s | % of that GEMM | square GEMM GFLOP/s | % of square |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['pcg']} | {r['flops'] / 1e9:.1f} | {r['cronos_run']:.3f} | {r['gflops']:.1f} | {r['gemm_solve']:.1f} "
            f"| {100 * r['gflops'] / r['gemm_solve']:.0f}% | {r['gemm_square']:.1f} | {100 * r['gflops'] / r['gemm_square']:.0f}% |")
    return lines + [""]


def _adam_lines(adam_rows):
    lines = [
        "## Time to the same validation accuracy: cronos vs an optax-Adam ReLU MLP",
        "",
        f"Adam baseline: two-layer ReLU MLP with the same {2 * _PATTERNS.value} hidden units, softmax cross-entropy, Adam lr 1e-3, "
        "batch 256, validation accuracy checked after every epoch; time includes its JIT compilation. "
        f"Target = cronos's validation accuracy ({_VAL.value} held-out samples).",
        "",
        "| n | target val acc | cronos wall (s) | Adam time to target (s) | Adam epochs | Adam best val acc | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in adam_rows:
        if r["reached_seconds"] is None:
            adam_time = f"not reached in {r['elapsed']:.0f}"
            speedup = f"> {r['elapsed'] / r['cronos_wall']:.0f}x"
        else:
            adam_time = f"{r['reached_seconds']:.2f}"
            speedup = f"{r['reached_seconds'] / r['cronos_wall']:.1f}x"
        lines.append(f"| {r['n']} | {r['target']:.4f} | {r['cronos_wall']:.2f} | {adam_time} | {r['epochs']} "
                     f"| {r['best_accuracy']:.4f} | {speedup} |")
    return lines + [""]


def _pyscnn_lines(rows):
    config = cronos_config(_CRONOS_MAX_ITERS.value)
    rho_schedule = f"balanced against the residuals after {config.rho_warmup} iterations" if config.adapt_rho else "fixed"
    jaxcld_text = (
        f" jaxcld 0.2.4 runs once per problem at its published fixed settings (rho {RHO}, rank {RANK}, {ADMM_ITERS} ADMM "
        f"x {PCG_ITERS} PCG, gamma {GAMMA}) on the same patterns, for reference (it does not aim at the target)."
        if _PYSCNN_JAXCLD.value else "")
    lines = [
        "## cronos vs pyscnn (time to pyscnn's objective)",
        "",
        f"pyscnn {_version('pyscnn')} (`scnn`; its augmented-Lagrangian solver `AL` for the convex ReLU program, "
        "NumPy backend and float32 as by default) against cronos on the same problems: synthetic embedding-like data "
        "with C classes and one-vs-all one-hot targets, the same gates `cronos.sample_gates(key(1), d, P)` "
        f"(P = {_PATTERNS.value}, i.e. {2 * _PATTERNS.value} hidden units) and hence the same activation patterns "
        "D = 1[X G >= 0] for every solver (pyscnn's 1[X G > 0] is the same on continuous data). pyscnn drops "
        "duplicate patterns and reorders the rest; its weights are mapped back to our order by matching its pattern "
        "columns to ours. pyscnn minimises (1/(2nC)) ||r||^2 + lambda * sum_i (||v_i|| + ||w_i||), so lambda = beta / (nC) "
        f"(beta = {_BETA.value}) makes its objective ours divided by nC: both solve the same program. pyscnn runs once "
        "per `AL` tolerance `tol` (its bound on the squared gradient norm of the Lagrangian; 1e-6 is its default), "
        "other settings at their defaults, `unitize_data` off; its wall time runs from building its model to "
        "`optimize_model` returning. A run still going after --pyscnn_max_seconds "
        f"({_PYSCNN_MAX_SECONDS.value:g} s) is stopped through pyscnn's own outer stopping test and marked "
        "'(time cap)': its iterate at that moment is the target, and the speed-up is then a lower bound.",
        "",
        "Every objective below is computed by this script from the returned weights with the same float64 NumPy "
        "functions, never taken from a solver: the network objective is the regularised training loss of the "
        "two-layer ReLU network the weights define, 1/2 ||sum_i relu(X v_i) - relu(X w_i) - Y||^2 + beta * sum_i "
        "(||v_i|| + ||w_i||) (equal to the convex objective when the cone constraints hold, and honest when they "
        "do not); the convex objective is `cronos.objective` and the violation is `cronos.constraint_violation` "
        "(relative norm of the violated part of (2D - I) X [v, w]).",
        "",
        "Target = pyscnn's network objective at that tolerance. cronos (`cronos_config`: ADMM tolerance "
        f"{config.tol}, at most {config.pcg_iters} PCG iterations per ADMM step, rho {config.effective_rho} "
        f"({rho_schedule}), Nystrom rank {config.rank}, relaxation "
        f"{config.effective_relaxation}, preconditioner {config.preconditioner}, {config.dtype}) first makes one trace "
        f"run of at most {_CRONOS_MAX_ITERS.value} ADMM iterations that records the network objective of every iterate (float32, `history['network_objective']`); k* is "
        f"the first iteration count whose recorded objective is <= target * (1 + {TARGET_SLACK:g}). cronos then runs "
        "again in a fresh process with exactly k* iterations; the iteration is deterministic given its count, so this "
        "timed run ends at the trace's k*-th iterate, and its wall time (JIT compilation included, compile / run "
        "split in brackets) is cronos's time to the target. Its network objective is verified independently to be "
        f"<= target * (1 + {TARGET_SLACK:g}); if it is not, the count grows by max(5, 10%) and the timed run is "
        f"repeated, at most {TARGET_RETRIES} times (the iterations column shows k* and, if different, the count "
        "that verified). Speed-up = pyscnn wall / cronos time to target. The final-objective, iteration and FLOP "
        "columns describe the trace run; GFLOP = XLA cost analysis, GFLOP/s = GFLOP / run time (compilation "
        "excluded)." + jaxcld_text,
        "",
        "| n | d | C | pyscnn tol | pyscnn wall (s) | pyscnn network obj | pyscnn convex obj / violation "
        "| cronos time to target (s) (compile / run) | cronos iters to target | speed-up | cronos final network obj "
        "| cronos final violation | cronos trace wall (s) | cronos iters | XLA GFLOP | GFLOP/s "
        "| jaxcld wall (s) | jaxcld network obj |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, c, t, j = r["pyscnn"], r["cronos"], r["timed"], r["jaxcld"]
        if t["status"] == "not reached":
            time_cell, iters_cell, speedup = f"not reached in {c['iterations']} iterations", "-", "-"
        else:
            time_cell = f"{t['wall']:.2f} ({t['compile']:.2f} / {t['run']:.2f})"
            iters_cell = str(t["k_star"]) if t["iterations"] == t["k_star"] else f"{t['k_star']} -> {t['iterations']}"
            speedup = f"{'>= ' if p['capped'] else ''}{p['wall'] / t['wall']:.1f}x"
            if t["status"] == "not verified":
                time_cell = f"not verified: {t['iterations']} iterations give {t['network']:.7g}"
                speedup = "-"
        iterations = f"{c['iterations']} ({'converged' if c['converged'] else 'cap'})"
        jaxcld_cells = f"{j['wall']:.2f} | {j['network']:.7g}" if j is not None else "- | -"
        lines.append(
            f"| {r['n']} | {r['d']} | {r['C']} | {r['tol']:g} | {p['wall']:.2f}{' (time cap)' if p['capped'] else ''} | {p['network']:.7g} "
            f"| {p['convex']:.7g} / {p['violation']:.1e} | {time_cell} | {iters_cell} | {speedup} | {c['network']:.7g} "
            f"| {c['violation']:.1e} | {c['wall']:.2f} | {iterations} | {c['flops'] / 1e9:.1f} | {c['gflops']:.1f} "
            f"| {jaxcld_cells} |")
    return lines + [""]


if __name__ == "__main__":
    app.run(main)
