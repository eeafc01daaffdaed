"""Low-resource sweep: train_cld at several clips-per-language values and data seeds; a table and a PNG plot.

    python -m experiments.sweep_cld --flagfile=experiments/configs/demo.flags \
        --sweep_samples_per_class=4,8,16,32,64,96 --sweep_data_seeds=0,1,2 --results_md=experiments/results/demo_sweep.md

Takes every `train_cld` flag; embeddings are cached per clip, so the encoder runs once for every point and
seed. Each seed re-draws the subsample (and the split, for data without a split column). Writes OUTPUT_DIR/spc_K_seed_S/ per
run, OUTPUT_DIR/sweep.json, and the table (`--results_md`, stamped) with the plot beside it (same name, .png):
mean and min-max over seeds of the head's test and held-out-accent accuracy, and Whisper's own detection
on the same test clips when the encoder is a pretrained Whisper.
"""

from __future__ import annotations

import io
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from encoders import runtime  # noqa: E402
from experiments import train_cld  # noqa: E402  (train_cld defines the run flags)
from experiments.lib import cld, report, runtime_flags  # noqa: E402

_SWEEP = flags.DEFINE_list("sweep_samples_per_class", ["4", "8", "16", "32", "64", "96"],
                           "Training clips per language; values above the available clips use all of them.")
_SEEDS = flags.DEFINE_list("sweep_data_seeds", ["0", "1", "2"], "Data seeds (split and subsample) per point.")
_RESULTS_MD = flags.DEFINE_string("results_md", None, "Markdown table to write (default OUTPUT_DIR/sweep.md); "
                                  "the PNG goes beside it.")

SERIES = (("test", "test"), ("accent_shift", "held-out accents"))


def summarise(runs: list[dict]) -> list[dict]:
    """Per samples-per-class point: mean, min and max over seeds of each accuracy series."""
    points = []
    for spc in sorted({r["samples_per_class"] for r in runs}):
        group = [r for r in runs if r["samples_per_class"] == spc]
        point = {"samples_per_class": spc, "n_train": [r["n_train"] for r in group], "seeds": len(group)}
        for key in {k for r in group for k in r["accuracy"]}:
            values = np.array([r["accuracy"][key] for r in group if key in r["accuracy"]])
            point[key] = dict(mean=float(values.mean()), min=float(values.min()), max=float(values.max()))
        points.append(point)
    return points


def plot(points: list[dict], path: str, title: str) -> None:
    """Accuracy against clips per language (log x), mean over seeds with min-max bars."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [p["samples_per_class"] for p in points]
    for key, label, style in (("test", "head, test", "o-"), ("accent_shift", "head, held-out accents", "s-"),
                              ("whisper_restricted_test", "Whisper restricted, test", "--"),
                              ("whisper_unrestricted_test", "Whisper unrestricted, test", ":")):
        if not all(key in p for p in points):
            continue
        mean = np.array([p[key]["mean"] for p in points])
        err = np.maximum(np.array([[p[key]["mean"] - p[key]["min"], p[key]["max"] - p[key]["mean"]]
                                   for p in points]).T, 0.0)  # equal seeds: round-off must not go negative
        ax.errorbar(xs, mean, yerr=err, fmt=style, capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training clips per language")
    ax.set_ylabel("language-detection accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    report.atomic_write_bytes(path, png.getvalue())


def table(points: list[dict], base: dict) -> str:
    """Markdown table of the summarised points."""
    fmt = lambda p, k: f"{p[k]['mean']:.3f} ({p[k]['min']:.3f}–{p[k]['max']:.3f})" if k in p else "—"
    lines = [f"# Low-resource sweep: {base['head']} head on {base['encoder']} ({', '.join(base['languages'])})", "",
             f"Machine: {report.machine()}.", "",
             "Detection accuracy, mean (min–max) over data seeds; each seed re-draws the per-language training "
             "subsample (and the train/valid/test split where the dataset has no split column). Whisper's own "
             "detection is scored on the same test clips.", "",
             "| clips per language | seeds | train clips | test | held-out accents | Whisper restricted (test) "
             "| Whisper unrestricted (test) |", "|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['samples_per_class']} | {p['seeds']} | {min(p['n_train'])}–{max(p['n_train'])} | "
                     f"{fmt(p, 'test')} | {fmt(p, 'accent_shift')} | {fmt(p, 'whisper_restricted_test')} | "
                     f"{fmt(p, 'whisper_unrestricted_test')} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    mesh = runtime_flags.init()
    report.run_facts()  # the machine line of the stamp, GEMM rate measured before the work starts
    base = train_cld.config_from_flags()
    output = train_cld._OUTPUT.value
    runs = []
    for spc in sorted(int(v) for v in _SWEEP.value):
        for seed in sorted(int(s) for s in _SEEDS.value):
            metrics = cld.run({**base, "samples_per_class": spc, "data_seed": seed},
                              os.path.join(output, f"spc_{spc}_seed_{seed}"), train_cld._CACHE.value, mesh)
            accuracy = {name: metrics[name]["accuracy"] for name, _ in SERIES if name in metrics}
            for mode, modes in metrics.get("whisper_detection", {}).get("test", {}).items():
                accuracy[f"whisper_{mode}_test"] = modes["accuracy"]
            runs.append({"samples_per_class": spc, "data_seed": seed, "n_train": metrics["n_train"], "accuracy": accuracy})
            if runtime.is_writer():
                print(f"clips/language {spc}, seed {seed}: test accuracy {accuracy['test']:.4f}", flush=True)
    points = summarise(runs)
    if not runtime.is_writer():
        return
    report.atomic_write_text(os.path.join(output, "sweep.json"), json.dumps({"config": base, "runs": runs,
                                                                            "points": points}, indent=2))
    md = _RESULTS_MD.value or os.path.join(output, "sweep.md")
    png = os.path.splitext(md)[0] + ".png"
    plot(points, png, f"{base['head']} head on {base['encoder']}")
    report.write_markdown(md, table(points, base) + f"\n![sweep]({os.path.basename(png)})\n")


if __name__ == "__main__":
    app.run(main)
