"""cronos on a real dataset that ships with scikit-learn: handwritten digits (1797 x 64, 10 classes).

    python -m experiments.cronos_demo --flagfile=experiments/configs/cronos_demo.flags

Trains the convex ReLU network twice (the published fixed-iteration CLD settings, then towards a
tolerance with at most 300 ADMM iterations),
reports held-out accuracy, compile and run time and XLA-counted FLOPs, and writes them as JSON.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import cronos
from encoders import runtime
from experiments.lib import runtime_flags
from experiments.lib.report import atomic_write_text

_PATTERNS = flags.DEFINE_integer("n_patterns", 64, "Activation patterns P (2P hidden units).")
_BETA = flags.DEFINE_float("beta", 1e-3, "Group-lasso strength.")
_RANK = flags.DEFINE_integer("rank", 20, "Nyström sketch rank.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split, the gates and the sketch.")
_OUTPUT = flags.DEFINE_string("results_json", "outputs/cronos_demo.json", "Where to write the metrics (JSON).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime_flags.init()
    compilation_cache = runtime_flags.enable_compilation_cache()  # compile_seconds below are cache loads on a warm cache
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=_SEED.value, stratify=y)
    scaler = StandardScaler().fit(Xtr)
    Xtr, Xte = scaler.transform(Xtr).astype(np.float32), scaler.transform(Xte).astype(np.float32)
    gate_key, sketch_key = jax.random.split(jax.random.key(_SEED.value))
    patterns = cronos.sample_patterns(gate_key, Xtr, _PATTERNS.value)
    problem = cronos.ConvexReLU(Xtr, ytr, patterns=patterns, beta=_BETA.value)
    runs = {
        "published fixed 6x32": cronos.ADMMConfig(rank=_RANK.value),
        "tolerance 1e-3, <=300": cronos.ADMMConfig(rank=_RANK.value, tol=1e-3, admm_iters=300, pcg_iters=50),
    }
    report = {"dataset": "sklearn digits", "n_train": len(ytr), "n_test": len(yte), "d": Xtr.shape[1],
              "classes": 10, "n_patterns": _PATTERNS.value, "beta": _BETA.value, "compilation_cache": compilation_cache,
              "runs": {}}
    print(f"digits: {len(ytr)} train / {len(yte)} test, d={Xtr.shape[1]}, 10 classes, P={_PATTERNS.value}")
    for name, config in runs.items():
        result = cronos.solve(problem, config, key=sketch_key, validation=(Xte, yte))
        accuracy = float(np.mean(np.asarray(result.predict(Xte)) == yte))
        flops = result.flops["total"]
        row = {"test_accuracy": accuracy, "objective": cronos.objective(problem, result.v, result.w),
               "admm_iterations": result.iterations, "converged": result.converged, "pcg_iterations": int(result.history["pcg_iterations"].sum()),
               "compile_seconds": result.compile_seconds, "run_seconds": result.run_seconds, "xla_flops": flops,
               "gflops_per_second": flops / result.run_seconds / 1e9}
        report["runs"][name] = row
        print(f"{name:22s} test accuracy {accuracy:.4f}  objective {row['objective']:.4f}  "
              f"ADMM {row['admm_iterations']:4d} (converged: {result.converged})  PCG {row['pcg_iterations']:5d}  "
              f"compile {row['compile_seconds']:.2f}s  run {row['run_seconds']:.3f}s  {flops / 1e9:.2f} GFLOP")
    if not runtime.is_writer():
        return
    atomic_write_text(_OUTPUT.value, json.dumps(report, indent=2))
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
