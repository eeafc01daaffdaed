"""K-means throughput (JAX vs scikit-learn) and SupCon training speed; writes a markdown table.

    python -m experiments.bench.bench_kmeans --flagfile=experiments/configs/bench_kmeans.flags

Same data (Gaussian blobs), same k, n_init and max_iter for both. JAX's first call compiles and is
reported on its own; then `--rounds` (>= 3) rounds, each running both implementations with that round's
seed, the order alternating round by round. Speed-ups are same-round ratios (median and min-max over
rounds), of the wall time and of the time per Lloyd iteration (the two converge in different numbers of
iterations from their own k-means++ draws).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from absl import app, flags
from sklearn.cluster import KMeans

from experiments.lib import report, runtime_flags
from heads import clustering, supcon

_N = flags.DEFINE_integer("n", 100_000, "Rows.")
_D = flags.DEFINE_integer("d", 256, "Dimension.")
_K = flags.DEFINE_integer("k", 100, "Clusters.")
_N_INIT = flags.DEFINE_integer("n_init", 1, "Restarts (both implementations).")
_MAX_ITER = flags.DEFINE_integer("max_iter", 50, "Lloyd iterations cap (both).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (at least 3), implementations alternating.")
_SUPCON_STEPS = flags.DEFINE_integer("supcon_steps", 1000, "SupCon steps timed (1024 -> 1024 -> 256, 32 x 8 batches).")
_OUT = flags.DEFINE_string("results_md", "experiments/results/bench_kmeans.md", "Markdown output.")

SUPCON_SHORT = 50  # steps of the short SupCon run whose time (compile included) is subtracted


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv):
    runtime_flags.init()
    del argv
    report.run_facts()  # the machine line of the stamp, GEMM rate measured before the work starts
    if _ROUNDS.value < 3:
        raise app.UsageError("--rounds must be at least 3")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((_K.value, _D.value)).astype(np.float32) * 2
    x = centres[rng.integers(0, _K.value, _N.value)] + rng.standard_normal((_N.value, _D.value)).astype(np.float32)
    kw = dict(k=_K.value, n_init=_N_INIT.value, max_iter=_MAX_ITER.value)
    first_call, _ = _timed(lambda: clustering.kmeans(x, seed=10_000, **kw))  # compiles, then runs once
    sides = {
        "ours": lambda seed: (lambda r: (r.n_iter, r.inertia))(clustering.kmeans(x, seed=seed, **kw)),
        "sklearn": lambda seed: (lambda r: (r.n_iter_, r.inertia_))(
            KMeans(n_clusters=_K.value, n_init=_N_INIT.value, max_iter=_MAX_ITER.value, random_state=seed).fit(x)),
    }
    runs = []
    for round_ in range(_ROUNDS.value):
        order = ["ours", "sklearn"] if round_ % 2 == 0 else ["sklearn", "ours"]
        for name in order:
            seconds, (iters, inertia) = _timed(lambda: sides[name](round_))
            runs.append(dict(round=round_, side=name, seconds=seconds, iters=int(iters), inertia=float(inertia)))
            print(runs[-1], flush=True)
    by = {(r["round"], r["side"]): r for r in runs}
    rounds = range(_ROUNDS.value)
    wall = [by[i, "sklearn"]["seconds"] / by[i, "ours"]["seconds"] for i in rounds]
    per_iter = [(by[i, "sklearn"]["seconds"] / by[i, "sklearn"]["iters"]) / (by[i, "ours"]["seconds"] / by[i, "ours"]["iters"])
                for i in rounds]
    inertia = [by[i, "ours"]["inertia"] / by[i, "sklearn"]["inertia"] for i in rounds]
    supcon_rates = []
    labels = rng.integers(0, 400, 20_000)
    feats = rng.standard_normal((20_000, 1024)).astype(np.float32)
    for _ in rounds:  # each call compiles its step once: the difference of a long and a short run cancels it
        short, _ = _timed(lambda: supcon.train_projector(feats, labels, steps=SUPCON_SHORT))
        long, _ = _timed(lambda: supcon.train_projector(feats, labels, steps=SUPCON_SHORT + _SUPCON_STEPS.value))
        supcon_rates.append(dict(short=short, long=long, steps_per_s=_SUPCON_STEPS.value / (long - short)))
    lines = [
        "# K-means and SupCon benchmark\n",
        f"- data: n={_N.value}, d={_D.value}, K={_K.value}, n_init={_N_INIT.value}, max_iter={_MAX_ITER.value}, "
        "Gaussian blobs, float32",
        f"- heads.clustering.kmeans first call (jit compilation + one run, not in the rounds): {first_call:.1f} s",
        f"- {_ROUNDS.value} rounds; round r runs both with seed r, the order alternating", "",
        "| implementation | seconds, median (min-max) | Lloyd iterations per round | s per iteration, median | "
        "rows x iterations / s, median | inertia, median |", "|---|---|---|---|---|---|",
    ]
    for name, label in (("ours", "heads.clustering.kmeans (JAX, jit, compiled)"), ("sklearn", "sklearn.cluster.KMeans (lloyd)")):
        mine = [r for r in runs if r["side"] == name]
        lines.append(f"| {label} | {report.median_range([r['seconds'] for r in mine])} | {', '.join(str(r['iters']) for r in mine)} | "
                     f"{statistics.median(r['seconds'] / r['iters'] for r in mine):.3f} | "
                     f"{statistics.median(_N.value * r['iters'] / r['seconds'] for r in mine):.3g} | "
                     f"{statistics.median(r['inertia'] for r in mine):.6g} |")
    verdict = lambda ratios: "faster" if statistics.median(ratios) > 1 else "slower"
    lines += [
        "", f"Per round, sklearn time / ours: wall clock {report.median_range(wall)} (ours {verdict(wall)}); per Lloyd iteration "
        f"{report.median_range(per_iter)} (ours {verdict(per_iter)}); inertia ours / sklearn {report.median_range(inertia, 4)}.", "",
        f"SupCon training (1024 -> 1024 -> 256, batches of 32 classes x 8 spans, Adam), compilation excluded: "
        f"({SUPCON_SHORT} + {_SUPCON_STEPS.value})-step run minus {SUPCON_SHORT}-step run, each compiling once: "
        f"{report.median_range([r['steps_per_s'] for r in supcon_rates], 1)} steps/s over {_ROUNDS.value} rounds "
        f"(the {SUPCON_SHORT}-step runs, compile included: {report.median_range([r['short'] for r in supcon_rates], 1)} s).",
    ]
    report.write_markdown(_OUT.value, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
