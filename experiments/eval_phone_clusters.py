"""Phone-clustering evaluation on held-out sources: K-means of frozen span features vs projected ones.

    python -m experiments.eval_phone_clusters --flagfile=experiments/configs/eval_phone_clusters.flags

For each K: PNMI, phone purity, cluster purity and rare-phone tail purity of K-means clusters of the
baseline (frozen encoder layer) and of the projector's output, on spans of `--heldout_sources` only.
`--projector` is a saved projector directory or a released `mlp_head.pt` (needs torch). Writes the
table in the published format (plus the other metrics) to `--results_md` and JSON next to it.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from experiments import phone_spans, report
from heads import clustering, supcon

_MANIFEST = flags.DEFINE_string("manifest", "outputs/phone_corpus/manifest.jsonl", "Phone-span JSONL manifest.")
_ENCODER = flags.DEFINE_string("encoder", "random:small", "wav2vec2 checkpoint (dir / Hub id) or random:small.")
_LAYER = flags.DEFINE_integer("layer", 15, "Transformer layer whose output is span-pooled.")
_HELDOUT = flags.DEFINE_list("heldout_sources", [], "Evaluation sources (never trained on).")
_CACHE = flags.DEFINE_string("cache_dir", "outputs/embeddings", "Span-feature cache.")
_PROJECTOR = flags.DEFINE_string("projector", "outputs/phonetic_projector/projector", "Projector dir or mlp_head.pt.")
_KS = flags.DEFINE_list("ks", ["50", "100", "200", "500"], "Numbers of clusters.")
_N_INIT = flags.DEFINE_integer("n_init", 5, "K-means restarts.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the encoder (random:small) and of K-means.")
_TAIL = flags.DEFINE_float("tail_fraction", 0.2, "Rare-phone tail: this fraction of the least frequent phones.")
_RESULTS = flags.DEFINE_string("results_md", "outputs/phone_clusters.md", "Markdown table output.")


def scores(features, labels, k: int, seed: int, n_init: int) -> dict:
    """K-means of `features` scored against `labels`."""
    km = clustering.kmeans(features, k=k, seed=seed, n_init=n_init)
    return dict(pnmi=clustering.pnmi(labels, km.assignments), phone_purity=clustering.phone_purity(labels, km.assignments),
                cluster_purity=clustering.cluster_purity(labels, km.assignments),
                rare_purity=clustering.rare_phone_purity(labels, km.assignments, _TAIL.value), inertia=km.inertia)


def table(rows: list[dict], meta: dict) -> str:
    """Markdown: the published table's columns, then cluster and rare-tail purity."""
    lines = ["# Phone clustering on held-out sources\n", *(f"- {k}: {v}" for k, v in meta.items()), "",
             "| K | baseline PNMI | projected PNMI | ΔPNMI | baseline purity | projected purity | Δpurity |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, p = r["baseline"], r["projected"]
        lines.append(f"| {r['k']} | {b['pnmi']:.4f} | {p['pnmi']:.4f} | {p['pnmi'] - b['pnmi']:+.4f} | "
                     f"{b['phone_purity']:.4f} | {p['phone_purity']:.4f} | {p['phone_purity'] - b['phone_purity']:+.4f} |")
    lines += ["", "Purity above is phone purity E_cluster[max_phone p(phone | cluster)]. Also:", "",
              "| K | baseline cluster purity | projected cluster purity | baseline rare-tail purity | projected rare-tail purity |",
              "|---|---|---|---|---|"]
    for r in rows:
        b, p = r["baseline"], r["projected"]
        lines.append(f"| {r['k']} | {b['cluster_purity']:.4f} | {p['cluster_purity']:.4f} | "
                     f"{b['rare_purity']:.4f} | {p['rare_purity']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    features, labels, sources, identity = phone_spans.manifest_features(_MANIFEST.value, _ENCODER.value, _LAYER.value,
                                                                        _CACHE.value, seed=_SEED.value)
    test = phone_spans.split_by_source(sources, _HELDOUT.value)
    x, y = features[test], labels[test]
    if _PROJECTOR.value.endswith(".pt"):
        params, projector_meta = supcon.from_torch_checkpoint(_PROJECTOR.value)
    else:
        params, projector_meta = supcon.load_projector(_PROJECTOR.value)
    overlap = set(projector_meta.get("train_sources", [])) & set(_HELDOUT.value)
    if overlap:
        raise ValueError(f"the projector was trained on held-out sources {sorted(overlap)}.")
    z = np.asarray(supcon.project(params, x))
    start, rows = time.perf_counter(), []
    skipped = [k for k in map(int, _KS.value) if k >= len(y)]
    for k in map(int, _KS.value):
        if k in skipped:
            continue
        rows.append(dict(k=k, baseline=scores(x, y, k, _SEED.value, _N_INIT.value),
                         projected=scores(z, y, k, _SEED.value, _N_INIT.value)))
    meta = {"encoder": identity, "held-out sources": ", ".join(_HELDOUT.value), "held-out spans": len(y),
            "phone labels": len(set(y)), "projector": _PROJECTOR.value,
            "projector train sources": ", ".join(projector_meta.get("train_sources", ["?"])),
            "K-means": f"k-means++ x {_N_INIT.value} restarts, seed {_SEED.value}",
            "rare tail": f"{_TAIL.value:.0%} least frequent phones", "seconds": round(time.perf_counter() - start, 1),
            "skipped K (not below the number of held-out spans)": ", ".join(map(str, skipped)) or "none"}
    report.write_markdown(_RESULTS.value, table(rows, meta))
    with open(os.path.splitext(_RESULTS.value)[0] + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(table(rows, meta))


if __name__ == "__main__":
    app.run(main)
