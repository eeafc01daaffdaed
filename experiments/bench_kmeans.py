"""K-means throughput (JAX vs scikit-learn) and SupCon training speed; writes a markdown table.

    python -m experiments.bench_kmeans --flagfile=experiments/configs/bench_kmeans.flags

Same data (Gaussian blobs), same k, n_init and max_iter for both; JAX times exclude compilation
(a first call compiles). The load average is recorded because the CPU may be shared.
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from experiments import report
from sklearn.cluster import KMeans

from heads import clustering, supcon

_N = flags.DEFINE_integer("n", 100_000, "Rows.")
_D = flags.DEFINE_integer("d", 256, "Dimension.")
_K = flags.DEFINE_integer("k", 100, "Clusters.")
_N_INIT = flags.DEFINE_integer("n_init", 1, "Restarts (both implementations).")
_MAX_ITER = flags.DEFINE_integer("max_iter", 50, "Lloyd iterations cap (both).")
_SUPCON_STEPS = flags.DEFINE_integer("supcon_steps", 1000, "SupCon steps timed (1024 -> 1024 -> 256, 32 x 8 batches).")
_OUT = flags.DEFINE_string("results_md", "experiments/results/bench_kmeans.md", "Markdown output.")


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((_K.value, _D.value)).astype(np.float32) * 2
    x = centres[rng.integers(0, _K.value, _N.value)] + rng.standard_normal((_N.value, _D.value)).astype(np.float32)
    kw = dict(k=_K.value, n_init=_N_INIT.value, max_iter=_MAX_ITER.value)
    load_before = os.getloadavg()
    start = time.perf_counter()
    clustering.kmeans(x, seed=1, **kw)  # compiles
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    ours = clustering.kmeans(x, seed=0, **kw)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = KMeans(n_clusters=_K.value, n_init=_N_INIT.value, max_iter=_MAX_ITER.value, random_state=0).fit(x)
    sk_s = time.perf_counter() - start
    labels = rng.integers(0, 400, 20_000)
    feats = rng.standard_normal((20_000, 1024)).astype(np.float32)
    _, info = supcon.train_projector(feats, labels, steps=_SUPCON_STEPS.value)
    load_after = os.getloadavg()
    lines = [
        "# K-means and SupCon benchmark\n",
        f"- machine: {report.machine()}; load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, "
        f"after {tuple(round(v, 2) for v in load_after)} (the CPU is shared with another developer)",
        f"- data: n={_N.value}, d={_D.value}, K={_K.value}, n_init={_N_INIT.value}, max_iter={_MAX_ITER.value}, "
        "Gaussian blobs, float32", "",
        "| implementation | seconds | rows x iterations / s | Lloyd iterations | inertia |", "|---|---|---|---|---|",
        f"| heads.clustering.kmeans (JAX, jit; first call incl. compile {compile_and_run:.1f} s) | {ours_s:.2f} | "
        f"{_N.value * ours.n_iter / ours_s:.3g} | {ours.n_iter} | {ours.inertia:.6g} |",
        f"| sklearn.cluster.KMeans (lloyd) | {sk_s:.2f} | {_N.value * ref.n_iter_ / sk_s:.3g} | {ref.n_iter_} | {ref.inertia_:.6g} |",
        "", f"Speed-up (wall clock): {sk_s / ours_s:.2f}x; inertia ratio ours / sklearn: {ours.inertia / ref.inertia_:.4f}.", "",
        f"SupCon training (1024 -> 1024 -> 256, batches of 32 classes x 8 spans, Adam): {info['steps_run']} steps in "
        f"{info['seconds']:.1f} s = {info['steps_run'] / info['seconds']:.1f} steps/s (including the first step's compilation).",
    ]
    report.write_markdown(_OUT.value, "\n".join(lines))


if __name__ == "__main__":
    app.run(main)
