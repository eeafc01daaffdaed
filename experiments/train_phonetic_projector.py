"""Trains the phonetic projection head (SupCon) on span features of the training sources.

    python -m experiments.train_phonetic_projector --flagfile=experiments/configs/phone_clusters_espeak.flags

Spans of `--heldout_sources` are never used. Writes `--output_dir`/projector (safe head format),
`train_info.json` (losses, steps/s) and orbax checkpoints in `--output_dir`/checkpoints (resumable).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from encoders import phone_spans, runtime
from experiments.lib import report, runtime_flags
from heads import supcon

_MANIFEST = flags.DEFINE_string("manifest", "outputs/phone_corpus/manifest.jsonl", "Phone-span JSONL manifest.")
_ENCODER = flags.DEFINE_string("encoder", "random:small", "wav2vec2 checkpoint (dir / Hub id) or random:small.")
_LAYER = flags.DEFINE_integer("layer", 15, "Transformer layer whose output is span-pooled.")
_HELDOUT = flags.DEFINE_list("heldout_sources", [], "Sources (languages) never trained on.")
_CACHE = flags.DEFINE_string("cache_dir", "outputs/embeddings", "Span-feature cache.")
_OUTPUT = flags.DEFINE_string("output_dir", "outputs/phonetic_projector", "Output directory.")
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "Projector hidden width.")
_OUT_DIM = flags.DEFINE_integer("out_dim", 256, "Projection dimension.")
_STEPS = flags.DEFINE_integer("steps", 5000, "Adam steps.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
_CLASSES = flags.DEFINE_integer("classes_per_batch", 32, "Classes per batch.")
_INSTANCES = flags.DEFINE_integer("instances_per_class", 8, "Spans per class per batch.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.07, "SupCon temperature.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the encoder (random:small); eval_phone_clusters' --seed must match.")
_TRAIN_SEED = flags.DEFINE_integer("train_seed", 0, "Seed of the projector's initialisation, batches and dropout.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints.")


def main(argv):
    del argv
    mesh = runtime_flags.init()
    features, labels, sources, identity = phone_spans.manifest_features(_MANIFEST.value, _ENCODER.value, _LAYER.value,
                                                                        _CACHE.value, seed=_SEED.value, mesh=mesh)
    train = ~phone_spans.split_by_source(sources, _HELDOUT.value)
    params, info = supcon.train_projector(
        features[train], labels[train], hidden=_HIDDEN.value, out_dim=_OUT_DIM.value, learning_rate=_LR.value,
        steps=_STEPS.value, classes_per_batch=_CLASSES.value, instances_per_class=_INSTANCES.value,
        temperature=_TEMPERATURE.value, seed=_TRAIN_SEED.value, checkpoint_every=_CHECKPOINT_EVERY.value,
        checkpoint_dir=os.path.join(_OUTPUT.value, "checkpoints"), mesh=mesh)
    if not runtime.is_writer():
        return
    supcon.save_projector(os.path.join(_OUTPUT.value, "projector"), params,
                          {"encoder": identity, "train_sources": sorted(set(sources[train])),
                           "hyperparameters": info["config"]})
    info.update(encoder=identity, train_spans=int(train.sum()), train_classes=int(len(set(labels[train]))),
                steps_per_second=info["steps_run"] / max(info["seconds"], 1e-9))
    report.atomic_write_text(os.path.join(_OUTPUT.value, "train_info.json"), json.dumps(info, indent=1))
    print(f"trained {info['steps_run']} steps on {info['train_spans']} spans / {info['train_classes']} classes; "
          f"loss {np.mean(info['losses'][:50]) if info['losses'] else float('nan'):.3f} -> "
          f"{np.mean(info['losses'][-50:]) if info['losses'] else float('nan'):.3f}")


if __name__ == "__main__":
    app.run(main)
