"""CLD training library: encoder loading, data, heads, evaluation and model cards (no flags).

`experiments.train_cld` (one run), `experiments.sweep_cld` (low-resource sweep) and
`experiments.bench.bench_heads` (head comparison) are thin absl binaries over these functions.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from encoders import extraction, input_pipeline, runtime
from experiments.lib import report

# The shipped espeak-ng corpus (`--dataset=embedded`): data beside the binaries, never inside a package.
EMBEDDED_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tts_corpus",
                               "manifest.jsonl")


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


def load_detector(spec: str):
    """(decoder, special tokens) of a pretrained multilingual Whisper `spec` for its own language detection,
    or None (random or non-Whisper encoders, English-only checkpoints)."""
    from asr.whisper_decoder import WhisperDecoder
    from asr.whisper_pipeline import WhisperTokens
    from encoders import loading

    if spec.startswith("random:"):
        return None
    model_dir = loading.resolve_model_dir(spec)
    generation_path = os.path.join(model_dir, "generation_config.json")
    if loading.load_config(model_dir).get("model_type") != "whisper" or not os.path.exists(generation_path):
        return None
    with open(generation_path) as f:
        generation = json.load(f)
    if not generation.get("is_multilingual", "lang_to_id" in generation) or "lang_to_id" not in generation:
        return None
    decoder = WhisperDecoder.from_pretrained(model_dir)
    return decoder, WhisperTokens(generation, None, decoder.config.vocab_size)  # ids only: no text is decoded


def score_predictions(predicted: list[str], langs: list[str], accents: list[str], labels: list[str]) -> dict:
    """Accuracy overall, per language and per accent, the confusion matrix over `labels` (rows: truth) and
    the counts of predictions outside `labels` (an unrestricted detector can answer any language)."""
    correct = np.array([p == t for p, t in zip(predicted, langs)])
    confusion = np.zeros((len(labels), len(labels)), int)
    outside: dict[str, int] = {}
    for p, t in zip(predicted, langs):
        if p in labels:
            confusion[labels.index(t), labels.index(p)] += 1
        else:
            outside[p] = outside.get(p, 0) + 1

    def grouped(keys):
        return {k: float(correct[[i for i, x in enumerate(keys) if x == k]].mean()) for k in sorted(set(keys))}
    return {"accuracy": float(correct.mean()), "n": len(langs), "per_language": grouped(langs),
            "per_accent": grouped(accents), "confusion_matrix": confusion.tolist(), "labels": list(labels),
            "predicted_outside_labels": dict(sorted(outside.items(), key=lambda kv: -kv[1]))}


def evaluate(head, X: np.ndarray, langs: list[str], accents: list[str]) -> dict:
    """`score_predictions` of a head's predictions on embeddings X."""
    return score_predictions(head.predict_languages(X), langs, accents, list(head.languages))


def whisper_detection(lang_logprobs: np.ndarray, codes: list[str], restrict_to: list[str] | None) -> list[str]:
    """Whisper's own language choice per clip from its language-token log-probabilities over `codes`,
    over every language it knows (`restrict_to=None`) or only over `restrict_to`."""
    allowed = np.array([restrict_to is None or c in restrict_to for c in codes])
    return [codes[i] for i in np.where(allowed, lang_logprobs, -np.inf).argmax(1)]


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
        *(["Language detection on the same clips: this head against Whisper's own (its language token after "
           "`<|startoftranscript|>`, over all its languages or restricted to the head's):", "",
           "| Detector | Test accuracy | Held-out accents |", "|---|---|---|",
           f"| {cfg['head']} head | {test['accuracy']:.4f} | "
           f"{metrics['accent_shift']['accuracy'] if 'accent_shift' in metrics else float('nan'):.4f} |",
           *[f"| Whisper, {mode} | {metrics['whisper_detection']['test'][mode]['accuracy']:.4f} | "
             f"{metrics['whisper_detection'].get('accent_shift', {}).get(mode, {}).get('accuracy', float('nan')):.4f} |"
             for mode in ("unrestricted", "restricted")], ""]
          if "whisper_detection" in metrics else []),
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


def summary(metrics: dict) -> str:
    """One line: the head's detection accuracy (and Whisper's own, when measured) on test and held-out accents."""
    def accuracy(name):
        m = metrics[name]
        return f"{m['accuracy']:.3f} on {m['n']} clips"

    parts = [f"{metrics['config']['head']} head: test {accuracy('test')} "
             f"({', '.join(f'{k} {v:.2f}' for k, v in metrics['test']['per_language'].items())})"]
    if "accent_shift" in metrics:
        parts.append(f"held-out accents {accuracy('accent_shift')}")
    for name, modes in metrics.get("whisper_detection", {}).items():
        parts.append(f"Whisper's own detection on {name.replace('_', ' ')}: {modes['unrestricted']['accuracy']:.3f} "
                     f"unrestricted, {modes['restricted']['accuracy']:.3f} restricted to the head's languages")
    parts.append(f"head trained in {metrics['train_compile_seconds']:.2f} s compile + "
                 f"{metrics['train_run_seconds']:.2f} s run")
    return "; ".join(parts)


def load_dataset(spec: str, languages: list[str]):
    """The embedded corpus, a manifest file, or a Hugging Face dataset directory, filtered to `languages`."""
    if spec == "embedded":
        return input_pipeline.load_manifest(EMBEDDED_CORPUS, languages=languages)
    if os.path.isfile(spec):
        return input_pipeline.load_manifest(spec, languages=languages)
    if os.path.isdir(spec):
        return input_pipeline.load_hf_dataset(spec, languages=languages)
    raise ValueError(f"--dataset={spec} is neither 'embedded', a manifest file nor a saved Hugging Face dataset directory.")


def fit_head(cfg: dict, X, y, Xval, yval, mesh, encoder_id: str, pooling: str, checkpoint_dir: str | None = None):
    """Trains the configured head on embeddings X with integer labels y (index into cfg['languages']).

    The NN head checkpoints to `checkpoint_dir` (orbax) and resumes from it after a kill.
    """
    from heads import ConvexReLUHead, LinearHead, NNHead

    common = dict(languages=cfg["languages"], encoder=encoder_id, pooling=pooling, input_norm=cfg.get("input_norm", "none"))
    if cfg["head"] == "cvx":
        return ConvexReLUHead.fit(
            X, y, n_patterns=cfg["neuron"], beta=cfg["beta"], rho=cfg["rho"], rank=cfg["rank"],
            admm_iters=cfg["admm_iters"], pcg_iters=cfg["pcg_iters"], gamma=cfg["gamma_ratio"], tol=cfg["tol"],
            seed=cfg["opt_seed"], mesh=mesh, validation=(Xval, yval), **common)
    if cfg["head"] == "nn":
        return NNHead.fit(X, y, epochs=cfg["nn_epochs"], seed=cfg["opt_seed"], checkpoint_dir=checkpoint_dir, mesh=mesh,
                          **common)
    return LinearHead.fit(X, y, **common)


def embed_dataset(cfg: dict, examples: list, cache_dir: str, mesh) -> tuple[dict, str, str, list[str] | None]:
    """Pooled embeddings of `examples` (cached per clip, so every split, seed and subset reuses rows) ->
    ({"X": (n, d), "lang_logprobs"?: (n, L)}, pooling, encoder id, Whisper's language codes or None).
    A pretrained multilingual Whisper runs once per clip for both poolings and its own language detection;
    other encoders pool as `extract` does."""
    encoder, default_pooling, encoder_id = load_encoder(cfg["encoder"])
    pooling = cfg.get("pooling") or default_pooling
    detector = load_detector(cfg["encoder"])
    if detector is None:
        X, _ = extraction.extract(encoder, examples, cache_dir=cache_dir, batch_size=cfg["batch_size"],
                                  pooling=pooling, mesh=mesh)
        return {"X": np.asarray(X, np.float32)}, pooling, encoder_id, None
    decoder, tokens = detector
    codes = sorted(tokens.lang_to_id)
    features = extraction.extract_whisper(
        encoder, decoder, examples, sot=tokens.sot, language_ids=[tokens.lang_to_id[c] for c in codes],
        cache_dir=cache_dir, batch_size=cfg["batch_size"], mesh=mesh)
    return {"X": features[pooling], "lang_logprobs": features["lang_logprobs"]}, pooling, encoder_id, codes


def run(cfg: dict, output_dir: str, cache_dir: str, mesh=None) -> dict:
    """One training run: data → embeddings → head → output_dir (head/, metrics.json, README.md).

    With a pretrained multilingual Whisper, metrics also hold Whisper's own language detection on the same
    clips (`whisper_detection`: unrestricted, and restricted to the head's languages) for every split.
    """
    languages = cfg["languages"]
    dataset = load_dataset(cfg["dataset"], languages)
    train, valid, test = input_pipeline.split(dataset, data_seed=cfg["data_seed"])
    parts = {"train": train, "valid": valid, "test": test, "accent_shift": input_pipeline.heldout_accent_test(dataset)}
    for name in ("train", "valid", "test"):
        if not parts[name].examples:
            raise ValueError(f"the {name} split of {cfg['dataset']} is empty; the data needs clips in train, valid and test.")
    if cfg["samples_per_class"]:
        parts["train"] = input_pipeline.subsample_per_class(train, samples_per_class=cfg["samples_per_class"],
                                                      data_seed=cfg["data_seed"], take_all=True)
    used = [e for part in parts.values() for e in part.examples]  # the cache is per clip: other runs reuse rows
    features, pooling, encoder_id, codes = embed_dataset(cfg, used, cache_dir, mesh)
    row_of = {e.id: i for i, e in enumerate(used)}
    embedded = {name: {k: v[[row_of[e.id] for e in part.examples]] for k, v in features.items()}
                for name, part in parts.items() if part.examples}
    truth = {name: ([e.lang for e in parts[name].examples], [e.accent for e in parts[name].examples]) for name in embedded}
    Xtr = embedded["train"]["X"]
    ytr = np.array([languages.index(lang) for lang in truth["train"][0]], np.int32)
    Xva = embedded["valid"]["X"]
    yva = np.array([languages.index(lang) for lang in truth["valid"][0]], np.int32)

    start = time.perf_counter()
    head = fit_head(cfg, Xtr, ytr, Xva, yva, mesh, encoder_id, pooling,
                    checkpoint_dir=os.path.abspath(os.path.join(output_dir, "nn_checkpoints")))
    wall = time.perf_counter() - start
    info = head.train_info
    valid_metrics = evaluate(head, Xva, *truth["valid"])
    metrics = {
        "config": cfg, "encoder": encoder_id, "pooling": pooling, "input_norm": cfg.get("input_norm", "none"),
        "embedding_dim": int(Xtr.shape[1]), "n_train": len(ytr), "n_valid": len(yva), "n_test": len(truth["test"][0]),
        "skipped_corrupt": len(dataset.stats.skipped_corrupt),
        "test": evaluate(head, embedded["test"]["X"], *truth["test"]), "valid": valid_metrics,
        # the convex head records every ADMM iteration's validation accuracy; other heads report the final one
        "validation_peak": float(max(info.get("val_accuracy_history") or [valid_metrics["accuracy"]])),
        "train_wall_seconds": wall, "train_compile_seconds": float(info.get("compile_seconds", 0.0)),
        "train_run_seconds": float(info.get("run_seconds", wall)), "train_flops": float(info.get("flops", float("nan"))),
        "train_flop_count_seconds": float(info.get("flop_count_seconds", 0.0)),  # XLA's FLOP count, timed apart
        "devices": jax.device_count(), "processes": jax.process_count(), "backend": jax.default_backend(),
        "mesh": None if mesh is None else {name: int(size) for name, size in mesh.shape.items()},
    }
    if "accent_shift" in embedded:
        metrics["accent_shift"] = evaluate(head, embedded["accent_shift"]["X"], *truth["accent_shift"])
    if codes is not None:
        metrics["whisper_detection"] = {
            name: {mode: score_predictions(whisper_detection(embedded[name]["lang_logprobs"], codes, restrict),
                                           *truth[name], languages)
                   for mode, restrict in (("unrestricted", None), ("restricted", languages))}
            for name in ("test", "accent_shift") if name in embedded}
    if not runtime.is_writer():
        return metrics
    os.makedirs(output_dir, exist_ok=True)
    head.save(os.path.join(output_dir, "head"), metrics={k: metrics[k] for k in ("test", "validation_peak")})
    report.atomic_write_text(os.path.join(output_dir, "metrics.json"), json.dumps(metrics, indent=2))
    report.atomic_write_text(os.path.join(output_dir, "README.md"), model_card(metrics))
    logging.info("test accuracy %.4f (%d clips) -> %s", metrics["test"]["accuracy"], metrics["n_test"], output_dir)
    return metrics
