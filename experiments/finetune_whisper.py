"""Fine-tunes a Whisper checkpoint on a CLD-style manifest (`asr.finetune`) and writes a Hugging Face directory.

    python -m experiments.finetune_whisper --model=openai/whisper-base --train_manifest=corpus/manifest.jsonl \
        --trainable=attention --steps=200 --output_dir=runs/sft_a

The manifest is the one the CLD data pipeline reads (`encoders.input_pipeline.load_manifest`; `text` is the
transcript, `lang` the language token of the forced prompt); `--split` keeps one split of it. `--output_dir`
receives `checkpoints/` (orbax; rerunning the same command resumes from the latest one), `model/` (the base's
config, tokenizer and preprocessor files with the fine-tuned `model.safetensors`: transformers'
`WhisperForConditionalGeneration` and `WhisperProcessor` load it), `finetune.json` (settings, losses, compile and
run seconds, XLA FLOPs per step) and `loss.png`. `python -m experiments.export_hf --model=OUTPUT_DIR/checkpoints`
exports the latest checkpoint of a run, finished or not.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from asr import finetune, merging
from encoders import loading, runtime
from encoders.input_pipeline import load_manifest
from experiments.lib import plots, runtime_flags

_MODEL = flags.DEFINE_string("model", "openai/whisper-base", "Base checkpoint: HF directory, offline name or Hub id.")
_MANIFEST = flags.DEFINE_string("train_manifest", None, "Manifest (jsonl/csv) of the training clips.", required=True)
_SPLIT = flags.DEFINE_string("split", None, "Keep only the manifest rows of this split (default: all rows).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Run directory (checkpoints, model, finetune.json).", required=True)
_DEFAULTS = finetune.FinetuneConfig()
_TRAINABLE = flags.DEFINE_enum("trainable", _DEFAULTS.trainable, sorted(finetune.TRAINABLE_SETS), "Trainable set.")
_STEPS = flags.DEFINE_integer("steps", _DEFAULTS.steps, "Optimisation steps.")
_BATCH = flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Global batch size (clips).")
_LR = flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Peak AdamW learning rate.")
_WARMUP = flags.DEFINE_integer("warmup_steps", _DEFAULTS.warmup_steps, "Linear warm-up steps.")
_DECAY = flags.DEFINE_float("weight_decay", _DEFAULTS.weight_decay, "AdamW weight decay (not on biases or norms).")
_CLIP = flags.DEFINE_float("clip_norm", _DEFAULTS.clip_norm, "Global gradient-norm clip.")
_DTYPE = flags.DEFINE_enum("compute_dtype", _DEFAULTS.compute_dtype, sorted(finetune.COMPUTE_DTYPES),
                           "Compute dtype (master weights stay float32).")
_LABEL_TOKENS = flags.DEFINE_integer("max_label_tokens", None, "Label sequence length (default: the longest).")
_CACHE_STATES = flags.DEFINE_bool("cache_encoder_states", False, "Frozen encoder: encode every clip once.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", _DEFAULTS.checkpoint_every, "Steps between checkpoints.")
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of the batch order.")


def main(argv):
    """Trains, then (process 0) writes the model directory, finetune.json and loss.png."""
    del argv
    mesh = runtime_flags.init()
    config = finetune.FinetuneConfig(
        trainable=_TRAINABLE.value, steps=_STEPS.value, batch_size=_BATCH.value, learning_rate=_LR.value,
        warmup_steps=_WARMUP.value, weight_decay=_DECAY.value, clip_norm=_CLIP.value, compute_dtype=_DTYPE.value,
        max_label_tokens=_LABEL_TOKENS.value, cache_encoder_states=_CACHE_STATES.value,
        checkpoint_every=_CHECKPOINT_EVERY.value, seed=_SEED.value)
    try:
        config.check()
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    model_dir = loading.resolve_model_dir(_MODEL.value)
    dataset = load_manifest(_MANIFEST.value)
    examples = [e for e in dataset.examples if _SPLIT.value is None or e.split == _SPLIT.value]
    if not examples:
        raise app.UsageError(f"--train_manifest {_MANIFEST.value} has no clips in split {_SPLIT.value!r}")
    model = finetune.WhisperSeq2Seq.from_pretrained(model_dir, compute_dtype=config.compute_dtype)
    result = finetune.finetune(model, examples, config, tokenizer_dir=model_dir, mesh=mesh, model_name=_MODEL.value,
                               checkpoint_dir=os.path.join(_OUTPUT.value, "checkpoints"))
    if not runtime.is_writer():
        return
    out = merging.save_hf(result.model.state_dict(), model_dir, os.path.join(_OUTPUT.value, "model"))
    info = dict(result.info, model=_MODEL.value, train_manifest=_MANIFEST.value, split=_SPLIT.value,
                train_clips=len(examples), config=dataclasses.asdict(config))
    runtime.atomic_write_text(os.path.join(_OUTPUT.value, "finetune.json"), json.dumps(info, indent=1))
    if info["losses"]:
        runtime.atomic_write_bytes(os.path.join(_OUTPUT.value, "loss.png"),
                                   plots.plot_losses(info["losses"], info["resumed_from"]))
    print(f"fine-tuned {len(info['losses'])} steps (from step {info['resumed_from']}) on {len(examples)} clips; "
          f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
