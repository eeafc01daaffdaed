"""CLD training library: encoder loading, data, heads, evaluation and model cards (no flags).

`experiments.train_cld` (one run), `experiments.sweep_cld` (low-resource sweep) and
`experiments.bench_heads` (head comparison) are thin absl binaries over these functions.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from experiments import cld_data, embeddings


def load_encoder(spec: str, seed: int = 0):
    """Builds the frozen encoder named by `spec`; returns (encoder, pooling, identity string).

    Whisper pools all 1500 frames (padding included, the CLD convention); wav2vec2/MMS pools real frames.
    """
    from flax import nnx

    from encoders import loading, wav2vec2, whisper

    if spec.startswith("random:"):
        size = spec.split(":", 1)[1].removeprefix("whisper-")
        if size not in whisper.WHISPER_SIZES:
            raise ValueError(f"unknown Whisper size {size!r} in --encoder={spec}; use one of {sorted(whisper.WHISPER_SIZES)}.")
        encoder = whisper.WhisperEncoder(whisper.WhisperConfig.preset(size), rngs=nnx.Rngs(seed))
        return encoder, "mean", f"random-init whisper-{size} (seed {seed})"
    model_type = loading.load_config(loading.resolve_model_dir(spec)).get("model_type", "")
    if model_type == "whisper":
        return whisper.WhisperEncoder.from_pretrained(spec), "mean", spec
    if model_type in ("wav2vec2", "wav2vec2-conformer", "hubert") or "mms" in spec:
        return wav2vec2.Wav2Vec2Encoder.from_pretrained(spec), "masked_mean", spec
    raise ValueError(f"--encoder={spec} has model_type {model_type!r}; expected a Whisper or wav2vec2 (MMS) checkpoint.")


def validate_languages(languages) -> list[str]:
    """Sorted, distinct ISO-639-1 codes; the label of a language is its index in this list."""
    codes = [code.strip() for code in languages]
    bad = [c for c in codes if len(c) != 2 or not c.isalpha() or not c.islower()]
    if bad:
        raise ValueError(f"--languages must be ISO-639-1 codes such as en, zh; got {bad}.")
    if len(set(codes)) != len(codes) or len(codes) < 2:
        raise ValueError(f"--languages needs at least two distinct codes; got {codes}.")
    return sorted(codes)


def evaluate(head, X: np.ndarray, langs: list[str], accents: list[str]) -> dict:
    """Detection accuracy overall, per language and per accent, and the confusion matrix (rows: truth)."""
    predicted = head.predict_languages(X)
    languages = list(head.languages)
    correct = np.array([p == t for p, t in zip(predicted, langs)])
    confusion = np.zeros((len(languages), len(languages)), int)
    for p, t in zip(predicted, langs):
        confusion[languages.index(t), languages.index(p)] += 1
    def grouped(keys):
        return {k: float(correct[[i for i, x in enumerate(keys) if x == k]].mean()) for k in sorted(set(keys))}
    return {"accuracy": float(correct.mean()), "n": len(langs), "per_language": grouped(langs),
            "per_accent": grouped(accents), "confusion_matrix": confusion.tolist(), "labels": languages}


def model_card(metrics: dict) -> str:
    """Markdown model card with the results table in the published CLD cards' layout."""
    cfg = metrics["config"]
    test = metrics["test"]
    lines = [
        f"# CLD head: {cfg['head']} on {metrics['encoder']}",
        "",
        f"Language-detection head for {', '.join(test['labels'])} on mean-pooled frozen encoder embeddings "
        f"({metrics['embedding_dim']}-d, pooling: {metrics['pooling']}). Labels in order: "
        + ", ".join(f"{i} → {lang}" for i, lang in enumerate(test["labels"])) + ".",
        "",
        "## Results",
        "",
        "| Samples per class | Test accuracy | Validation accuracy (peak) | Train time (s, compile + run) | XLA FLOPs |",
        "|---|---|---|---|---|",
        f"| {cfg['samples_per_class'] or 'all'} | {test['accuracy']:.4f} | {metrics['validation_peak']:.4f} "
        f"| {metrics['train_compile_seconds']:.2f} + {metrics['train_run_seconds']:.2f} | {metrics['train_flops']:.3g} |",
        "",
        *([f"Held-out accents (accent shift, {metrics['accent_shift']['n']} clips): accuracy "
            f"{metrics['accent_shift']['accuracy']:.4f} "
            f"({', '.join(f'{k} {v:.3f}' for k, v in metrics['accent_shift']['per_accent'].items())}).", ""]
          if "accent_shift" in metrics else []),
        "| Language | Test accuracy |",
        "|---|---|",
        *[f"| {lang} | {acc:.4f} |" for lang, acc in test["per_language"].items()],
        "",
        "| Accent | Test accuracy |",
        "|---|---|",
        *[f"| {acc_name} | {acc:.4f} |" for acc_name, acc in test["per_accent"].items()],
        "",
        "Confusion matrix (rows: true language, columns: predicted):",
        "",
        "| | " + " | ".join(test["labels"]) + " |",
        "|---|" + "---|" * len(test["labels"]),
        *[f"| {lang} | " + " | ".join(map(str, row)) + " |" for lang, row in zip(test["labels"], test["confusion_matrix"])],
        "",
        "## Training",
        "",
        f"Dataset: `{cfg['dataset']}` ({metrics['n_train']} train / {metrics['n_valid']} valid / {metrics['n_test']} test clips; "
        f"{metrics['skipped_corrupt']} corrupt files skipped). Hyper-parameters: "
        + ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()) if k not in ("dataset",)) + ".",
        "",
        "Load with `heads.ConvexReLUHead.load(path)` (or `NNHead` / `LinearHead` per `head.json`).",
    ]
    if metrics["encoder"].startswith("random-init"):
        lines += ["", "**Smoke configuration**: the encoder has random weights (pretrained weights cannot be fetched "
                      "here), so these numbers only show that the pipeline works end to end."]
    return "\n".join(lines) + "\n"


def make_mesh(data: int, model: int):
    """(data, model) device mesh; None when it would hold a single device (or data == 0)."""
    from encoders import sharding

    devices = jax.device_count() if data < 0 else data
    if data == 0 or devices * model <= 1:
        return None
    return sharding.create_mesh(devices, model)


def load_dataset(spec: str, languages: list[str]):
    """The embedded corpus, a manifest file, or a Hugging Face dataset directory, filtered to `languages`."""
    if spec == "embedded":
        return cld_data.load_manifest(cld_data.DEFAULT_CORPUS, languages=languages)
    if os.path.isfile(spec):
        return cld_data.load_manifest(spec, languages=languages)
    if os.path.isdir(spec):
        return cld_data.load_hf_dataset(spec, languages=languages)
    raise ValueError(f"--dataset={spec} is neither 'embedded', a manifest file nor a saved Hugging Face dataset directory.")


def fit_head(cfg: dict, X, y, Xval, yval, mesh, encoder_id: str, pooling: str, checkpoint_dir: str | None = None):
    """Trains the configured head on embeddings X with integer labels y (index into cfg['languages']).

    The NN head checkpoints to `checkpoint_dir` (orbax) and resumes from it after a kill.
    """
    from heads import ConvexReLUHead, LinearHead, NNHead

    common = dict(languages=cfg["languages"], encoder=encoder_id, pooling=pooling)
    if cfg["head"] == "cvx":
        return ConvexReLUHead.fit(
            X, y, n_patterns=cfg["neuron"], beta=cfg["beta"], rho=cfg["rho"], rank=cfg["rank"],
            admm_iters=cfg["admm_iters"], pcg_iters=cfg["pcg_iters"], gamma=cfg["gamma_ratio"], tol=cfg["tol"],
            seed=cfg["opt_seed"], mesh=mesh, validation=(Xval, yval), **common)
    if cfg["head"] == "nn":
        return NNHead.fit(X, y, epochs=cfg["nn_epochs"], seed=cfg["opt_seed"], checkpoint_dir=checkpoint_dir, **common)
    return LinearHead.fit(X, y, **common)


def run(cfg: dict, output_dir: str, cache_dir: str) -> dict:
    """One training run: data → embeddings → head → output_dir (head/, metrics.json, README.md)."""
    languages = cfg["languages"]
    dataset = load_dataset(cfg["dataset"], languages)
    train, valid, test = cld_data.split(dataset, data_seed=cfg["data_seed"])
    parts = {"train": train, "valid": valid, "test": test, "accent_shift": cld_data.heldout_accent_test(dataset)}
    for name in ("train", "valid", "test"):
        if not parts[name].examples:
            raise ValueError(f"the {name} split of {cfg['dataset']} is empty; the data needs clips in train, valid and test.")
    mesh = make_mesh(cfg["mesh_data"], cfg["mesh_model"])
    encoder, pooling, encoder_id = load_encoder(cfg["encoder"])
    embedded = {}
    for name, part in parts.items():
        if not part.examples:
            continue
        X, _ = embeddings.extract(encoder, part.examples, cache_dir=cache_dir, batch_size=cfg["batch_size"],
                                  pooling=pooling, mesh=mesh)
        embedded[name] = (np.asarray(X, np.float32), np.array([languages.index(e.lang) for e in part.examples], np.int32),
                          [e.lang for e in part.examples], [e.accent for e in part.examples])
    Xtr, ytr, _, _ = embedded["train"]
    if cfg["samples_per_class"]:  # select rows of the full train split, so its cached embeddings serve every sweep point
        kept = cld_data.subsample_per_class(train, samples_per_class=cfg["samples_per_class"], data_seed=cfg["data_seed"])
        row = {e.id: i for i, e in enumerate(train.examples)}
        rows = np.array([row[e.id] for e in kept.examples])
        Xtr, ytr = Xtr[rows], ytr[rows]
    Xva, yva, lva, ava = embedded["valid"]

    start = time.perf_counter()
    head = fit_head(cfg, Xtr, ytr, Xva, yva, mesh, encoder_id, pooling,
                    checkpoint_dir=os.path.abspath(os.path.join(output_dir, "nn_checkpoints")))
    wall = time.perf_counter() - start
    info = head.train_info
    valid_metrics = evaluate(head, Xva, lva, ava)
    metrics = {
        "config": cfg, "encoder": encoder_id, "pooling": pooling, "embedding_dim": int(Xtr.shape[1]),
        "n_train": len(ytr), "n_valid": len(yva), "n_test": len(embedded["test"][1]),
        "skipped_corrupt": len(dataset.stats.skipped_corrupt),
        "test": evaluate(head, *[embedded["test"][i] for i in (0, 2, 3)]), "valid": valid_metrics,
        # the convex head records every ADMM iteration's validation accuracy; other heads report the final one
        "validation_peak": float(max(info.get("val_accuracy_history") or [valid_metrics["accuracy"]])),
        "train_wall_seconds": wall, "train_compile_seconds": float(info.get("compile_seconds", 0.0)),
        "train_run_seconds": float(info.get("run_seconds", wall)), "train_flops": float(info.get("flops", float("nan"))),
        "devices": jax.device_count(), "backend": jax.default_backend(),
    }
    if "accent_shift" in embedded:
        metrics["accent_shift"] = evaluate(head, *[embedded["accent_shift"][i] for i in (0, 2, 3)])
    os.makedirs(output_dir, exist_ok=True)
    head.save(os.path.join(output_dir, "head"), metrics={k: metrics[k] for k in ("test", "validation_peak")})
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(model_card(metrics))
    logging.info("test accuracy %.4f (%d clips) -> %s", metrics["test"]["accuracy"], metrics["n_test"], output_dir)
    return metrics
