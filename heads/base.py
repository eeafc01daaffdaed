"""What every head shares: language/label/embedding validation, the prediction interface, save/load.

A head is immutable state (`params`, a flat name -> array dict; `languages`; `metadata`) plus a pure,
jitted forward function `forward(params, x) -> (B, C) logits` defined by each subclass. Class c is
the c-th language of the sorted ISO-639-1 codes.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from encoders.languages import ISO_639_1, check_languages  # noqa: F401  (heads.base.* as before)
from heads import io

__all__ = ["Head", "INPUT_NORMS", "ISO_639_1", "PUBLISHED_LANGUAGES", "check_embeddings", "check_languages",
           "encode_labels", "input_statistics", "load_head", "normalize_inputs"]

# Label order of the released jaxcld heads, by number of classes.
PUBLISHED_LANGUAGES = {2: ("en", "zh"), 5: ("en", "hi", "id", "ms", "zh")}

_REGISTRY: dict[str, type["Head"]] = {}


def check_embeddings(embeddings, dim: int | None = None) -> np.ndarray:
    """(B, d) finite float32 embeddings; `dim` (the head's embedding dim) is checked when given."""
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be pooled (B, d) arrays; got shape {x.shape}.")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"embeddings must be numeric; got dtype {x.dtype}.")
    x = x.astype(np.float32)
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"embedding dimension mismatch: the head expects d={dim}, got embeddings with d={x.shape[1]}.")
    bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ValueError(f"embeddings contain {bad} NaN or infinite values.")
    return x


def encode_labels(labels, languages: Sequence[str], num_samples: int) -> np.ndarray:
    """(n,) int32 labels from ints 0..C-1 (sorted-language order) or ISO codes; every class must occur."""
    raw = np.asarray(labels)
    if raw.ndim != 1 or raw.shape[0] != num_samples:
        raise ValueError(f"labels must be a 1-D sequence of {num_samples} entries (one per embedding); got shape {raw.shape}.")
    if np.issubdtype(raw.dtype, np.integer):
        out_of_range = sorted(set(raw[(raw < 0) | (raw >= len(languages))].tolist()))
        if out_of_range:
            raise ValueError(f"integer labels must lie in 0..{len(languages) - 1} ({list(languages)}); got {out_of_range}.")
        y = raw.astype(np.int32)
    else:
        index = {lang: i for i, lang in enumerate(languages)}
        unknown = sorted({str(label) for label in raw.tolist() if label not in index})
        if unknown:
            raise ValueError(f"unknown label language(s) {unknown}; the head's languages are {list(languages)}.")
        y = np.array([index[label] for label in raw.tolist()], np.int32)
    counts = np.bincount(y, minlength=len(languages))
    empty = [languages[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"no training examples for language(s) {empty}; every class needs at least one.")
    return y


INPUT_NORMS = ("none", "center", "standardize")


def input_statistics(x: np.ndarray, input_norm: str) -> dict[str, np.ndarray]:
    """Per-feature statistics of training embeddings that a head stores and applies to every input.

    "none": {}; "center": `input_mean`; "standardize": `input_mean` and `input_scale` (the standard
    deviation, floored at 1e-6 of its largest value so constant features stay finite).
    """
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}.")
    if input_norm == "none":
        return {}
    stats = {"input_mean": x.mean(0).astype(np.float32)}
    if input_norm == "standardize":
        std = x.std(0)
        stats["input_scale"] = np.maximum(std, 1e-6 * max(float(std.max()), 1e-30)).astype(np.float32)
    return stats


def normalize_inputs(params: dict, x: np.ndarray) -> np.ndarray:
    """Applies the stored `input_mean` / `input_scale` of a head (when present) to embeddings `x`."""
    if "input_mean" in params:
        x = x - params["input_mean"]
    if "input_scale" in params:
        x = x / params["input_scale"]
    return x.astype(np.float32)


class Head:
    """Base class: a pure forward function over explicit `params`, plus languages and metadata.

    Subclasses set `head_type`, `forward` (jitted `(params, x) -> logits`) and a `fit` classmethod.
    """

    head_type: ClassVar[str]
    forward: ClassVar[Callable[[dict, Any], Any]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.head_type] = cls

    def __init__(self, params: dict[str, np.ndarray], metadata: dict, train_info: dict | None = None):
        """Wraps trained `params`; `metadata` must hold languages and embedding_dim (see `make_metadata`)."""
        self.params = {name: np.asarray(value) for name, value in params.items()}
        self.metadata = dict(metadata)
        self.languages = check_languages(self.metadata["languages"])
        if list(self.languages) != list(self.metadata["languages"]):
            raise ValueError(f"metadata languages {self.metadata['languages']} are not in sorted label order.")
        self.embedding_dim = int(self.metadata["embedding_dim"])
        self.train_info = dict(train_info or {})
        self._device_params = {name: jnp.asarray(value) for name, value in self.params.items()
                               if name not in ("input_mean", "input_scale")}  # applied on the host by `logits`
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Refuses weights whose shapes do not fit `embedding_dim` inputs and one output per language."""
        for name in ("input_mean", "input_scale"):
            if name in self.params and self.params[name].shape != (self.embedding_dim,):
                raise ValueError(f"{name} has shape {self.params[name].shape}; expected ({self.embedding_dim},).")
        probe = jax.ShapeDtypeStruct((1, self.embedding_dim), jnp.float32)
        try:
            out = jax.eval_shape(type(self).forward, self._device_params, probe)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{self.head_type} weights {({k: v.shape for k, v in self.params.items()})} do not take "
                             f"{self.embedding_dim}-d embeddings: {e}") from e
        if out.shape != (1, len(self.languages)):
            raise ValueError(f"{self.head_type} weights give {out.shape[-1]} outputs but the head has "
                             f"{len(self.languages)} languages {list(self.languages)}.")

    @classmethod
    def make_metadata(cls, languages, embedding_dim: int, *, hyperparameters: dict, seeds: dict,
                      encoder: str | None = None, pooling: str = "mean", metrics: dict | None = None, **extra) -> dict:
        """The metadata record written to head.json (everything but the weights)."""
        return dict(head_type=cls.head_type, languages=list(languages), embedding_dim=int(embedding_dim),
                    encoder=encoder, pooling=pooling, hyperparameters=dict(hyperparameters), seeds=dict(seeds),
                    metrics=dict(metrics or {}), **extra)

    def logits(self, embeddings) -> np.ndarray:
        """(B, C) class scores for pooled (B, d) embeddings."""
        x = normalize_inputs(self.params, check_embeddings(embeddings, self.embedding_dim))
        return np.asarray(type(self).forward(self._device_params, jnp.asarray(x)))

    def predict(self, embeddings) -> np.ndarray:
        """(B,) int labels: indices into `languages`."""
        return np.argmax(self.logits(embeddings), axis=1)

    def predict_languages(self, embeddings) -> list[str]:
        """Predicted ISO-639-1 codes, one per embedding."""
        return [self.languages[i] for i in self.predict(embeddings)]

    def save(self, directory: str, metrics: dict | None = None) -> None:
        """Writes directory/head.safetensors + head.json; `metrics` are merged into metadata["metrics"]."""
        if metrics:
            self.metadata["metrics"] = {**self.metadata.get("metrics", {}), **metrics}
        io.write_head(directory, self.params, self.metadata)

    @classmethod
    def load(cls, path: str) -> "Head":
        """Loads a directory written by `save` (a head of this class)."""
        tensors, metadata = io.read_head(path)
        if metadata.get("head_type") != cls.head_type:
            raise ValueError(f"{path} holds a {metadata.get('head_type')!r} head, not a {cls.head_type!r} head.")
        return cls(tensors, metadata)


def load_head(path: str) -> Head:
    """Loads any saved head directory, dispatching on metadata["head_type"]."""
    tensors, metadata = io.read_head(path)
    head_type = metadata.get("head_type")
    if head_type not in _REGISTRY:
        raise ValueError(f"{path} holds an unknown head type {head_type!r}; known: {sorted(_REGISTRY)}.")
    return _REGISTRY[head_type](tensors, metadata)
