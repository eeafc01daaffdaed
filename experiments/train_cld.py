"""Train a convex language-detection (CLD) head on frozen speech-encoder embeddings.

    python -m experiments.train_cld --flagfile=experiments/configs/demo.flags

Pipeline: dataset (manifest, Hugging Face dataset saved to disk, or the embedded espeak-ng corpus) →
split and per-class subsample by `--data_seed` → frozen encoder → pooled embeddings (cached, resumable)
→ head (`--head=cvx|nn|linear`) → `--output_dir` with the head in the safe format, `metrics.json` and a
model card `README.md`. Flags mirror the published `train_cvxnn.py`.
"""

from __future__ import annotations

from absl import app, flags

from encoders import runtime
from encoders.languages import check_languages
from experiments.lib import cld, runtime_flags

_RANK = flags.DEFINE_integer("rank", 20, "Nyström sketch rank.")
_NEURON = flags.DEFINE_integer("neuron", 64, "Activation patterns P (the network has 2P hidden units).")
_BETA = flags.DEFINE_float("beta", 1e-3, "Group-lasso strength.")
_RHO = flags.DEFINE_float("rho", None, "ADMM penalty (default: 0.1, the published value, in fixed mode; cronos.default_config's with --tol).")
_GAMMA = flags.DEFINE_float("gamma_ratio", 1.0, "ADMM dual step.")
_ADMM_ITERS = flags.DEFINE_integer("admm_iters", 6, "ADMM iterations (maximum when --tol is set).")
_PCG_ITERS = flags.DEFINE_integer("pcg_iters", 32, "PCG iterations per ADMM step (maximum).")
_TOL = flags.DEFINE_float("tol", None, "Relative residual tolerance; unset = fixed iteration counts (published).")
_OPT_SEED = flags.DEFINE_integer("opt_seed", 1024, "Seed of the head's optimisation (patterns, sketch, init).")
_DATA_SEED = flags.DEFINE_integer("data_seed", 0, "Seed of the data split and subsampling.")
_LANGUAGES = flags.DEFINE_list("languages", ["en", "zh"], "ISO-639-1 codes of the languages to detect.")
_SAMPLES = flags.DEFINE_integer("samples_per_class", None, "Training clips per language (unset: all).")
_ENCODER = flags.DEFINE_string(
    "encoder", "openai/whisper-small",
    "Hugging Face id or local directory of a Whisper / wav2vec2 (MMS) checkpoint, or random:whisper-SIZE "
    "for a randomly initialised encoder of an official Whisper size (smoke runs only).")
_DATASET = flags.DEFINE_string(
    "dataset", "embedded",
    "'embedded' (the shipped espeak-ng corpus), a manifest (.jsonl/.csv) or a Hugging Face dataset saved to disk.")
_OUTPUT = flags.DEFINE_string("output_dir", "outputs/cld", "Where the head, metrics.json and README.md go.")
_CACHE = flags.DEFINE_string("cache_dir", "outputs/embedding_cache", "Embedding cache (resumable extraction).")
_HEAD = flags.DEFINE_enum("head", "cvx", ["cvx", "nn", "linear"], "Head type.")
_POOLING = flags.DEFINE_enum(
    "pooling", None, ["mean", "masked_mean"],
    "Utterance pooling: mean over all encoder frames (Whisper: all 1500, padding included, as the published "
    "heads) or masked_mean over the frames covering the audio. Unset: the encoder's default.")
_INPUT_NORM = flags.DEFINE_enum(
    "input_norm", "center", ["none", "center", "standardize"],
    "Per-feature centring / standardisation stored in the head (training statistics). Default center: the best "
    "cvx configuration on real whisper-base embeddings (experiments/results/bench_heads.md); the published "
    "heads used none (their flagfiles say so).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Encoder batch size.")
_EPOCHS = flags.DEFINE_integer("nn_epochs", 50, "Epochs of the NN head.")



def config_from_flags() -> dict:
    """The run's configuration as a plain dict (what sweeps vary and metrics.json records)."""
    return {
        "head": _HEAD.value, "encoder": _ENCODER.value, "dataset": _DATASET.value, "pooling": _POOLING.value,
        "input_norm": _INPUT_NORM.value,
        "languages": list(check_languages([c.strip() for c in _LANGUAGES.value])), "samples_per_class": _SAMPLES.value,
        "neuron": _NEURON.value, "rank": _RANK.value, "beta": _BETA.value, "rho": _RHO.value,
        "gamma_ratio": _GAMMA.value, "admm_iters": _ADMM_ITERS.value, "pcg_iters": _PCG_ITERS.value, "tol": _TOL.value,
        "opt_seed": _OPT_SEED.value, "data_seed": _DATA_SEED.value, "batch_size": _BATCH.value,
        "nn_epochs": _EPOCHS.value,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    mesh = runtime_flags.init()
    metrics = cld.run(config_from_flags(), _OUTPUT.value, _CACHE.value, mesh)
    if runtime.is_writer():
        print(cld.summary(metrics) + f"; wrote {_OUTPUT.value}")

if __name__ == "__main__":
    app.run(main)
