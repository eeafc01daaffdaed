"""Converts a released jaxcld head (`model.pkl`) to the safe format (head.safetensors + head.json).

    python -m experiments.convert_legacy_head --pkl=path/to/model.pkl --output_dir=heads/cld-whisper-small-enzh-1000 \
        --encoder=openai/whisper-small --languages=en,zh

The pickle is read by `heads.legacy`'s restricted unpickler (no jaxcld needed, no pickle code run);
only theta1/theta2 and the scalar hyperparameters are kept. Without --languages the published label
order is used (2 classes: en, zh; 5 classes: en, hi, id, ms, zh).
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments.lib import runtime_flags
from heads.legacy import convert

_PKL = flags.DEFINE_string("pkl", None, "A jaxcld CVX_ReLU_MLP model.pkl (or a directory holding one).", required=True)
_OUT = flags.DEFINE_string("output_dir", None, "Output directory for head.safetensors + head.json.", required=True)
_LANGUAGES = flags.DEFINE_list("languages", None, "ISO-639-1 codes of the classes (default: the published ones).")
_ENCODER = flags.DEFINE_string("encoder", None, "Encoder id recorded in the metadata, e.g. openai/whisper-small.")
_POOLING = flags.DEFINE_string("pooling", "mean", "Pooling convention recorded in the metadata.")


def main(argv):
    """Converts and prints the written metadata."""
    if not runtime_flags.init_host_tool(argv):
        return
    head = convert(_PKL.value, _OUT.value, _LANGUAGES.value, encoder=_ENCODER.value, pooling=_POOLING.value)
    print(json.dumps(head.metadata, indent=2))


if __name__ == "__main__":
    app.run(main)
