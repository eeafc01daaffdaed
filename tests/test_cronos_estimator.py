"""cronos.ConvexReLUClassifier against scikit-learn's estimator conventions, and the persistent compilation cache."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from reference import cvxpy_optimum
from sklearn.base import clone, is_classifier
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.metrics import accuracy_score
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

import cronos
from cronos import estimator as estimator_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
                  "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(autouse=True)
def _isolated_compilation_cache(tmp_path, monkeypatch):
    """Default fits enable the persistent cache: point it at tmp_path and restore JAX's options afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    monkeypatch.setenv("CRONOS_COMPILATION_CACHE", str(tmp_path / "default_cache"))
    saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    yield
    changed = {name: value for name, value in saved.items() if getattr(jax.config, name) != value}
    for name, value in changed.items():
        jax.config.update(name, value)
    if changed:
        jax_cache.reset_cache()


def _blobs(n=80, d=5, seed=0):
    """Two well separated Gaussian blobs with integer labels 0/1."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.standard_normal((n, d)) + 2.0 * y[:, None]
    return X.astype(np.float32), y


def _problem_of(clf, X, y_int):
    """The convex program a fitted classifier solved, rebuilt from its documented seeds."""
    pattern_key, sketch_key = jax.random.split(jax.random.key(clf.random_state))
    X = np.asarray(X, clf.dtype)
    patterns = np.asarray(cronos.sample_patterns(pattern_key, X, clf.n_patterns))
    return cronos.ConvexReLU(X, y_int, patterns=patterns, beta=clf.beta), sketch_key


# --- behaviour carried over from tests/test_cronos.py ----------------------------------------------------------


def test_classifier_one_line_with_string_labels():
    X, y = load_breast_cancer(return_X_y=True)
    names = np.where(y == 1, "benign", "malignant")
    Xtr, Xte, ytr, yte = train_test_split(X, names, test_size=0.3, random_state=0, stratify=names)
    scaler = StandardScaler().fit(Xtr)
    clf = cronos.ConvexReLUClassifier(n_patterns=16, beta=1.0, random_state=0).fit(scaler.transform(Xtr), ytr)
    predicted = clf.predict(scaler.transform(Xte))
    assert clf.classes_ == ["benign", "malignant"]
    assert set(predicted.tolist()) <= {"benign", "malignant"}
    assert clf.score(scaler.transform(Xte), yte) == pytest.approx(accuracy_score(yte, predicted))
    assert accuracy_score(yte, predicted) > 0.92  # logistic regression: 0.959 on this split
    assert clf.result_.converged and clf.converged_
    assert clf.n_features_in_ == 30 and clf.n_iter_ == clf.result_.iterations


def test_classifier_multiclass_with_tuple_labels():
    X, y = load_iris(return_X_y=True)
    labels = [("iris", int(k)) for k in y]
    clf = cronos.ConvexReLUClassifier(n_patterns=16, beta=1e-2).fit(X, labels)
    assert clf.classes_ == [("iris", 0), ("iris", 1), ("iris", 2)]
    assert clf.decision_function(X).shape == (150, 3)
    predicted = clf.predict(X)
    assert predicted.dtype == object and predicted.shape == (150,) and predicted[0] in clf.classes_
    assert clf.score(X, labels) > 0.9


def test_unorderable_labels_keep_first_appearance_order():
    X, y = _blobs()
    labels = [("b", 1) if k else "a" for k in y]  # a str and a tuple do not compare
    clf = cronos.ConvexReLUClassifier(n_patterns=8, beta=1e-2).fit(X, labels)
    assert clf.classes_ == ["a", ("b", 1)]
    assert clf.score(X, labels) > 0.9


# --- the default path is the fast exact solve ---------------------------------------------------------------------


def test_default_estimator_is_the_exact_default_solve_and_reaches_the_cvxpy_optimum():
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((60, 4)).astype(np.float32), rng.integers(0, 2, 60)  # overlapping classes
    clf = cronos.ConvexReLUClassifier(n_patterns=8, beta=1e-2)
    assert (clf.tol, clf.max_iter, clf.solver, clf.dtype) == (1e-4, 3000, "auto", "float32")
    clf.fit(X, y)
    problem, sketch_key = _problem_of(clf, X, y)
    direct = cronos.solve(problem, tol=1e-4, key=sketch_key)
    assert clf.result_.iterations == direct.iterations and clf.result_.converged
    np.testing.assert_array_equal(clf.result_.v, np.asarray(direct.v))
    np.testing.assert_array_equal(clf.result_.w, np.asarray(direct.w))
    np.testing.assert_array_equal(clf.predict(X), np.asarray(direct.predict(X)))
    reference, _ = cvxpy_optimum(problem.X, problem.Y, problem.patterns, clf.beta, cone=True, tol=1e-8)
    ours = cronos.objective(problem, clf.result_.v, clf.result_.w)
    assert abs(ours - reference) <= 1e-3 * abs(reference), (ours, reference, clf.n_iter_)
    assert cronos.constraint_violation(problem, clf.result_.v, clf.result_.w) <= 1e-4


def test_solver_choices_pick_their_configs(monkeypatch):
    X, y = _blobs()
    fixed = cronos.ConvexReLUClassifier(n_patterns=8, solver="fixed").fit(X, y)
    problem, sketch_key = _problem_of(fixed, X, y)
    published = cronos.solve(problem, cronos.ADMMConfig(), key=sketch_key)
    assert fixed.n_iter_ == 6 and not fixed.converged_  # 6 ADMM x 32 PCG
    np.testing.assert_array_equal(fixed.result_.v, np.asarray(published.v))

    capped = cronos.ConvexReLUClassifier(n_patterns=8, beta=1e-4, tol=1e-12, max_iter=7).fit(X, y)
    assert capped.n_iter_ == 7 and not capped.converged_

    seen = []

    def record(problem, config, key=None, **kwargs):
        seen.append(config)
        raise RuntimeError("recorded")

    monkeypatch.setattr(estimator_module, "solve", record)
    for solver in ("auto", "jaxcld"):
        with pytest.raises(RuntimeError, match="recorded"):
            cronos.ConvexReLUClassifier(n_patterns=8, solver=solver, tol=1e-5, max_iter=123).fit(X, y)
    assert seen[0] == cronos.default_config(problem, 1e-5, "float32", max_iters=123)
    assert seen[1] == cronos.JaxcldConfig()


def test_validation_labels_are_mapped_and_checked():
    X, y = _blobs()
    names = np.where(y == 1, "yes", "no")
    clf = cronos.ConvexReLUClassifier(n_patterns=8, beta=1e-2).fit(X[:60], names[:60], validation=(X[60:], names[60:]))
    assert clf.result_.history["val_accuracy"][-1] > 0.9
    with pytest.raises(ValueError, match="do not occur in y"):
        cronos.ConvexReLUClassifier(n_patterns=8).fit(X, names, validation=(X, ["maybe"] * len(X)))


# --- scikit-learn conventions -----------------------------------------------------------------------------------


def test_get_params_set_params_round_trip():
    clf = cronos.ConvexReLUClassifier()
    params = clf.get_params()
    assert params == {"n_patterns": 64, "beta": 1e-3, "tol": 1e-4, "max_iter": 3000, "solver": "auto",
                      "dtype": "float32", "gated": False, "random_state": 0, "mesh": None, "rows_axis": "data",
                      "compilation_cache": True}
    assert clf.get_params(deep=False) == params
    new = {"n_patterns": 8, "beta": 0.5, "tol": 1e-3, "max_iter": 10, "solver": "fixed", "dtype": "float64",
           "gated": True, "random_state": 3, "compilation_cache": False}
    assert clf.set_params(**new) is clf
    assert clf.get_params() == {**params, **new}
    assert cronos.ConvexReLUClassifier(**clf.get_params()).get_params() == clf.get_params()
    with pytest.raises(ValueError, match="Invalid parameter 'alpha'"):
        clf.set_params(alpha=1.0)
    assert repr(cronos.ConvexReLUClassifier(beta=0.5, solver="fixed")) == "ConvexReLUClassifier(beta=0.5, solver='fixed')"


def test_init_only_stores_and_fit_validates():
    clf = cronos.ConvexReLUClassifier(n_patterns=-1, solver="bogus")  # no validation in __init__
    assert clf.n_patterns == -1 and clf.solver == "bogus"
    assert not hasattr(clf, "classes_")


@pytest.mark.parametrize("params, message", [
    (dict(solver="newton"), r"solver must be one of \('auto', 'fixed', 'jaxcld'\)"),
    (dict(n_patterns=0), "n_patterns must be a positive integer"),
    (dict(n_patterns=2.5), "n_patterns must be a positive integer"),
    (dict(n_patterns=True), "n_patterns must be a positive integer"),
    (dict(beta=-1.0), "beta must be a finite non-negative"),
    (dict(beta=float("nan")), "beta must be a finite non-negative"),
    (dict(tol=0.0), "tol must be a positive number"),
    (dict(tol=None), "tol must be a positive number"),
    (dict(max_iter=0), "max_iter must be a positive integer"),
    (dict(dtype="float16"), "dtype must be 'float32' or 'float64'"),
    (dict(dtype="float64"), "jax_enable_x64"),
    (dict(gated="yes"), "gated must be True or False"),
    (dict(random_state=-1), "random_state must be a non-negative integer"),
    (dict(random_state=None), "random_state must be a non-negative integer"),
    (dict(mesh="data"), "mesh must be None or a jax Mesh"),
    (dict(rows_axis=0), "rows_axis must be a mesh axis name or None"),
    (dict(compilation_cache=""), "compilation_cache must be"),
])
def test_bad_parameters_raise_at_fit(params, message):
    X, y = _blobs()
    clf = cronos.ConvexReLUClassifier(**params)
    with pytest.raises(ValueError, match=message):
        clf.fit(X, y)
    assert not hasattr(clf, "result_")


def test_rows_axis_must_name_a_mesh_axis():
    X, y = _blobs()
    clf = cronos.ConvexReLUClassifier(mesh=jax.make_mesh((1,), ("data",)), rows_axis="rows")
    with pytest.raises(ValueError, match=r"rows_axis 'rows' is not an axis of the mesh \(axes \('data',\)\)"):
        clf.fit(X, y)


def test_fixed_solver_ignores_tol_and_max_iter():
    X, y = _blobs()
    clf = cronos.ConvexReLUClassifier(n_patterns=8, solver="fixed", tol=None, max_iter=None).fit(X, y)
    assert clf.n_iter_ == 6


@pytest.mark.parametrize("X, y, message", [
    (np.zeros((10, 2, 2)), np.arange(10) % 2, "2-D"),
    (np.zeros((10, 2)), np.arange(9) % 2, "9 labels but X has 10"),
    (np.zeros((10, 2)), np.zeros(10), "single class"),
    (np.zeros((10, 2)), np.zeros((10, 2)), "1-D"),
    (np.zeros((2, 2)), [[0], [1]], "hashable"),
])
def test_bad_data_raises_a_clear_value_error(X, y, message):
    with pytest.raises(ValueError, match=message):
        cronos.ConvexReLUClassifier().fit(X, y)


def test_not_fitted_error_before_fit():
    clf = cronos.ConvexReLUClassifier()
    for method in (clf.predict, clf.decision_function):
        with pytest.raises(cronos.NotFittedError, match="not fitted yet"):
            method(np.zeros((2, 3)))
    with pytest.raises(cronos.NotFittedError):
        clf.score(np.zeros((2, 3)), [0, 1])
    assert issubclass(cronos.NotFittedError, ValueError) and issubclass(cronos.NotFittedError, AttributeError)
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(clf)
    X, y = _blobs()
    check_is_fitted(clf.fit(X, y))
    assert is_classifier(clf)


def test_clone_has_equal_params_and_is_unfitted():
    X, y = _blobs()
    clf = cronos.ConvexReLUClassifier(n_patterns=8, beta=0.05, random_state=4).fit(X, y)
    copy = clone(clf)
    assert copy is not clf and copy.get_params() == clf.get_params()
    assert not any(hasattr(copy, a) for a in ("classes_", "n_features_in_", "result_"))
    with pytest.raises(cronos.NotFittedError):
        copy.predict(X)
    np.testing.assert_array_equal(copy.fit(X, y).predict(X), clf.predict(X))


def test_grid_search_over_beta():
    X, y = _blobs(n=80)
    search = GridSearchCV(cronos.ConvexReLUClassifier(n_patterns=8), {"beta": [1e-3, 1e-1]}, cv=2, error_score="raise")
    search.fit(X, y)
    assert search.cv_results_["param_beta"].tolist() == [1e-3, 1e-1]
    assert search.best_params_["beta"] in (1e-3, 1e-1)
    assert np.all(search.cv_results_["mean_test_score"] > 0.8)
    assert search.best_estimator_.beta == search.best_params_["beta"]
    assert search.score(X, y) == pytest.approx(accuracy_score(y, search.predict(X)))

    # n_patterns=2 on d=5 features: d * P = 10 is below the default sketch rank 20, which the estimator caps
    by_patterns = GridSearchCV(cronos.ConvexReLUClassifier(beta=1e-2), {"n_patterns": [2, 8]}, cv=2,
                               error_score="raise").fit(X, y)
    assert by_patterns.best_estimator_.result_.v.shape[2] == by_patterns.best_params_["n_patterns"]
    assert np.all(np.isfinite(by_patterns.cv_results_["mean_test_score"]))


def test_pickle_round_trip_of_a_fitted_estimator():
    X, y = _blobs()
    names = np.where(y == 1, "yes", "no")
    clf = cronos.ConvexReLUClassifier(n_patterns=8, beta=1e-2).fit(X, names)
    assert isinstance(clf.result_.v, np.ndarray) and isinstance(clf.result_.w, np.ndarray)
    back = pickle.loads(pickle.dumps(clf))
    assert back.get_params() == clf.get_params() and back.classes_ == clf.classes_
    np.testing.assert_array_equal(back.predict(X), clf.predict(X))
    np.testing.assert_array_equal(back.decision_function(X), clf.decision_function(X))

    fixed = cronos.ConvexReLUClassifier(n_patterns=8, solver="fixed").fit(X, y)
    assert fixed.result_.flops["total"] > 0  # the in-process FLOP counter still works after fit
    assert pickle.loads(pickle.dumps(fixed)).result_.flops == fixed.result_.flops  # computed before pickling: kept

    gated = cronos.ConvexReLUClassifier(n_patterns=8, gated=True).fit(X, y)
    fresh = pickle.loads(pickle.dumps(gated))
    assert fresh.result_.w is None and isinstance(fresh.result_.gates, np.ndarray)
    np.testing.assert_array_equal(fresh.decision_function(X), gated.decision_function(X))
    with pytest.raises(RuntimeError, match="not kept when a fitted ConvexReLUClassifier is pickled"):
        _ = fresh.result_.flops
    assert pickle.loads(pickle.dumps(cronos.ConvexReLUClassifier(beta=0.3))).get_params()["beta"] == 0.3


def test_one_device_mesh_fits_clones_and_pickles():
    mesh = jax.make_mesh((1,), ("samples",))
    X, y = _blobs()
    clf = cronos.ConvexReLUClassifier(n_patterns=8, beta=1e-2, mesh=mesh, rows_axis="samples").fit(X, y)
    plain = cronos.ConvexReLUClassifier(n_patterns=8, beta=1e-2).fit(X, y)
    np.testing.assert_allclose(clf.decision_function(X), plain.decision_function(X), rtol=1e-4, atol=1e-4)
    assert clone(clf).mesh == mesh and clone(clf).rows_axis == "samples"
    back = pickle.loads(pickle.dumps(clf))
    assert back.mesh == mesh and back.rows_axis == "samples"
    np.testing.assert_array_equal(back.predict(X), clf.predict(X))
    back.fit(X, y)  # the rebuilt mesh is usable

    state = clf.__getstate__()
    state["mesh"]["device_ids"] = state["mesh"]["device_ids"] + 10_000  # devices this process does not have
    lost = cronos.ConvexReLUClassifier.__new__(cronos.ConvexReLUClassifier)
    with pytest.warns(RuntimeWarning, match="mesh set to None"):
        lost.__setstate__(state)
    assert lost.mesh is None
    np.testing.assert_array_equal(lost.predict(X), clf.predict(X))


# --- the persistent compilation cache ---------------------------------------------------------------------------


def test_enable_compilation_cache_is_idempotent_and_configures_jax(tmp_path):
    first = cronos.enable_compilation_cache(tmp_path / "a")
    assert first == str(tmp_path / "a") and os.path.isdir(first)
    assert jax.config.jax_compilation_cache_dir == first
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
    assert cronos.enable_compilation_cache(first) == first
    assert cronos.enable_compilation_cache() == first  # None keeps the directory JAX already uses
    jax.jit(lambda x: x * 3.0 + 1.0)(np.ones(3, np.float32)).block_until_ready()
    assert os.listdir(first)
    second = cronos.enable_compilation_cache(str(tmp_path / "b"))
    assert jax.config.jax_compilation_cache_dir == second == str(tmp_path / "b")
    jax.jit(lambda x: x * 5.0 - 2.0)(np.ones(3, np.float32)).block_until_ready()
    assert os.listdir(second)  # the cache followed the new directory


def test_default_directory_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CRONOS_COMPILATION_CACHE", str(tmp_path / "env"))
    assert cronos.compilation_cache.default_directory() == str(tmp_path / "env")
    monkeypatch.delenv("CRONOS_COMPILATION_CACHE")
    assert cronos.compilation_cache.default_directory() == os.path.expanduser("~/.cache/cronos/jax")


def test_estimator_enables_the_cache_only_when_asked(tmp_path):
    X, y = _blobs()
    before = jax.config.jax_compilation_cache_dir
    cronos.ConvexReLUClassifier(n_patterns=8, compilation_cache=False).fit(X, y)
    assert jax.config.jax_compilation_cache_dir == before
    cronos.ConvexReLUClassifier(n_patterns=8, compilation_cache=str(tmp_path / "fit")).fit(X, y)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "fit")


_SOLVE_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import json, os
    import jax, numpy as np
    import cronos

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 6)).astype(np.float32)
    y = (X[:, 0] + 0.3 * rng.standard_normal(80) > 0).astype(int)
    clf = cronos.ConvexReLUClassifier(n_patterns=8, beta=1e-2).fit(X, y)  # enables $CRONOS_COMPILATION_CACHE
    print(json.dumps({"directory": jax.config.jax_compilation_cache_dir, "hits": len(hits),
                      "compile_seconds": clf.result_.compile_seconds, "iterations": clf.n_iter_}))
""")


def test_compilation_cache_is_reused_by_a_fresh_process(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, CRONOS_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    def run():
        out = subprocess.run([sys.executable, "-c", _SOLVE_IN_A_FRESH_PROCESS], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run()
    entries = set(os.listdir(cache))
    second = run()
    assert first["directory"] == second["directory"] == str(cache)
    assert any("solve_impl" in name for name in entries), sorted(entries)
    assert first["hits"] == 0 and second["hits"] > 0
    assert set(os.listdir(cache)) == entries  # the second process compiled nothing new
    assert second["iterations"] == first["iterations"]
    # behaviour, not a performance target: loading an executable is far cheaper than compiling it
    assert second["compile_seconds"] < 0.5 * first["compile_seconds"], (first, second)


_BINARY_FLAG = textwrap.dedent("""
    import json, sys
    import jax
    from absl import flags
    from experiments import train_cld  # noqa: F401  (defines the shared flags through runtime_flags)
    from experiments.lib import runtime_flags
    flags.FLAGS(["binary", *sys.argv[1:]])
    print(json.dumps({"returned": runtime_flags.enable_compilation_cache(),
                      "jax": jax.config.jax_compilation_cache_dir}))
""")


@pytest.mark.parametrize("argv, expected", [([], "env"), (["--compilation_cache_dir={tmp}/flag"], "flag"),
                                             (["--compilation_cache_dir="], None)])
def test_binaries_compilation_cache_flag(tmp_path, argv, expected):
    env = dict(os.environ, CRONOS_COMPILATION_CACHE=str(tmp_path / "env"), JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", _BINARY_FLAG, *[a.format(tmp=tmp_path) for a in argv]], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = None if expected is None else str(tmp_path / expected)
    assert got == {"returned": want, "jax": want}
