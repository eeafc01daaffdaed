"""Regime grid: cronos's default exact path against pyscnn's augmented Lagrangian, one table from one run.

    pip install --no-deps pyscnn linalg_backends
    python -m experiments.bench.bench_cronos_grid --flagfile=experiments/configs/bench_cronos_grid.flags
    python -m experiments.bench.bench_cronos_grid --flagfile=experiments/configs/bench_cronos_grid_quick.flags  # smoke run

Cells (`--cells`) are `n:d:C:separation:dtype` synthetic problems (`bench_cronos.make_data`: power-law
spectrum, class means `separation` apart along 8 directions) or `real:n`: n clips of real whisper-base
mean-pooled embeddings (d = 512, five languages) of the shipped espeak-ng corpus, read from (or added to) the
per-clip embedding cache. Every cell: the same data, gates and activation patterns for both solvers; each
solver runs in a fresh process of this binary (wall times include JIT compilation, imports excluded).

  1. pyscnn `AL` (tolerance `--pyscnn_tol`, its other defaults, `unitize_data` off), capped at
     `--pyscnn_max_seconds` through its own outer stopping test (then marked as capped: a stalled
     baseline, whose "target" is no win).
  2. cronos `solve(problem, tol=--tol)` (the default exact path: `cronos.default_config`), at most
     `--cronos_max_iters` iterations, recording the network objective of every iterate.
  3. target = pyscnn's final network objective. k* = the first cronos iteration within 1e-4 relative of it;
     cronos runs again in a fresh process with exactly k* iterations (deterministic, so it ends at the same
     iterate), verified by the evaluator (else more iterations, up to 3 attempts). That run's wall is
     cronos's first-run time to target; it then solves once more in the same process (executable cached),
     which is the warm-run time.

Every objective and violation in the table comes from one float64 NumPy evaluator (`cronos.network_objective`,
`cronos.constraint_violation`), never from a solver. The network objective is the regularised training loss
of the two-layer ReLU network the weights define (honest when cone constraints are violated).
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from encoders import runtime
from experiments.bench.problems import make_data, pyscnn_to_cronos_layout, run_pyscnn
from experiments.lib import report, runtime_flags

_CELLS = flags.DEFINE_list("cells", ["200:768:2:0.1:float32", "2000:768:2:0.1:float32", "real:480"],
                           "Cells: n:d:C:separation:dtype (synthetic) or real:n (whisper-base embeddings).")
_PATTERNS = flags.DEFINE_integer("patterns", 64, "Activation patterns P (2P hidden units).")
_BETA = flags.DEFINE_float("beta", 1e-3, "Group-lasso strength.")
_TOL = flags.DEFINE_float("tol", 1e-4, "cronos's tolerance (default exact path).")
_PYSCNN_TOL = flags.DEFINE_float("pyscnn_tol", 1e-4, "pyscnn AL tolerance.")
_PYSCNN_MAX_SECONDS = flags.DEFINE_float("pyscnn_max_seconds", 60.0, "Wall-clock cap on one pyscnn run.")
_CRONOS_MAX_ITERS = flags.DEFINE_integer("cronos_max_iters", 1000, "ADMM iteration cap of cronos's trace run.")
_LARGE_N_ITERS = flags.DEFINE_integer("large_n_iters", 200, "Iteration cap of the trace run for n > 5000.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "outputs/embedding_cache", "Embedding cache of the real cells.")
_OUTPUT = flags.DEFINE_string("results_md", "experiments/results/bench_cronos_grid.md", "Markdown table to write.")
_PLOT = flags.DEFINE_string("plot", "experiments/results/bench_cronos_grid.png", "PNG of time to objective vs n/d.")
_WORKER = flags.DEFINE_enum("worker", None, ["pyscnn", "cronos"], "Internal: run one solver.")
_DATA = flags.DEFINE_string("data", None, "Internal: npz with the problem.")
_RESULT = flags.DEFINE_string("result", None, "Internal: npz to write.")
_ITERS = flags.DEFINE_integer("iters", 0, "Internal: cronos iteration cap.")
_WARM_RUN = flags.DEFINE_bool("warm_run", True, "Internal: solve a second time in the process (the warm run).")

SLACK = 1e-4  # cronos reaches the target when its network objective <= target * (1 + SLACK)
ATTEMPTS = 3
REAL_LANGUAGES = ["en", "hi", "id", "ms", "zh"]


def _worker_cronos(data, out, iters, warm_run):
    """The default exact path in this process: first run (compile + run), then, if asked, warm (run only)."""
    import jax
    if str(data["dtype"]) == "float64":
        jax.config.update("jax_enable_x64", True)
    import cronos
    start = time.perf_counter()
    problem = cronos.ConvexReLU(data["X"], data["Y"], patterns=data["D"], beta=float(data["beta"]))
    config = cronos.default_config(problem, float(data["tol"]), str(data["dtype"]), max_iters=iters)
    result = cronos.solve(problem, config, key=jax.random.key(0))
    wall = time.perf_counter() - start
    warm = cronos.solve(problem, config, key=jax.random.key(0)) if warm_run else None
    np.savez(out, v=np.asarray(result.v), w=np.asarray(result.w), wall=wall, compile=result.compile_seconds,
             run=result.run_seconds, warm_run=warm.run_seconds if warm else np.nan,
             iterations=result.iterations, converged=result.converged, gap=result.duality_gap,
             linear_solver=config.linear_solver, network=result.history["network_objective"])


def _spawn(worker: str, data_path: str, result_path: str, *extra: str) -> None:
    command = [sys.executable, "-m", "experiments.bench.bench_cronos_grid", f"--worker={worker}", f"--data={data_path}",
               f"--result={result_path}", f"--pyscnn_tol={_PYSCNN_TOL.value!r}",
               f"--pyscnn_max_seconds={_PYSCNN_MAX_SECONDS.value!r}", *extra]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {worker} failed:\n{out.stderr[-4000:]}")


def _parse_cell(spec: str) -> dict:
    parts = spec.split(":")
    try:
        if parts[0] == "real" and len(parts) == 2:
            return {"kind": "real", "n": int(parts[1]), "d": 512, "C": len(REAL_LANGUAGES), "separation": None,
                    "dtype": "float32"}
        if len(parts) != 5 or parts[4] not in ("float32", "float64"):
            raise ValueError
        return {"kind": "synthetic", "n": int(parts[0]), "d": int(parts[1]), "C": int(parts[2]),
                "separation": float(parts[3]), "dtype": parts[4]}
    except ValueError:
        raise app.UsageError(f"--cells entries are n:d:C:separation:float32|float64 or real:n, got {spec!r}") from None


def _real_embeddings(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n clips (a fixed random subset) of whisper-base mean-pooled embeddings of the embedded corpus."""
    from experiments.lib import cld
    dataset = cld.load_dataset("embedded", REAL_LANGUAGES)
    if n > len(dataset):
        raise app.UsageError(f"real:{n} asks for more clips than the embedded corpus has ({len(dataset)}).")
    chosen = np.sort(np.random.default_rng(0).permutation(len(dataset))[:n])
    examples = [dataset.examples[i] for i in chosen]
    features, _, _, _ = cld.embed_dataset({"encoder": "openai/whisper-base", "pooling": "mean", "batch_size": 8},
                                          examples, _CACHE_DIR.value, None)
    return np.asarray(features["X"], np.float32), dataset.subset(examples).labels()


def _cell_data(cell: dict):
    if cell["kind"] == "real":
        return _real_embeddings(cell["n"])
    scale = cell["separation"] / 0.25  # make_data's offset is 0.25 per direction
    (X, y), _ = make_data(cell["n"], 1, cell["d"], num_classes=cell["C"], separation_scale=scale)
    return X.astype(cell["dtype"]), y


def _run_cell(tmp: str, index: int, cell: dict) -> dict:
    import jax

    import cronos
    X, y = _cell_data(cell)
    n, d = X.shape
    G = np.asarray(cronos.sample_gates(jax.random.key(1), d, _PATTERNS.value))
    D = (X.astype(np.float64) @ G.astype(np.float64)) >= 0
    Y = cronos.encode_targets(y, cell["C"]).astype(cell["dtype"])
    problem = cronos.ConvexReLU(X, Y, patterns=D, beta=_BETA.value)
    data_path = os.path.join(tmp, f"cell{index}.npz")
    np.savez(data_path, X=X, y=y, Y=Y, D=D, G=G, beta=_BETA.value, tol=_TOL.value, dtype=cell["dtype"])

    def evaluate(v, w):
        return {"network": cronos.network_objective(problem, v, w), "violation": cronos.constraint_violation(problem, v, w)}

    path = os.path.join(tmp, f"pyscnn{index}.npz")
    _spawn("pyscnn", data_path, path)
    out = np.load(path)
    pyscnn_weights = pyscnn_to_cronos_layout(X, D, out["gates"], out["v"], out["w"])
    pyscnn = {"wall": float(out["wall"]), "capped": bool(out["capped"]), **evaluate(*pyscnn_weights)}
    iters = _CRONOS_MAX_ITERS.value if n <= 5000 else _LARGE_N_ITERS.value
    path = os.path.join(tmp, f"trace{index}.npz")
    _spawn("cronos", data_path, path, f"--iters={iters}", "--nowarm_run")
    out = np.load(path)
    trace = {"wall": float(out["wall"]), "iterations": int(out["iterations"]), "converged": bool(out["converged"]),
             "gap": float(out["gap"]), "linear_solver": str(out["linear_solver"]), "cap": iters,
             **evaluate(out["v"], out["w"])}
    # The certificate of issue 16, on both final iterates (float64, host): L = the better of the two bounds.
    start = time.perf_counter()
    cronos_bound = cronos.certified_lower_bound(problem, out["v"], out["w"])
    trace["certificate_seconds"] = time.perf_counter() - start
    bound = max(cronos_bound, cronos.certified_lower_bound(problem, *pyscnn_weights))
    for record, (v, w) in ((trace, (out["v"], out["w"])), (pyscnn, pyscnn_weights)):
        objective = cronos.objective(problem, v, w)
        record["certified_gap"] = (objective - bound) / objective
    threshold = pyscnn["network"] * (1.0 + SLACK)
    hits = np.flatnonzero(np.asarray(out["network"], np.float64) <= threshold)
    timed = {"status": "not reached"}
    if hits.size or trace["network"] <= threshold:
        k = int(hits[0]) + 1 if hits.size else trace["iterations"]
        for attempt in range(1, ATTEMPTS + 1):
            path = os.path.join(tmp, f"target{index}.npz")
            _spawn("cronos", data_path, path, f"--iters={k}")
            out = np.load(path)
            timed = {"status": "reached", "iterations": int(out["iterations"]), "wall": float(out["wall"]),
                     "compile": float(out["compile"]), "run": float(out["run"]), "warm": float(out["warm_run"]),
                     **evaluate(out["v"], out["w"])}
            if timed["network"] <= threshold:
                break
            timed["status"] = "not verified"
            if k >= trace["iterations"]:
                break
            k = min(trace["iterations"], k + max(5, math.ceil(0.1 * k)))
    row = {**cell, "n": n, "d": d, "pyscnn": pyscnn, "cronos": trace, "timed": timed}
    print(json.dumps(row), flush=True)
    return row


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| cell | n | d | n/d | C | separation | dtype | pyscnn wall (s) | pyscnn net obj / violation | pyscnn met its tol | "
        "cronos time to pyscnn's obj: first run (compile / run), warm run (s) | speed-up (first / warm) | "
        "cronos final net obj / violation | cronos iters (solver) | cronos met its tol | cronos duality gap | "
        "certified gap cronos / pyscnn (certificate s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        p, c, t = r["pyscnn"], r["cronos"], r["timed"]
        if t["status"] == "reached":
            timing = f"{t['wall']:.2f} ({t['compile']:.2f} / {t['run']:.2f}), {t['warm']:.2f} [{t['iterations']} iters]"
            bound = ">= " if p["capped"] else ""
            speed = f"{bound}{p['wall'] / t['wall']:.1f}x / {bound}{p['wall'] / t['warm']:.1f}x"
            if p["capped"]:
                speed += " (pyscnn capped: no win)"
        else:
            timing, speed = t["status"], "-"
        sep = "real" if r["kind"] == "real" else f"{r['separation']:g}"
        lines.append(
            f"| {i + 1} | {r['n']} | {r['d']} | {r['n'] / r['d']:.2f} | {r['C']} | {sep} | {r['dtype']} "
            f"| {p['wall']:.2f}{' (cap)' if p['capped'] else ''} | {_fmt(p['network'])} / {p['violation']:.1e} "
            f"| {'no (capped)' if p['capped'] else 'yes'} | {timing} | {speed} | {_fmt(c['network'])} / {c['violation']:.1e} "
            f"| {c['iterations']} of {c['cap']} ({c['linear_solver']}) | {'yes' if c['converged'] else 'no'} | {c['gap']:.1e} "
            f"| {c['certified_gap']:.1e} / {p['certified_gap']:.1e} ({c['certificate_seconds']:.1f}) |")
    return lines


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ratio = [r["n"] / r["d"] for r in rows]
    ax.scatter(ratio, [r["pyscnn"]["wall"] for r in rows], marker="s", facecolors=[
        "none" if r["pyscnn"]["capped"] else "tab:orange" for r in rows], edgecolors="tab:orange",
        label="pyscnn AL wall (hollow: hit the cap)")
    reached = [r for r in rows if r["timed"]["status"] == "reached"]
    ax.scatter([r["n"] / r["d"] for r in reached], [r["timed"]["wall"] for r in reached], marker="o", color="tab:blue",
               label="cronos to pyscnn's objective, first run")
    ax.scatter([r["n"] / r["d"] for r in reached], [r["timed"]["warm"] for r in reached], marker=".", color="tab:cyan",
               label="cronos, warm run")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n / d")
    ax.set_ylabel("seconds")
    ax.set_title("Time to pyscnn's final objective (one run, this machine)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    report.atomic_write_bytes(path, buffer.getvalue())
    print(f"wrote {path}")


def main(argv):
    runtime_flags.init()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKER.value:
        data = np.load(_DATA.value)
        if _WORKER.value == "pyscnn":
            run_pyscnn(data, _RESULT.value, _PYSCNN_TOL.value, _PYSCNN_MAX_SECONDS.value)
        else:
            _worker_cronos(data, _RESULT.value, _ITERS.value, _WARM_RUN.value)
        return
    cells = [_parse_cell(spec) for spec in _CELLS.value]
    report.run_facts()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_run_cell(tmp, i, cell) for i, cell in enumerate(cells)]
    import importlib.metadata

    from cronos import admm
    direct_rule = (f"n <= {admm.DIRECT_MAX_SAMPLES} through an eigendecomposition, beyond it through a Cholesky "
                   f"factorisation while three n x n matrices fit in {admm.DIRECT_MAX_BYTES / 2**30:g} GiB")
    large_n_cap = "" if _LARGE_N_ITERS.value == _CRONOS_MAX_ITERS.value else f" ({_LARGE_N_ITERS.value} for n > 5000)"
    lines = [
        "# cronos vs pyscnn: regime grid",
        "",
        f"pyscnn {importlib.metadata.version('pyscnn')} `AL(tol={_PYSCNN_TOL.value:g})` (other settings default, "
        f"`unitize_data=False`, capped at {_PYSCNN_MAX_SECONDS.value:g} s) against cronos's default exact path "
        f"`cronos.solve(problem, tol={_TOL.value:g})` (`cronos.default_config`: tolerance-mode ADMM on unit-spectral-norm "
        f"data, exact Woodbury u-solve for {direct_rule}, Nystrom PCG above), at most "
        f"{_CRONOS_MAX_ITERS.value} iterations{large_n_cap}. P = {_PATTERNS.value} gates "
        f"`cronos.sample_gates(key(1), d, P)` for both, beta = {_BETA.value:g}, one-vs-all one-hot targets. "
        "pyscnn's objective is ours / (nC) with lambda = beta / (nC): the same program.",
        "",
        "Time to pyscnn's objective: the first cronos iterate whose network objective is within 1e-4 relative of "
        "pyscnn's final one, verified by the evaluator; 'first run' is a fresh process (compilation included), "
        "'warm' the same solve again in that process (compiled executable reused). Speed-up = pyscnn wall / cronos "
        "time. Where pyscnn hit its cap its objective is a stalled baseline: the row says so and counts no win. "
        "'met its tol': pyscnn stopped on its own test (not the cap); cronos's relative residuals reached tol. "
        "Duality gap: (objective - certified dual bound) / objective of cronos's final iterate "
        "(`SolveResult.duality_gap`; the best bound over the iterations at the u-step's dual point, in the solve's "
        "dtype: it closes as ADMM converges at a small rho, and float32 rounding limits it on rows sharing a large "
        "mean). Certified gap: "
        "(objective - L) / objective of each solver's final iterate, objectives by the float64 evaluator, with "
        "L the larger of `cronos.certified_lower_bound` at the two final iterates (float64, cone multipliers refined "
        "by 200 FISTA steps; a lower bound on the optimum by weak duality, needing no reference solver); the "
        "seconds are the certificate's cost at cronos's iterate.",
        "",
        *_table(rows),
    ]
    report.write_markdown(_OUTPUT.value, "\n".join(lines))
    if runtime.is_writer():
        _plot(rows, _PLOT.value)


if __name__ == "__main__":
    app.run(main)
