"""Safe on-disk format shared by every head: `head.safetensors` (weights) + `head.json` (metadata).

Nothing executable is stored and nothing is unpickled: weights are a flat name -> array mapping
(nested names joined with "."), metadata is plain JSON. Training data is never written.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

__all__ = ["FORMAT_VERSION", "METADATA_FILE", "WEIGHTS_FILE", "flatten", "read_head", "unflatten", "write_head"]

FORMAT_VERSION = 1
WEIGHTS_FILE = "head.safetensors"
METADATA_FILE = "head.json"


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict of arrays -> flat {"a.b.c": array}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = np.asarray(value)
    return flat


def unflatten(flat: dict[str, Any]) -> dict:
    """Inverse of `flatten` (integer-looking path parts become int keys, as in NNX pure dicts)."""
    tree: dict = {}
    for name, value in flat.items():
        parts = [int(p) if p.isdigit() else p for p in name.split(".")]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


def write_head(directory: str, tensors: dict[str, np.ndarray], metadata: dict) -> None:
    """Writes `tensors` to directory/head.safetensors and `metadata` to directory/head.json."""
    os.makedirs(directory, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(directory, WEIGHTS_FILE))
    with open(os.path.join(directory, METADATA_FILE), "w") as f:
        json.dump({**metadata, "format_version": FORMAT_VERSION}, f, indent=2, sort_keys=True, default=_json_default)


def read_head(directory: str) -> tuple[dict[str, np.ndarray], dict]:
    """Reads (tensors, metadata) written by `write_head`; clear errors for missing files or versions."""
    paths = [os.path.join(directory, name) for name in (WEIGHTS_FILE, METADATA_FILE)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"not a saved head directory: missing {', '.join(missing)}.")
    with open(paths[1]) as f:
        metadata = json.load(f)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{paths[1]} has format_version {metadata.get('format_version')!r}; expected {FORMAT_VERSION}.")
    return load_file(paths[0]), metadata
