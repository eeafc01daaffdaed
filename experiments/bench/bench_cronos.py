"""Benchmark cronos against jaxcld 0.2.4 and an optax-Adam-trained ReLU MLP; writes a markdown report.

    pip install --no-deps jaxcld==0.2.4             # the published reference solver (pure JAX)
    python -m experiments.bench.bench_cronos --flagfile=experiments/configs/bench_cronos.flags          # jaxcld, adam

The comparison with pyscnn is `experiments/bench_cronos_grid.py` (a regime grid). Sections (`--sections`,
any of jaxcld, adam):

  * jaxcld: cronos vs jaxcld 0.2.4, both at the published fixed settings (6 ADMM x 32 PCG), for the
    two-class sizes `--sizes`, and cronos's counted FLOPs against single-GEMM rates.
  * adam: time for an optax-Adam MLP to reach cronos's validation accuracy (sizes `--adam_sizes`).

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

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from experiments.bench.problems import make_data
from experiments.lib import report, runtime_flags

SECTIONS = ("jaxcld", "adam")
_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS),
                              "Report sections to run: jaxcld (fixed-settings table and FLOPs), adam.")
_SIZES = flags.DEFINE_list("sizes", ["200", "1000", "2000", "20000"], "Training-set sizes n.")
_DIM = flags.DEFINE_integer("dim", 768, "Feature dimension d.")
_PATTERNS = flags.DEFINE_integer("patterns", 64, "Activation patterns P (2P hidden units).")
_BETA = flags.DEFINE_float("beta", 1e-3, "Group-lasso strength.")
_JAXCLD = flags.DEFINE_bool("jaxcld", True, "Run the jaxcld 0.2.4 reference (pip install --no-deps jaxcld==0.2.4).")
_ADAM_SIZES = flags.DEFINE_list("adam_sizes", ["2000", "20000"], "Sizes for the Adam comparison.")
_ADAM_SECONDS = flags.DEFINE_float("adam_max_seconds", 600.0, "Cap on the Adam baseline's training time.")
_VAL = flags.DEFINE_integer("val_size", 2000, "Validation samples.")
_OUTPUT = flags.DEFINE_string("results_md", "experiments/results/bench_cronos.md", "Markdown table to write.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of the jaxcld comparison; the solvers' order alternates per round.")
_WORKER = flags.DEFINE_enum("worker", None, ["cronos", "jaxcld_mode", "jaxcld", "adam", "gemm"],
                            "Internal: run one solver.")
_DATA = flags.DEFINE_string("data", None, "Internal: npz with the problem.")
_RESULT = flags.DEFINE_string("result", None, "Internal: npz/json to write.")
_TARGET = flags.DEFINE_float("target_accuracy", 0.0, "Internal: Adam stops at this validation accuracy.")

RHO, RANK, ADMM_ITERS, PCG_ITERS, GAMMA = 0.1, 20, 6, 32, 1.0  # the published CLD settings


# ------------------------------------------------------------------------------------------------ workers


def _worker_cronos(data, out, jaxcld_mode: bool):
    """cronos at the published settings: fixed mode (`ADMMConfig`, with its counted FLOPs) or the
    jaxcld-compatible mode (`JaxcldConfig`, with jaxcld's seed)."""
    import jax

    import cronos
    start = time.perf_counter()
    problem = cronos.ConvexReLU(data["X"], data["y"], patterns=data["D"], beta=float(data["beta"]))
    if jaxcld_mode:
        config = cronos.JaxcldConfig(rank=RANK, admm_iters=ADMM_ITERS, pcg_iters=PCG_ITERS, rho=RHO, gamma=GAMMA)
        key = jax.random.PRNGKey(0)
    else:
        config = cronos.ADMMConfig(rho=RHO, rank=RANK, admm_iters=ADMM_ITERS, pcg_iters=PCG_ITERS, gamma=GAMMA)
        key = jax.random.key(0)
    result = cronos.solve(problem, config, key=key)
    wall = time.perf_counter() - start
    accuracy = float(np.mean(np.asarray(result.predict(data["Xval"])) == data["yval"]))
    extra = {} if jaxcld_mode else {"flops": result.flops["total"], "pcg": result.history["pcg_iterations"]}
    np.savez(out, v=np.asarray(result.v), w=np.asarray(result.w), wall=wall, compile=result.compile_seconds,
             run=result.run_seconds, val_accuracy=accuracy, **extra)


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
    command = [sys.executable, "-m", "experiments.bench.bench_cronos", f"--worker={worker}", f"--result={result_path}"]
    if data_path:
        command.append(f"--data={data_path}")
    out = subprocess.run(command + list(extra), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {worker} failed:\n{out.stderr[-4000:]}")


def main(argv):
    runtime_flags.init()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKER.value:
        data = None if _DATA.value is None else np.load(_DATA.value)
        if _WORKER.value in ("cronos", "jaxcld_mode"):
            _worker_cronos(data, _RESULT.value, jaxcld_mode=_WORKER.value == "jaxcld_mode")
        elif _WORKER.value == "jaxcld":
            _worker_jaxcld(data, _RESULT.value)
        elif _WORKER.value == "adam":
            _worker_adam(data, _RESULT.value, _TARGET.value, _ADAM_SECONDS.value)
        else:
            _worker_gemm(_RESULT.value, [int(s) for s in _SIZES.value], _DIM.value, 2 * _PATTERNS.value)
        return

    sections = [s.strip() for s in _SECTIONS.value]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise app.UsageError(f"unknown --sections {unknown}; choose from {list(SECTIONS)}")
    report.run_facts()  # the machine line of the stamp, GEMM rate measured before the work starts
    load_before = os.getloadavg()
    rows, adam_rows, gemm = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        if "jaxcld" in sections or "adam" in sections:
            rows, adam_rows, gemm = _run_fixed(tmp, sections)
    load_after = os.getloadavg()
    _write_report(sections, rows, adam_rows, gemm, load_before, load_after)


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
        solvers = ["cronos"] + (["jaxcld_mode", "jaxcld"] if _JAXCLD.value and "jaxcld" in sections else [])
        runs = {name: [] for name in solvers}
        for round_index in range(_ROUNDS.value if "jaxcld" in sections else 1):
            for name in solvers if round_index % 2 == 0 else solvers[::-1]:
                path = os.path.join(tmp, f"{name}_{n}_{round_index}.npz")
                _spawn(name, data_path, path)
                runs[name].append(dict(np.load(path)))
                print(f"n={n} round {round_index + 1}: {name} {float(runs[name][-1]['wall']):.2f}s", flush=True)
        ours = runs["cronos"][0]
        row = {"n": n, "rounds": len(runs["cronos"]), "cronos_walls": [float(r["wall"]) for r in runs["cronos"]],
               "cronos_compile": [float(r["compile"]) for r in runs["cronos"]],
               "cronos_run": float(ours["run"]), "cronos_objective": cronos.objective(problem, ours["v"], ours["w"]),
               "cronos_val": float(ours["val_accuracy"]), "flops": float(ours["flops"]),
               "pcg": int(ours["pcg"].sum())}
        row["cronos_wall"] = float(np.median(row["cronos_walls"]))
        if gemm is not None:
            row.update(gemm_solve=gemm[f"solve_{n}"], gemm_square=gemm["square_4096"])
        row["gflops"] = row["flops"] / row["cronos_run"] / 1e9
        if "jaxcld" in runs:
            ref, mode = runs["jaxcld"][0], runs["jaxcld_mode"][0]
            reference = np.concatenate([ref["v"], ref["w"]], axis=-1)
            reproduced = np.concatenate([mode["v"], mode["w"]], axis=-1)
            row.update(
                jaxcld_walls=[float(r["wall"]) for r in runs["jaxcld"]],
                mode_walls=[float(r["wall"]) for r in runs["jaxcld_mode"]],
                jaxcld_objective=cronos.objective(problem, ref["v"], ref["w"]), jaxcld_val=float(ref["val_accuracy"]),
                mode_objective=cronos.objective(problem, mode["v"], mode["w"]), mode_val=float(mode["val_accuracy"]),
                mode_difference=float(np.linalg.norm(reproduced - reference) / np.linalg.norm(reference)))
        print(f"n={n}: {json.dumps({k: v for k, v in row.items() if not isinstance(v, list)})}", flush=True)
        rows.append(row)
        if n in adam_sizes:
            adam_path = os.path.join(tmp, f"adam_{n}.json")
            _spawn("adam", data_path, adam_path, f"--target_accuracy={row['cronos_val']}",
                   f"--adam_max_seconds={_ADAM_SECONDS.value}")
            adam = json.load(open(adam_path))
            adam_rows.append({"n": n, "target": row["cronos_val"], "cronos_wall": row["cronos_wall"], **adam})
            print(f"n={n}: adam {adam}", flush=True)
    return rows, adam_rows, gemm


def _write_report(sections, rows, adam_rows, gemm, load_before, load_after):
    extras = ["float32"]
    lines = [
        "# cronos benchmark",
        "",
        f"Load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; {', '.join(extras)}.",
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
    while lines and lines[-1] == "":
        lines.pop()
    report.write_markdown(_OUTPUT.value, "\n".join(lines))


def _fixed_lines(rows):
    rounds = rows[0]["rounds"] if rows else 0
    lines = [
        "## cronos vs jaxcld 0.2.4",
        "",
        f"{rounds} rounds per size, each solver in a fresh process per round, the order of the three alternating "
        "from round to round; walls are median (min-max) over the rounds, speed-ups are ratios within a round, "
        "median (min-max). 'jaxcld mode' is `cronos.solve(problem, cronos.JaxcldConfig(...), key)`, which issues "
        "jaxcld's operations in jaxcld's order; 'difference' is ||(v, w) - jaxcld's|| / ||jaxcld's|| (round 1; "
        "every solver is deterministic; 0 means bit-for-bit equal). Objectives and validation accuracies are "
        "round 1's.",
        "",
        "| n | jaxcld wall (s) | cronos wall (s) | cronos compile (s) | speed-up | jaxcld mode wall (s) | jaxcld mode speed-up "
        "| jaxcld objective | cronos objective | jaxcld mode objective | jaxcld mode difference | jaxcld val acc | cronos val acc "
        "| jaxcld mode val acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "jaxcld_walls" in r:
            speed = [j / c for j, c in zip(r["jaxcld_walls"], r["cronos_walls"])]
            mode_speed = [j / m for j, m in zip(r["jaxcld_walls"], r["mode_walls"])]
            lines.append(
                f"| {r['n']} | {report.median_range(r['jaxcld_walls'])} | {report.median_range(r['cronos_walls'])} "
                f"| {report.median_range(r['cronos_compile'])} | {report.median_range(speed, 1)}x "
                f"| {report.median_range(r['mode_walls'])} | {report.median_range(mode_speed, 1)}x "
                f"| {r['jaxcld_objective']:.5g} | {r['cronos_objective']:.5g} | {r['mode_objective']:.5g} "
                f"| {r['mode_difference']:.1e} | {r['jaxcld_val']:.4f} | {r['cronos_val']:.4f} | {r['mode_val']:.4f} |")
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


if __name__ == "__main__":
    app.run(main)
