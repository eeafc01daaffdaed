"""Phone-clustering evaluation on held-out sources: K-means of frozen span features vs projected ones.

    python -m experiments.eval_phone_clusters --flagfile=experiments/configs/eval_phone_clusters.flags

For each K: PNMI, phone purity, cluster purity and rare-phone tail purity of K-means clusters of the
baseline (frozen encoder layer) and of the projector's output, on spans of `--heldout_sources` only.
`--projectors` are saved projector directories or released `mlp_head.pt` files (needs torch), e.g. one
per training seed; K-means runs with every `--kmeans_seeds` seed, and every cell is a mean with its
spread. Writes the table in the published format (plus the other metrics and the held-out spans per
cluster each K leaves) to `--results_md` and JSON next to it.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags
from tqdm import tqdm

from encoders import phone_spans, runtime
from experiments.lib import report, runtime_flags
from heads import clustering, supcon

_MANIFEST = flags.DEFINE_string("manifest", "outputs/phone_corpus/manifest.jsonl", "Phone-span JSONL manifest.")
_ENCODER = flags.DEFINE_string("encoder", "random:small", "wav2vec2 checkpoint (dir / Hub id) or random:small.")
_LAYER = flags.DEFINE_integer("layer", 15, "Transformer layer whose output is span-pooled.")
_HELDOUT = flags.DEFINE_list("heldout_sources", [], "Evaluation sources (never trained on).")
_CACHE = flags.DEFINE_string("cache_dir", "outputs/embeddings", "Span-feature cache.")
_PROJECTORS = flags.DEFINE_list("projectors", ["outputs/phonetic_projector/projector"],
                                "Projector dirs or mlp_head.pt files, e.g. one per training seed.")
_KS = flags.DEFINE_list("ks", ["50", "100", "200", "500"], "Numbers of clusters.")
_N_INIT = flags.DEFINE_integer("n_init", 5, "K-means restarts.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the encoder (random:small).")
_KMEANS_SEEDS = flags.DEFINE_list("kmeans_seeds", ["0", "1", "2"], "K-means seeds (at least 3: results get a spread).")
_TAIL = flags.DEFINE_float("tail_fraction", 0.2, "Rare-phone tail: this fraction of the least frequent phones.")
_RESULTS = flags.DEFINE_string("results_md", "outputs/phone_clusters.md", "Markdown table output.")

METRICS = ("pnmi", "phone_purity", "cluster_purity", "rare_purity")


def scores(features, labels, k: int, seed: int, n_init: int, mesh=None) -> dict:
    """K-means of `features` (rows over `mesh`) scored against `labels`."""
    km = clustering.kmeans(features, k=k, seed=seed, n_init=n_init, mesh=mesh)
    return dict(pnmi=clustering.pnmi(labels, km.assignments), phone_purity=clustering.phone_purity(labels, km.assignments),
                cluster_purity=clustering.cluster_purity(labels, km.assignments),
                rare_purity=clustering.rare_phone_purity(labels, km.assignments, _TAIL.value), inertia=km.inertia)


def summary(values) -> dict:
    """mean, sample std, min and max of a list of numbers."""
    v = np.asarray(values, np.float64)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, min=float(v.min()),
                max=float(v.max()), n=len(v))


def aggregate(runs: list[dict]) -> dict:
    """Per metric: baseline over K-means seeds, projected over projectors x seeds, and the per-run difference
    projected - baseline (same K-means seed)."""
    baseline = {r["seed"]: r["scores"] for r in runs if r["projector"] is None}
    projected = [r for r in runs if r["projector"] is not None]
    return {m: dict(baseline=summary([b[m] for b in baseline.values()]),
                    projected=summary([r["scores"][m] for r in projected]),
                    delta=summary([r["scores"][m] - baseline[r["seed"]][m] for r in projected])) for m in METRICS}


def _cell(s: dict, signed: bool = False) -> str:
    fmt = "{:+.4f}" if signed else "{:.4f}"
    return f"{fmt.format(s['mean'])} ± {s['std']:.4f} ({fmt.format(s['min'])} to {fmt.format(s['max'])})"


def table(rows: list[dict], meta: dict) -> str:
    """Markdown: the published table's columns (mean ± std, min to max over seeds), spans per cluster, then cluster
    and rare-tail purity."""
    lines = ["# Phone clustering on held-out sources\n", *(f"- {k}: {v}" for k, v in meta.items()), "",
             "Every cell: mean ± sample std (min to max); baseline over the K-means seeds, projected and Δ over "
             "projectors x K-means seeds (Δ = projected - baseline with the same K-means seed).", "",
             "| K | held-out spans per cluster | baseline PNMI | projected PNMI | ΔPNMI | baseline purity | "
             "projected purity | Δpurity |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["summary"]
        lines.append(f"| {r['k']} | {r['spans_per_cluster']:.1f} | {_cell(a['pnmi']['baseline'])} | "
                     f"{_cell(a['pnmi']['projected'])} | {_cell(a['pnmi']['delta'], True)} | "
                     f"{_cell(a['phone_purity']['baseline'])} | {_cell(a['phone_purity']['projected'])} | "
                     f"{_cell(a['phone_purity']['delta'], True)} |")
    lines += ["", "Purity above is phone purity E_cluster[max_phone p(phone | cluster)]. With few spans per "
              "cluster every purity rises towards 1 whatever the features (K = number of spans gives purity 1), so "
              "compare rows of equal K only, and read the large-K rows with that in mind. Also:", "",
              "| K | baseline cluster purity | projected cluster purity | baseline rare-tail purity | "
              "projected rare-tail purity |", "|---|---|---|---|---|"]
    for r in rows:
        a = r["summary"]
        lines.append(f"| {r['k']} | {_cell(a['cluster_purity']['baseline'])} | {_cell(a['cluster_purity']['projected'])} | "
                     f"{_cell(a['rare_purity']['baseline'])} | {_cell(a['rare_purity']['projected'])} |")
    return "\n".join(lines) + "\n"


def load_projectors(paths: list[str], heldout: list[str]) -> list[tuple[str, dict, dict]]:
    """(path, params, metadata) of each projector; refuses one trained on a held-out source."""
    out = []
    for path in paths:
        params, meta = supcon.from_torch_checkpoint(path) if path.endswith(".pt") else supcon.load_projector(path)
        overlap = set(meta.get("train_sources", [])) & set(heldout)
        if overlap:
            raise ValueError(f"projector {path} was trained on held-out sources {sorted(overlap)}.")
        out.append((path, params, meta))
    return out


def main(argv):
    del argv
    mesh = runtime_flags.init()
    report.run_facts()  # the machine line of the stamp, GEMM rate measured before the work starts
    seeds = [int(s) for s in _KMEANS_SEEDS.value]
    if len(seeds) < 3 or len(set(seeds)) != len(seeds):
        raise app.UsageError(f"--kmeans_seeds needs at least 3 distinct seeds, got {_KMEANS_SEEDS.value}")
    features, labels, sources, identity = phone_spans.manifest_features(_MANIFEST.value, _ENCODER.value, _LAYER.value,
                                                                        _CACHE.value, seed=_SEED.value, mesh=mesh)
    test = phone_spans.split_by_source(sources, _HELDOUT.value)
    x, y = features[test], labels[test]
    projectors = load_projectors(_PROJECTORS.value, _HELDOUT.value)
    projected = [(path, np.asarray(supcon.project(params, x))) for path, params, _ in projectors]
    start, rows = time.perf_counter(), []
    skipped = [k for k in map(int, _KS.value) if k >= len(y)]
    ks = [k for k in map(int, _KS.value) if k not in skipped]
    with tqdm(total=len(ks) * len(seeds) * (1 + len(projected)), desc="k-means", unit="fit",
              disable=not runtime.is_writer()) as bar:
        for k in ks:
            runs = []
            for seed in seeds:
                for path, feats in [(None, x)] + projected:
                    runs.append(dict(projector=path, seed=seed, scores=scores(feats, y, k, seed, _N_INIT.value, mesh)))
                    bar.update()
            rows.append(dict(k=k, spans_per_cluster=len(y) / k, runs=runs, summary=aggregate(runs)))
    train_sources = sorted({s for _, _, meta in projectors for s in meta.get("train_sources", ["?"])})
    meta = {"encoder": identity, "held-out sources": ", ".join(_HELDOUT.value), "held-out spans": len(y),
            "phone labels": len(set(y)), "projectors": ", ".join(_PROJECTORS.value),
            "projector train seeds": ", ".join(str(m.get("hyperparameters", {}).get("seed", "?")) for _, _, m in projectors),
            "projector train sources": ", ".join(train_sources),
            "K-means": f"k-means++ x {_N_INIT.value} restarts, seeds {', '.join(map(str, seeds))}",
            "rare tail": f"{_TAIL.value:.0%} least frequent phones", "seconds": round(time.perf_counter() - start, 1),
            "skipped K (not below the number of held-out spans)": ", ".join(map(str, skipped)) or "none"}
    if not runtime.is_writer():
        return
    report.write_markdown(_RESULTS.value, table(rows, meta))
    report.atomic_write_text(os.path.splitext(_RESULTS.value)[0] + ".json",
                             json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows, meta))


if __name__ == "__main__":
    app.run(main)
