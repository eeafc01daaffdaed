"""Safe on-disk format shared by every head: `head.safetensors` (weights) + `head.json` (metadata).

Nothing executable is stored and nothing is unpickled: weights are a flat name -> array mapping
(nested names joined with "."), metadata is plain JSON. Training data is never written.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from encoders.runtime import atomic_write_bytes, atomic_write_text  # noqa: F401  (heads.io.atomic_write_* as before)

__all__ = ["FORMAT_VERSION", "METADATA_FILE", "WEIGHTS_FILE", "flatten", "read_head", "safe_open_metadata", "unflatten", "write_head"]

FORMAT_VERSION = 2  # 2 adds weights_sha256 (head.json pins the weights file); 1 still loads
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
    """Writes `tensors` to directory/head.safetensors and `metadata` to directory/head.json, each atomically;
    head.json records the weights' SHA-256, so a pair left mismatched by a kill between the two is refused.
    Non-finite weights are refused (nothing is written)."""
    for name, value in tensors.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            raise ValueError(f"refusing to save {directory}: weight {name!r} holds {bad} NaN or infinite values of "
                             f"{value.size}; the training that produced it diverged (retrain, e.g. with centred inputs).")
    os.makedirs(directory, exist_ok=True)
    header = {"languages": ",".join(metadata["languages"])} if "languages" in metadata else None  # label order
    weights = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=header)
    record = {**metadata, "format_version": FORMAT_VERSION, "weights_sha256": hashlib.sha256(weights).hexdigest()}
    atomic_write_bytes(os.path.join(directory, WEIGHTS_FILE), weights)
    atomic_write_bytes(os.path.join(directory, METADATA_FILE),
                  json.dumps(record, indent=2, sort_keys=True, default=_json_default).encode())


def read_head(directory: str) -> tuple[dict[str, np.ndarray], dict]:
    """Reads (tensors, metadata) written by `write_head`; clear errors for missing files, versions or weights that
    are not the ones head.json was written with."""
    paths = [os.path.join(directory, name) for name in (WEIGHTS_FILE, METADATA_FILE)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"not a saved head directory: missing {', '.join(missing)}.")
    with open(paths[1]) as f:
        metadata = json.load(f)
    if metadata.get("format_version") not in (1, FORMAT_VERSION):
        raise ValueError(f"{paths[1]} has format_version {metadata.get('format_version')!r}; expected {FORMAT_VERSION}.")
    with open(paths[0], "rb") as f:
        weights = f.read()
    pinned = metadata.get("weights_sha256")
    if metadata["format_version"] >= 2 and hashlib.sha256(weights).hexdigest() != pinned:
        raise ValueError(f"{paths[0]} is not the weights file {paths[1]} was written with (SHA-256 mismatch): the "
                         "directory was modified or a save was interrupted; save the head again.")
    stored = safe_open_metadata(weights).get("languages")
    if stored is not None and stored.split(",") != list(metadata.get("languages", [])):
        raise ValueError(f"{paths[1]} names languages {metadata.get('languages')} but the weights in {paths[0]} were "
                         f"trained for {stored.split(',')}: the label order would be wrong; restore head.json.")
    return load(weights), metadata


def safe_open_metadata(data: bytes) -> dict:
    """The string metadata of a safetensors file's header (its `__metadata__`)."""
    (length,) = np.frombuffer(data[:8], "<u8")
    return json.loads(data[8 : 8 + int(length)]).get("__metadata__", {}) or {}
