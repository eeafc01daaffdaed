"""Merges Whisper fine-tunes of one base into a Hugging Face directory (`asr.merging`).

    python -m experiments.merge_whisper --base=DIR --finetuned=DIR1,DIR2 --method=hsa --head_fraction=0.6 \
        --output_dir=DIR

The output directory holds the base's config, tokenizer and preprocessor files, the merged `model.safetensors`
(transformers' `WhisperForConditionalGeneration` and `WhisperProcessor` load it), `merge.json` (method, settings,
inputs, merge wall time) and, for `hsa`, `head_saliency.png`: each model's per-head saliency, one row per
attention module, the picture of where an adaptation lives.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from asr import merging
from encoders import loading, runtime
from experiments.lib import plots, runtime_flags

_BASE = flags.DEFINE_string("base", None, "Base model directory (or offline name).", required=True)
_FINETUNED = flags.DEFINE_list("finetuned", None, "Fine-tuned model directories.", required=True)
_METHOD = flags.DEFINE_enum("method", "hsa", list(merging.METHODS), "Merge method.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Output directory of the merged model.", required=True)
_LAM = flags.DEFINE_float("lam", 1.0, "Task-vector scale lambda.")
_WEIGHTS = flags.DEFINE_list("weights", None, "linear: one weight per fine-tuned model (default equal).")
_DENSITY = flags.DEFINE_float("density", 0.2, "ties / dare: fraction of task-vector entries kept.")
_TRIM = flags.DEFINE_enum("trim", "global", ["global", "tensor"], "ties: trim over the model or per tensor.")
_SEED = flags.DEFINE_integer("seed", 0, "dare: seed of the drop masks.")
_HEAD_FRACTION = flags.DEFINE_float("head_fraction", 0.6, "hsa: fraction of heads each model keeps.")
_SELECT = flags.DEFINE_enum("select", "global", ["global", "layer"], "hsa: rank heads over all modules or per module.")
_NON_ATTENTION = flags.DEFINE_enum("non_attention", "base", list(merging.NON_ATTENTION), "hsa: the other parameters.")


def main(argv):
    if not runtime_flags.init_host_tool(argv):
        return
    base_dir = loading.resolve_model_dir(_BASE.value)
    base = merging.load_state(base_dir)
    finetuned = [merging.load_state(d) for d in _FINETUNED.value]
    config = loading.load_config(base_dir)
    settings = dict(lam=_LAM.value, weights=None if _WEIGHTS.value is None else [float(w) for w in _WEIGHTS.value],
                    density=_DENSITY.value, trim=_TRIM.value, seed=_SEED.value, head_fraction=_HEAD_FRACTION.value,
                    select=_SELECT.value, non_attention=_NON_ATTENTION.value)
    start = time.perf_counter()
    merged = merging.merge(base, finetuned, _METHOD.value, config=config, **settings)
    seconds = time.perf_counter() - start
    merging.save_hf(merged, base_dir, _OUTPUT.value)
    if _METHOD.value == "hsa":
        scores = merging.head_saliency(base, finetuned, config)
        runtime.atomic_write_bytes(os.path.join(_OUTPUT.value, "head_saliency.png"), plots.plot_saliency(scores, _FINETUNED.value))
    record = {"method": _METHOD.value, "settings": settings, "base": _BASE.value, "finetuned": _FINETUNED.value,
              "merge_seconds": seconds}
    runtime.atomic_write_text(os.path.join(_OUTPUT.value, "merge.json"), json.dumps(record, indent=2))
    print(f"merged {len(finetuned)} model(s) by {_METHOD.value} in {seconds:.2f} s -> {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
