"""scikit-learn-style one-line interface: `ConvexReLUClassifier().fit(X, y).predict(X)`.

Follows scikit-learn's estimator conventions (get_params / set_params, clone, GridSearchCV, fitted
attributes ending in `_`, pickling) without importing scikit-learn.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import warnings
from typing import Hashable, Sequence

import jax
import numpy as np

from cronos.admm import ADMMConfig, SolveResult, default_config, solve
from cronos.compilation_cache import enable_compilation_cache
from cronos.jaxcld_mode import JaxcldConfig
from cronos.problems import ConvexReLU, GatedReLU, sample_gates, sample_patterns

__all__ = ["ConvexReLUClassifier", "NotFittedError"]

SOLVERS = ("auto", "fixed", "jaxcld")


class NotFittedError(ValueError, AttributeError):
    """Raised when a method needing a fitted estimator is called before `fit` (as sklearn's NotFittedError)."""


def _sorted_classes(y: Sequence[Hashable]) -> list:
    """Distinct labels, sorted when comparable, else in order of first appearance."""
    unique = list(dict.fromkeys(y))
    try:
        return sorted(unique)
    except TypeError:
        return unique


def _as_labels(y, name: str = "y") -> list:
    """Labels as a list of hashable Python values (NumPy scalars become Python scalars)."""
    if isinstance(y, np.ndarray) or hasattr(y, "to_numpy"):  # NumPy array, pandas Series
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one label per row); got shape {y.shape}.")
        return y.tolist()
    labels = list(y)
    try:
        hash(tuple(labels))
    except TypeError as exc:
        raise ValueError(f"{name} labels must be hashable (e.g. ints, strings, tuples): {exc}.") from None
    return labels


class _FlopsUnavailable:
    """Stands in for a solve's FLOP counter after unpickling (the counter holds device arrays)."""

    def __call__(self, pcg_iterations):
        raise RuntimeError("FLOP counts are not kept when a fitted ConvexReLUClassifier is pickled; "
                           "read `result_.flops` before pickling, or refit.")


def _host_result(result: SolveResult) -> SolveResult:
    """The solve result with its weights as NumPy arrays (picklable; predictions unchanged)."""
    if not dataclasses.is_dataclass(result):
        return result
    w = None if result.w is None else np.asarray(result.w)
    return dataclasses.replace(result, v=np.asarray(result.v), w=w)


def _mesh_state(mesh):
    """A picklable description of a jax Mesh (device ids, shape, axis names and types)."""
    return {"device_ids": np.vectorize(lambda d: d.id, otypes=[int])(mesh.devices),
            "platform": mesh.devices.flat[0].platform, "axis_names": tuple(mesh.axis_names),
            "axis_types": tuple(getattr(mesh, "axis_types", ()) or ())}


def _rebuild_mesh(state):
    """The Mesh `state` describes, on the same devices of this process; None (with a warning) if they are absent."""
    from jax.sharding import Mesh  # noqa: PLC0415

    try:
        by_id = {d.id: d for d in jax.devices(state["platform"])}
        devices = np.vectorize(lambda i: by_id[i], otypes=[object])(state["device_ids"])
        kwargs = {"axis_types": state["axis_types"]} if state["axis_types"] else {}
        return Mesh(devices, state["axis_names"], **kwargs)
    except (KeyError, RuntimeError, ValueError) as exc:
        warnings.warn(f"ConvexReLUClassifier: the pickled mesh's devices are not available here ({exc!r}); "
                      "mesh set to None (predictions do not use it).", RuntimeWarning, stacklevel=3)
        return None


class ConvexReLUClassifier:
    """Two-layer ReLU network trained to the global optimum of its convex reformulation by CRONOS.

    Defaults take the fast exact path: `cronos.solve(problem, tol=1e-4)` (tolerance-mode ADMM, at most
    `max_iter` iterations). Fitting is, with `k1, k2 = jax.random.split(jax.random.key(random_state))`,
    `solve(ConvexReLU(X, y, patterns=sample_patterns(k1, X, n_patterns), beta=beta), config, key=k2)`.

    Args:
      n_patterns: activation patterns P (the network has 2P hidden units; P for `gated=True`).
      beta: group-lasso strength.
      tol: relative primal/dual residual tolerance of the "auto" solver.
      max_iter: most ADMM iterations of the "auto" solver.
      solver: "auto" (`cronos.default_config(problem, tol, dtype, max_iters=max_iter)`), "fixed" (the
        published 6 ADMM x 32 PCG `cronos.ADMMConfig()`; tol and max_iter unused) or "jaxcld"
        (`cronos.JaxcldConfig()`, jaxcld 0.2.4's iterates; tol and max_iter unused). For tiny d * P
        the Nyström rank is capped at d * P (solve would reject a larger one).
      dtype: "float32" or "float64" (needs `jax.config.update("jax_enable_x64", True)`).
      gated: solve the gated-ReLU program instead.
      random_state: integer seed of the patterns (gates) and of the Nyström sketch.
      mesh: optional jax Mesh to shard the rows over (pickled as its device ids and rebuilt on unpickling when
        those devices exist, else None). On a mesh spanning several processes, fit on the full data, identical
        on every process.
      rows_axis: the mesh axis the rows are split over (None: replicated).
      compilation_cache: True enables JAX's persistent compilation cache at fit
        (`cronos.enable_compilation_cache()`), a path enables it there, False leaves JAX's config alone.

    Fitted attributes: `classes_` (list of the distinct labels, sorted when comparable),
    `n_features_in_`, `n_iter_`, `converged_`, `result_` (the `cronos.SolveResult`, weights as NumPy).
    """

    _estimator_type = "classifier"  # scikit-learn < 1.6

    def __init__(self, n_patterns: int = 64, beta: float = 1e-3, *, tol: float = 1e-4, max_iter: int = 3000,
                 solver: str = "auto", dtype: str = "float32", gated: bool = False, random_state: int = 0,
                 mesh=None, rows_axis: str | None = "data", compilation_cache: bool | str = True):
        self.n_patterns = n_patterns
        self.beta = beta
        self.tol = tol
        self.max_iter = max_iter
        self.solver = solver
        self.dtype = dtype
        self.gated = gated
        self.random_state = random_state
        self.mesh = mesh
        self.rows_axis = rows_axis
        self.compilation_cache = compilation_cache

    # --- scikit-learn estimator protocol ---------------------------------------------------------------

    @classmethod
    def _get_param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return sorted(p.name for p in signature.parameters.values()
                      if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))

    def get_params(self, deep: bool = True) -> dict:
        """Constructor parameters by name (with `deep`, also `name__sub` of parameters that are estimators)."""
        out = {}
        for name in self._get_param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{name}__{k}", v) for k, v in value.get_params(deep=True).items())
            out[name] = value
        return out

    def set_params(self, **params) -> "ConvexReLUClassifier":
        """Sets constructor parameters (and `name__sub` ones of nested estimators); returns self."""
        valid = self.get_params(deep=True)
        nested: dict[str, dict] = {}
        for key, value in params.items():
            name, _, sub = key.partition("__")
            if name not in valid:
                raise ValueError(f"Invalid parameter {name!r} for estimator {type(self).__name__}. "
                                 f"Valid parameters are: {sorted(self._get_param_names())!r}.")
            if sub:
                nested.setdefault(name, {})[sub] = value
            else:
                setattr(self, name, value)
                valid[name] = value
        for name, sub_params in nested.items():
            valid[name].set_params(**sub_params)
        return self

    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, Tags, TargetTags  # noqa: PLC0415  (only scikit-learn calls this)

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True),
                    classifier_tags=ClassifierTags())

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "result_")

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = []
        for name in self._get_param_names():
            value = getattr(self, name, None)
            default = defaults.get(name, inspect.Parameter.empty)
            try:
                same = value is default or (type(value) is type(default) and bool(value == default))
            except Exception:  # noqa: BLE001  (arrays, meshes: show them)
                same = False
            if not same:
                changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if state.get("mesh") is not None:
            state["mesh"] = _mesh_state(state["mesh"])
            state["_pickled_mesh"] = True
        if "result_" in state:
            result = copy.copy(state["result_"])  # keeps flops if already computed
            result._flop_counter = _FlopsUnavailable()
            state["result_"] = result
        return state

    def __setstate__(self, state: dict) -> None:
        if state.pop("_pickled_mesh", False):
            state["mesh"] = _rebuild_mesh(state["mesh"])
        self.__dict__.update(state)

    # --- fitting ---------------------------------------------------------------------------------------

    def _validate_params(self) -> None:
        name = type(self).__name__

        def integer(value) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

        if not integer(self.n_patterns) or self.n_patterns <= 0:
            raise ValueError(f"{name}: n_patterns must be a positive integer, got {self.n_patterns!r}.")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float, np.number)) \
                or not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"{name}: beta must be a finite non-negative number, got {self.beta!r}.")
        if not isinstance(self.solver, str) or self.solver not in SOLVERS:
            raise ValueError(f"{name}: solver must be one of {SOLVERS}, got {self.solver!r}.")
        if self.solver == "auto":
            if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float, np.number)) \
                    or not math.isfinite(self.tol) or self.tol <= 0:
                raise ValueError(f"{name}: tol must be a positive number, got {self.tol!r}.")
            if not integer(self.max_iter) or self.max_iter <= 0:
                raise ValueError(f"{name}: max_iter must be a positive integer, got {self.max_iter!r}.")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"{name}: dtype must be 'float32' or 'float64', got {self.dtype!r}.")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError(f'{name}: dtype="float64" needs 64-bit JAX: call '
                             'jax.config.update("jax_enable_x64", True) first.')
        if not isinstance(self.gated, (bool, np.bool_)):
            raise ValueError(f"{name}: gated must be True or False, got {self.gated!r}.")
        if not integer(self.random_state) or self.random_state < 0:
            raise ValueError(f"{name}: random_state must be a non-negative integer seed, got {self.random_state!r}.")
        if self.mesh is not None and not hasattr(self.mesh, "axis_names"):
            raise ValueError(f"{name}: mesh must be None or a jax Mesh, got {self.mesh!r}.")
        if self.rows_axis is not None and not isinstance(self.rows_axis, str):
            raise ValueError(f"{name}: rows_axis must be a mesh axis name or None, got {self.rows_axis!r}.")
        if self.mesh is not None and self.rows_axis is not None and self.rows_axis not in self.mesh.axis_names:
            raise ValueError(f"{name}: rows_axis {self.rows_axis!r} is not an axis of the mesh "
                             f"(axes {tuple(self.mesh.axis_names)}).")
        cache = self.compilation_cache
        if not isinstance(cache, (bool, np.bool_, str, os.PathLike)) or (isinstance(cache, str) and not cache):
            raise ValueError(f"{name}: compilation_cache must be True, False or a directory path, "
                             f"got {self.compilation_cache!r}.")

    def _config(self, problem):
        """The solver settings; an ADMMConfig's sketch rank is capped at d * P (the sketched operator's size)."""
        if self.solver == "jaxcld":
            return JaxcldConfig()
        if self.solver == "auto":
            config = default_config(problem, float(self.tol), self.dtype, max_iters=int(self.max_iter))
        else:
            config = ADMMConfig(dtype=self.dtype)
        size = problem.num_features * problem.num_patterns
        if isinstance(config, ADMMConfig) and config.rank > size:
            config = dataclasses.replace(config, rank=size)
        return config

    def fit(self, X, y, validation=None) -> "ConvexReLUClassifier":
        """Fits on (n, d) features and n labels of any hashable type; returns self.

        validation: optional (X_val, y_val) with labels among y's; fills `result_.history["val_accuracy"]`.
        """
        self._validate_params()
        X = np.asarray(X)
        labels = _as_labels(y)
        if X.ndim != 2:
            raise ValueError(f"X must be a 2-D array (n, d); got shape {X.shape}.")
        if len(labels) != X.shape[0]:
            raise ValueError(f"y has {len(labels)} labels but X has {X.shape[0]} rows; they must match.")
        classes = _sorted_classes(labels)
        if len(classes) < 2:
            raise ValueError(f"y holds a single class {classes}; a classifier needs at least two.")
        index = {c: i for i, c in enumerate(classes)}
        y_int = np.array([index[c] for c in labels], np.int32)
        if validation is not None:
            unknown = [c for c in dict.fromkeys(_as_labels(validation[1], "validation y")) if c not in index]
            if unknown:
                raise ValueError(f"validation labels {unknown[:5]} do not occur in y (classes {classes[:10]}).")
            validation = (np.asarray(validation[0], self.dtype),
                          np.array([index[c] for c in _as_labels(validation[1])], np.int32))
        if isinstance(self.compilation_cache, (str, os.PathLike)):
            enable_compilation_cache(self.compilation_cache)
        elif self.compilation_cache:
            enable_compilation_cache()
        X = X.astype(self.dtype)
        pattern_key, sketch_key = jax.random.split(jax.random.key(int(self.random_state)))
        patterns = np.asarray(sample_patterns(pattern_key, X, int(self.n_patterns)))
        gates = np.asarray(sample_gates(pattern_key, X.shape[1], int(self.n_patterns), dtype=X.dtype))
        program = GatedReLU if self.gated else ConvexReLU
        problem = program(X, y_int, patterns=patterns, beta=float(self.beta), gates=gates)
        result = solve(problem, self._config(problem), sketch_key, validation=validation, mesh=self.mesh,
                       rows_axis=self.rows_axis)
        self.result_: SolveResult = _host_result(result)
        self.classes_ = classes
        self.n_features_in_ = X.shape[1]
        self.n_iter_ = result.iterations
        self.converged_ = result.converged
        return self

    # --- prediction ------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "result_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet; call fit(X, y) first.")

    def decision_function(self, X) -> np.ndarray:
        """(n, C) class scores, columns in `classes_` order."""
        self._check_fitted()
        return np.asarray(self.result_.decision_function(np.asarray(X)))

    def predict(self, X) -> np.ndarray:
        """Predicted labels: a 1-D array of the training labels' values (object dtype for tuples and mixes)."""
        picked = [self.classes_[i] for i in self.decision_function(X).argmax(axis=1)]
        if all(isinstance(c, (int, float, str, np.generic)) for c in self.classes_):
            return np.asarray(picked)
        out = np.empty(len(picked), dtype=object)
        out[:] = picked
        return out

    def score(self, X, y) -> float:
        """Mean accuracy on (X, y)."""
        predicted = self.predict(X)
        return float(np.mean([p == t for p, t in zip(predicted.tolist(), _as_labels(y))]))
