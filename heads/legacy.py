"""Loads the released jaxcld heads (`model.pkl`) without jaxcld and without running pickle code.

The published files (`williamhtan/cld-whisper-small-enzh` {100,500,1000,10000}/model.pkl,
`williamhtan/cld-mms-1b-5lang` model.pkl) are `pickle.dump`s of a `jaxcld.models.cvx_relu_mlp.CVX_ReLU_MLP`
whose `__dict__` holds JAX arrays `theta1` (C, d, 2P) and `theta2` (C, 2P) next to the whole training set
(X, y, patterns, ADMM iterates). Pickling goes through the default `object.__reduce_ex__`: NEWOBJ of the
class + BUILD with the instance dict. A jax.Array pickles as `jax._src.array._reconstruct_array(fun, args,
arr_state, aval_state)` with `fun, args` = numpy's `_reconstruct(ndarray, (0,), b"b")` and `arr_state` the
ndarray's `__setstate__` tuple.

`LegacyUnpickler.find_class` admits exactly those globals: the class becomes an inert `LegacyCVXReLUMLP`
record, `_reconstruct_array` a NumPy-only rebuild, plus numpy's `_reconstruct`, `ndarray`, `dtype` and
`scalar`. Any other global (os.system, builtins.eval, subprocess.Popen, ...) raises `RefusedGlobalError`
naming it, before anything is called.

This module only parses: `read_legacy_head` gives the weights and head.json metadata of the convex ReLU head a
pickle holds (`ConvexReLUHead.from_legacy` builds the head from them; `convert` writes them in the safe format).
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from heads import io
from heads.base import PUBLISHED_LANGUAGES, check_languages, load_head

__all__ = [
    "HEAD_TYPE", "LegacyCVXReLUMLP", "LegacyUnpickler", "RefusedGlobalError", "convert", "is_legacy_path",
    "load_legacy_pickle", "read_legacy_head",
]

HEAD_TYPE = "convex_relu"  # the head type a released pickle converts to (`ConvexReLUHead.head_type`)

_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
_NP_SCALAR = np.float32(0).__reduce__()[0]


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global outside the legacy-head allowlist."""


class LegacyCVXReLUMLP:
    """Inert stand-in for jaxcld's CVX_ReLU_MLP: pickle's BUILD fills `__dict__`; there are no methods."""


def _reconstruct_array(fun, args, arr_state, aval_state):
    """NumPy-only replacement of jax._src.array._reconstruct_array (returns the ndarray, no device put)."""
    if fun is not _NP_RECONSTRUCT:
        raise pickle.UnpicklingError(f"jax array record built by {fun!r}, expected numpy's _reconstruct.")
    array = _NP_RECONSTRUCT(*args)
    if not isinstance(array, np.ndarray):
        raise pickle.UnpicklingError(f"jax array record does not rebuild an ndarray (got {type(array).__name__}).")
    array.__setstate__(arr_state)
    return array


_ALLOWED = {
    ("jaxcld.models.cvx_relu_mlp", "CVX_ReLU_MLP"): LegacyCVXReLUMLP,
    ("jax._src.array", "_reconstruct_array"): _reconstruct_array,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,  # numpy >= 2
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,  # numpy 1.x
    ("numpy._core.multiarray", "scalar"): _NP_SCALAR,
    ("numpy.core.multiarray", "scalar"): _NP_SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class LegacyUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` admits only the globals a jaxcld CVX_ReLU_MLP pickle needs."""

    def find_class(self, module: str, name: str):
        """Returns the allowlisted stand-in for module.name or raises RefusedGlobalError."""
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobalError(
                f"refused to load global {module}.{name}: legacy head pickles may only reference "
                f"{sorted(f'{m}.{n}' for m, n in _ALLOWED)}. The file is not a jaxcld CVX_ReLU_MLP head "
                "(or was tampered with); nothing was executed."
            ) from None


def load_legacy_pickle(path: str) -> dict:
    """Reads a jaxcld CVX_ReLU_MLP pickle; returns {theta1 (C,d,2P), theta2 (C,2P), P_S, beta, rho, n_classes}.

    Only the trained weights and the scalar hyperparameters are kept; the training set is dropped.
    """
    with open(path, "rb") as f:
        model = LegacyUnpickler(f).load()
    if not isinstance(model, LegacyCVXReLUMLP):
        raise ValueError(f"{path} does not hold a jaxcld CVX_ReLU_MLP (got {type(model).__name__}).")
    state = vars(model)
    missing = [k for k in ("theta1", "theta2") if state.get(k) is None]
    if missing:
        raise ValueError(f"{path} holds an untrained CVX_ReLU_MLP: {missing} missing (run jaxcld's admm first).")
    theta1 = np.asarray(state["theta1"], np.float32)
    theta2 = np.asarray(state["theta2"], np.float32)
    if theta1.ndim != 3 or theta2.shape != (theta1.shape[0], theta1.shape[2]):
        raise ValueError(f"{path}: theta1 {theta1.shape} / theta2 {theta2.shape} are not (C, d, 2P) / (C, 2P).")
    scalars = {k: state.get(k) for k in ("P_S", "beta", "rho", "n_classes")}
    return dict(theta1=theta1, theta2=theta2, **{k: _plain(v) for k, v in scalars.items()})


def _plain(value):
    """Python scalar for a 0-d array / numpy scalar, unchanged otherwise."""
    return np.asarray(value).item() if isinstance(value, (np.ndarray, np.generic)) and np.size(value) == 1 else value


def read_legacy_head(pkl_path: str, languages=None, *, encoder: str | None = None,
                     pooling: str = "mean") -> tuple[dict[str, np.ndarray], dict]:
    """(params {W1 (C, d, 2P), w2 (C, 2P)}, head.json metadata) of a jaxcld `model.pkl` (or a directory holding one).

    `languages` default to the published label order for 2 classes (en, zh) or 5 (en, hi, id, ms, zh); other
    class counts need them explicitly.
    """
    if os.path.isdir(pkl_path):
        pkl_path = os.path.join(pkl_path, "model.pkl")
    record = load_legacy_pickle(pkl_path)
    num_classes, d, _ = record["theta1"].shape
    if languages is None:
        if num_classes not in PUBLISHED_LANGUAGES:
            raise ValueError(f"{pkl_path} has {num_classes} classes; pass languages=[...] (sorted ISO codes).")
        languages = PUBLISHED_LANGUAGES[num_classes]
    languages = check_languages(languages)
    if len(languages) != num_classes:
        raise ValueError(f"{pkl_path} has {num_classes} classes but {len(languages)} languages were given: {list(languages)}.")
    metadata = dict(head_type=HEAD_TYPE, languages=list(languages), embedding_dim=int(d), encoder=encoder,
                    pooling=pooling, hyperparameters=dict(n_patterns=record["P_S"], beta=record["beta"],
                                                          rho=record["rho"]),
                    seeds={}, metrics={}, trainer="jaxcld 0.2.4 (converted legacy pickle)",
                    source=os.path.basename(os.path.dirname(os.path.abspath(pkl_path))) + "/"
                    + os.path.basename(pkl_path))
    return dict(W1=record["theta1"], w2=record["theta2"]), metadata


def convert(pkl_path: str, out_dir: str, languages=None, *, encoder: str | None = None, pooling: str = "mean",
            metrics: dict | None = None):
    """Converts a jaxcld `model.pkl` to the safe format in `out_dir`; returns the ConvexReLUHead loaded from there.

    `languages` as in `read_legacy_head`.
    """
    params, metadata = read_legacy_head(pkl_path, languages, encoder=encoder, pooling=pooling)
    io.write_head(out_dir, params, {**metadata, "metrics": dict(metrics or {})})
    return load_head(out_dir)


def is_legacy_path(path: str) -> bool:
    """True for a pickle file (or a directory holding model.pkl and no head.json)."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "model.pkl")) and not os.path.isfile(os.path.join(path, io.METADATA_FILE))
    return path.endswith((".pkl", ".pickle"))
