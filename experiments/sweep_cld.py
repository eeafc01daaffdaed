"""Low-resource sweep: train_cld at several samples-per-class values, then a table and a PNG plot.

    python -m experiments.sweep_cld --flagfile=experiments/configs/demo.flags --sweep_samples_per_class=5,10,20,40

Takes every `train_cld` flag; embeddings are cached, so the encoder runs once for all sweep points.
Writes OUTPUT_DIR/spc_K/ per point, OUTPUT_DIR/sweep.json, OUTPUT_DIR/sweep.md and OUTPUT_DIR/sweep.png.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import cld, train_cld  # noqa: E402  (train_cld defines the shared flags)

_SWEEP = flags.DEFINE_list("sweep_samples_per_class", ["100", "500", "1000", "10000"], "Training clips per language.")


def plot(points: list[dict], path: str, title: str) -> None:
    """Detection accuracy (test and validation peak) against samples per class, log-scaled x."""
    xs = [p["samples_per_class"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [p["test_accuracy"] for p in points], "o-", label="test")
    ax.plot(xs, [p["validation_peak"] for p in points], "s--", label="validation (peak)")
    ax.set_xscale("log")
    ax.set_xlabel("training clips per language")
    ax.set_ylabel("language-detection accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    base = train_cld.config_from_flags()
    output = train_cld._OUTPUT.value
    points = []
    for value in sorted(int(v) for v in _SWEEP.value):
        metrics = cld.run({**base, "samples_per_class": value}, os.path.join(output, f"spc_{value}"),
                                train_cld._CACHE.value)
        points.append({"samples_per_class": value, "test_accuracy": metrics["test"]["accuracy"],
                       "validation_peak": metrics["validation_peak"], "n_train": metrics["n_train"],
                       "train_seconds": metrics["train_compile_seconds"] + metrics["train_run_seconds"]})
        print(f"samples/class {value}: test accuracy {metrics['test']['accuracy']:.4f}", flush=True)
    with open(os.path.join(output, "sweep.json"), "w") as f:
        json.dump({"config": base, "points": points}, f, indent=2)
    rows = ["| Samples per class | Train clips | Test accuracy | Validation peak | Train time (s) |", "|---|---|---|---|---|"]
    rows += [f"| {p['samples_per_class']} | {p['n_train']} | {p['test_accuracy']:.4f} | {p['validation_peak']:.4f} "
             f"| {p['train_seconds']:.2f} |" for p in points]
    with open(os.path.join(output, "sweep.md"), "w") as f:
        f.write(f"# Sweep: {base['head']} head, {base['encoder']}, {', '.join(base['languages'])}\n\n" + "\n".join(rows) + "\n")
    plot(points, os.path.join(output, "sweep.png"), f"{base['head']} head on {base['encoder']}")
    print(f"wrote {output}/sweep.md and sweep.png")


if __name__ == "__main__":
    app.run(main)
