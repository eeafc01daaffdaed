"""heads/: legacy jaxcld pickles (restricted unpickling), safe format, cronos head, NN resume, linear head."""

import ast
import inspect
import json
import os
import pickle
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from reference import cvxpy_optimum
from sklearn.linear_model import LogisticRegression
from training_testutil import killed_after

import cronos
import heads.baselines
import heads.legacy
from heads import ConvexReLUHead, LinearHead, NNHead, load_head
from heads.legacy import RefusedGlobalError, convert, load_legacy_pickle

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
LEGACY_PKL = os.path.join(FIXTURES, "jaxcld_cvx_relu_mlp.pkl")
LEGACY_REF = os.path.join(FIXTURES, "jaxcld_reference.npz")


def _data(n=150, d=12, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centers = 1.2 * rng.standard_normal((classes, d))
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


@pytest.fixture(scope="module")
def fitted():
    """One head of each kind on the same 3-language data."""
    X, y = _data(classes=3)
    langs = ["zh", "en", "hi"]  # unsorted on purpose: label c is sorted(langs)[c]
    return X, y, {
        "convex": ConvexReLUHead.fit(X, y, languages=langs, n_patterns=8, rank=8, seed=3),
        "nn": NNHead.fit(X, y, languages=langs, hidden=32, epochs=10, batch_size=32, learning_rate=1e-2, seed=0),
        "linear": LinearHead.fit(X, y, languages=langs),
    }


# ---------------------------------------------------------------- legacy jaxcld pickles


def test_legacy_pickle_logits_equal_jaxcld_stacked_predict(tmp_path):
    """Logits of a released-style jaxcld pickle equal jaxcld's own `stacked_predict`: run here, to float32
    rounding (GEMM kernels round differently across CPUs), and as recorded when the fixture was made."""
    from jaxcld.models.cvx_relu_mlp import CVX_ReLU_MLP

    ref = np.load(LEGACY_REF)
    record = load_legacy_pickle(LEGACY_PKL)
    jaxcld_model = CVX_ReLU_MLP(ref["X_test"], np.zeros(len(ref["X_test"]), int), 2, record["P_S"], record["beta"],
                                record["rho"], jax.random.PRNGKey(0))
    jaxcld_logits = np.asarray(jaxcld_model.stacked_predict(ref["X_test"], record["theta1"], record["theta2"]))
    head = ConvexReLUHead.load(LEGACY_PKL)
    assert head.languages == ("en", "zh") and head.embedding_dim == 16
    ours = np.asarray(head.logits(ref["X_test"]))
    np.testing.assert_allclose(ours, jaxcld_logits, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours, ref["logits"], rtol=1e-6, atol=1e-7)
    # Conversion to the safe format keeps the weights bit for bit and drops the training set.
    convert(LEGACY_PKL, str(tmp_path / "converted"), languages=["zh", "en"], metrics={"accuracy": 1.0})
    loaded = ConvexReLUHead.load(str(tmp_path / "converted"))
    np.testing.assert_array_equal(np.asarray(loaded.params["W1"]), record["theta1"])
    np.testing.assert_array_equal(np.asarray(loaded.params["w2"]), record["theta2"])
    assert set(loaded.params) == {"W1", "w2"}
    assert loaded.metadata["hyperparameters"] == {"n_patterns": 4, "beta": 1e-3, "rho": 0.1}
    assert loaded.metadata["metrics"] == {"accuracy": 1.0}
    assert loaded.predict_languages(ref["X_test"]) == [("en", "zh")[i] for i in ref["logits"].argmax(1)]


def test_legacy_pickle_against_live_jaxcld():
    # jaxcld==0.2.4 is installed with --no-deps by README's test command (its jax pin is old; this class needs
    # only jax and numpy)
    import jaxcld.models.cvx_relu_mlp  # noqa: F401  (the pickle's class)

    with open(LEGACY_PKL, "rb") as f:  # our own fixture: trusted, so the real unpickler is fine here
        model = pickle.load(f)
    X = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float32)
    live = np.asarray(model.stacked_predict(jax.numpy.asarray(X), model.theta1, model.theta2))
    np.testing.assert_array_equal(ConvexReLUHead.load(LEGACY_PKL).logits(X), live)


def test_legacy_needs_languages_matching_class_count(tmp_path):
    with pytest.raises(ValueError, match="2 classes but 3 languages"):
        ConvexReLUHead.load(LEGACY_PKL, languages=["en", "hi", "zh"])
    record = load_legacy_pickle(LEGACY_PKL)
    assert record["theta1"].shape == (2, 16, 8) and record["theta2"].shape == (2, 8)


def test_legacy_metadata_is_the_convex_heads_and_imports_are_one_way():
    head = ConvexReLUHead.from_legacy(LEGACY_PKL, encoder="whisper-small")
    expected = ConvexReLUHead.make_metadata(
        ("en", "zh"), 16, hyperparameters={"n_patterns": 4, "beta": 1e-3, "rho": 0.1}, seeds={},
        encoder="whisper-small", pooling="mean", trainer="jaxcld 0.2.4 (converted legacy pickle)",
        source="fixtures/jaxcld_cvx_relu_mlp.pkl")
    assert head.metadata == expected
    # heads.legacy only parses; heads.convex builds heads from it and is never imported by it
    source = inspect.getsource(heads.legacy)
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert not any(name.startswith("heads.convex") for name in imported), imported


class _Shell:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _fake_cvx_class(monkeypatch):
    """A class pickled under jaxcld's module/name, so a crafted file can start like a real head. The fake
    module and its parent packages replace any installed jaxcld for the test (pickle imports the module)."""
    for name in ("jaxcld", "jaxcld.models"):
        package = types.ModuleType(name)
        package.__path__ = []
        monkeypatch.setitem(sys.modules, name, package)
    module = types.ModuleType("jaxcld.models.cvx_relu_mlp")
    cls = type("CVX_ReLU_MLP", (), {"__module__": module.__name__})
    module.CVX_ReLU_MLP = cls
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(sys.modules["jaxcld.models"], "cvx_relu_mlp", module, raising=False)
    monkeypatch.setattr(sys.modules["jaxcld"], "models", sys.modules["jaxcld.models"], raising=False)
    return cls


@pytest.mark.parametrize("attack", ["os.system", "subprocess.Popen", "builtins.exec", "nested os.system"])
def test_legacy_refuses_other_globals_without_executing(tmp_path, monkeypatch, attack):
    sentinel = tmp_path / "pwned"
    command = f"touch {sentinel}"
    if attack == "subprocess.Popen":
        payload, refused = _Shell(subprocess.Popen, (["touch", str(sentinel)],)), "subprocess.Popen"
    elif attack == "builtins.exec":
        payload, refused = _Shell(exec, (f"open({str(sentinel)!r}, 'w').close()",)), "builtins.exec"
    else:
        payload, refused = _Shell(os.system, (command,)), f"{os.name == 'nt' and 'nt' or 'posix'}.system"
    if attack.startswith("nested"):
        model = _fake_cvx_class(monkeypatch)()
        model.theta1, model.theta2 = np.zeros((2, 3, 4), np.float32), payload
        payload = model
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(RefusedGlobalError, match=refused.replace(".", r"\.")):
        ConvexReLUHead.load(str(path))
    assert not sentinel.exists()


# ---------------------------------------------------------------- safe format, all heads


@pytest.mark.parametrize("kind", ["convex", "nn", "linear"])
def test_save_load_round_trip(fitted, tmp_path, kind):
    X, y, all_heads = fitted
    head = all_heads[kind]
    assert head.languages == ("en", "hi", "zh") and head.embedding_dim == X.shape[1]
    # every head fits the blobs about as well as scikit-learn's logistic regression
    assert np.mean(head.predict(X) == y) >= LogisticRegression(max_iter=1000).fit(X, y).score(X, y) - 0.05
    head.save(str(tmp_path), metrics={"val_accuracy": 0.5})
    assert sorted(os.listdir(tmp_path)) == ["head.json", "head.safetensors"]
    with open(tmp_path / "head.json") as f:
        meta = json.load(f)
    assert meta["head_type"] == head.head_type and meta["languages"] == ["en", "hi", "zh"]
    assert meta["embedding_dim"] == X.shape[1] and meta["pooling"] == "mean" and meta["metrics"] == {"val_accuracy": 0.5}
    assert "hyperparameters" in meta and "seeds" in meta
    loaded = type(head).load(str(tmp_path))
    np.testing.assert_array_equal(loaded.logits(X), head.logits(X))
    np.testing.assert_array_equal(load_head(str(tmp_path)).logits(X), head.logits(X))
    other = LinearHead if kind != "linear" else NNHead
    with pytest.raises(ValueError, match="head"):
        other.load(str(tmp_path))


def test_convex_head_solved_to_tolerance_predicts_like_the_cvxpy_optimum():
    """The head's two-layer ReLU network, fitted to tolerance, gives the logits of the exact optimum of the same
    convex program (same activation patterns) solved by CVXPY/Clarabel in float64."""
    X, y = _data(n=90, d=6, classes=3)
    head = ConvexReLUHead.fit(X, y, languages=["en", "hi", "zh"], n_patterns=6, rank=8, seed=3, admm_iters=4000,
                              pcg_iters=100, tol=1e-6)
    pattern_key, _ = jax.random.split(jax.random.key(3))  # the head's pattern draw for seed 3
    D = np.asarray(cronos.sample_patterns(pattern_key, X, 6))
    Y = np.asarray(cronos.encode_targets(y), np.float64)
    optimum, weights = cvxpy_optimum(X, Y, D, 1e-3, cone=True)
    relu = lambda a: np.maximum(a, 0.0)
    X64 = X.astype(np.float64)
    expected = np.stack([(relu(X64 @ v) - relu(X64 @ w)).sum(1) for v, w in weights], axis=1)
    # the network's weight-decay objective (Theorem 1 scaling) from the stored weights, in NumPy
    W1, w2 = (head.params[k].astype(np.float64) for k in ("W1", "w2"))
    logits = np.stack([relu(X64 @ W1[c]) @ w2[c] for c in range(3)], axis=1)
    network = 0.5 * np.sum((logits - Y) ** 2) + 1e-3 / 2 * (np.sum(W1**2) + np.sum(w2**2))
    assert abs(network - optimum) <= 1e-3 * optimum, (network, optimum)
    np.testing.assert_allclose(head.logits(X), expected, atol=2e-2 * np.abs(expected).max())
    assert np.array_equal(head.predict(X), expected.argmax(1))
    info = head.train_info
    assert info["admm_iterations"] > 6
    # XLA's FLOP count compiles three more executables, timed apart from the solve's compile and run
    assert info["flops"] > 0 and info["run_seconds"] > 0 and info["flop_count_seconds"] > 0


def test_convex_head_records_validation_accuracy_per_admm_iteration():
    X, y = _data(classes=3)
    Xv, yv = _data(n=60, classes=3, seed=1)
    langs = ["en", "hi", "zh"]
    head = ConvexReLUHead.fit(X, y, languages=langs, n_patterns=8, rank=8, seed=3, validation=(Xv, yv))
    history = head.train_info["val_accuracy_history"]
    assert len(history) == 6
    assert history[-1] == pytest.approx(float(np.mean(head.predict(Xv) == yv)))


def test_iso_code_labels_equal_integer_labels(fitted):
    X, y, all_heads = fitted
    codes = [("en", "hi", "zh")[i] for i in y]
    head = LinearHead.fit(X, codes, languages=["hi", "zh", "en"])
    np.testing.assert_allclose(head.logits(X), all_heads["linear"].logits(X), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- baselines


def test_nn_head_resumes_to_identical_params(tmp_path, monkeypatch):
    X, y = _data(n=100, d=8)
    args = dict(languages=["en", "zh"], hidden=16, epochs=3, batch_size=16, seed=5)  # 7 steps/epoch, last one short
    reference = NNHead.fit(X, y, **args)
    ckpt = str(tmp_path / "ckpt")
    with killed_after(monkeypatch, heads.baselines, 9):
        NNHead.fit(X, y, checkpoint_dir=ckpt, checkpoint_every=4, **args)
    assert sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) == [4, 8]  # resumes mid-epoch 2
    resumed = NNHead.fit(X, y, checkpoint_dir=ckpt, checkpoint_every=4, **args)
    assert resumed.train_info["steps"] == reference.train_info["steps"] == 21
    assert len(resumed.train_info["losses"]) == 21 - 8
    for name in reference.params:
        np.testing.assert_array_equal(resumed.params[name], reference.params[name])
    with pytest.raises(ValueError, match="different run"):
        NNHead.fit(X, y, checkpoint_dir=ckpt, **{**args, "seed": 6})


def test_nn_and_convex_heads_on_meshes_and_rules_equal_no_mesh(tmp_path):
    code = """
import sys
import numpy as np
from encoders import runtime
from heads import ConvexReLUHead, NNHead
rng = np.random.default_rng(0)
y = np.arange(100) % 3
x = (1.2 * rng.standard_normal((3, 8))[y] + rng.standard_normal((100, 8))).astype(np.float32)
langs = ["en", "hi", "zh"]
kw = dict(languages=langs, hidden=16, epochs=3, batch_size=16, seed=5)  # 7 steps/epoch; the last 4 rows -> 8 on 8
nn_ref = NNHead.fit(x, y, **kw)
cvx_ref = ConvexReLUHead.fit(x, y, languages=langs, n_patterns=8, rank=8, seed=3)
for model, rules in ((1, None), (4, {"batch": "model", "rows": "model"}), (2, {"batch": None, "rows": None})):
    runtime.set_rules(rules)
    mesh = runtime.create_mesh(model=model)
    ckpt = f"{sys.argv[1]}/nn{model}"
    nn = NNHead.fit(x, y, mesh=mesh, checkpoint_dir=ckpt, checkpoint_every=4, **kw)
    again = NNHead.fit(x, y, mesh=mesh, checkpoint_dir=ckpt, checkpoint_every=4, **kw)  # restores the last step
    assert again.train_info["losses"] == [], again.train_info
    np.testing.assert_allclose(nn.train_info["losses"], nn_ref.train_info["losses"], rtol=1e-5)
    for name in nn_ref.params:
        np.testing.assert_allclose(nn.params[name], nn_ref.params[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(again.params[name], nn.params[name])
    cvx = ConvexReLUHead.fit(x, y, languages=langs, n_patterns=8, rank=8, seed=3, mesh=mesh)
    scale = np.abs(cvx_ref.logits(x)).max()
    np.testing.assert_allclose(cvx.logits(x), cvx_ref.logits(x), rtol=0, atol=1e-3 * scale)
print("ok")
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_linear_head_matches_sklearn():
    X, y = _data(n=400, d=20, classes=5, seed=2)
    Xtr, ytr, Xte, yte = X[:300], y[:300], X[300:], y[300:]
    head = LinearHead.fit(Xtr, ytr, languages=["en", "hi", "id", "ms", "zh"], C=1.0)
    sk = LogisticRegression(C=1.0, max_iter=2000, tol=1e-8).fit(Xtr, ytr)
    ours, theirs = np.mean(head.predict(Xte) == yte), sk.score(Xte, yte)
    assert abs(ours - theirs) <= 0.01, (ours, theirs)
    assert np.mean(head.predict(Xte) == sk.predict(Xte)) >= 0.98
    np.testing.assert_allclose(head.params["coef"] - head.params["coef"].mean(0), sk.coef_ - sk.coef_.mean(0), atol=2e-2)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors(fitted):
    X, y, all_heads = fitted
    head = all_heads["convex"]
    with pytest.raises(ValueError, match=r"expects d=12.*d=5"):
        head.logits(np.zeros((2, 5), np.float32))
    bad = X[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        head.predict(bad)
    for fit in (ConvexReLUHead.fit, NNHead.fit, LinearHead.fit):
        with pytest.raises(ValueError, match="NaN"):
            fit(np.where(np.arange(X.shape[0])[:, None] == 4, np.nan, X), y, languages=["en", "hi", "zh"])
        with pytest.raises(ValueError, match=r"unknown language code.*'xx'"):
            fit(X, y, languages=["en", "xx", "zh"])
        with pytest.raises(ValueError, match=r"no training examples for language\(s\) \['hi'\]"):
            fit(X, np.where(y == 1, 0, y), languages=["en", "hi", "zh"])
    with pytest.raises(ValueError, match=r"unknown label language\(s\) \['fr'\]"):
        LinearHead.fit(X, ["fr"] + ["en", "hi", "zh"] * 49 + ["en", "hi"], languages=["en", "hi", "zh"])
    with pytest.raises(ValueError, match="distinct"):
        LinearHead.fit(X, y, languages=["en", "en", "zh"])
    with pytest.raises(ValueError, match=r"0\.\.2"):
        LinearHead.fit(X, y + 1, languages=["en", "hi", "zh"])


def test_legacy_array_record_must_use_numpy_reconstruct(tmp_path):
    from jax._src.array import _reconstruct_array

    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(_Shell(_reconstruct_array, (np.dtype, ("f4",), None, {}))))
    with pytest.raises(pickle.UnpicklingError, match="expected numpy's _reconstruct"):
        load_legacy_pickle(str(path))


@pytest.mark.parametrize("input_norm", ["center", "standardize"])
def test_input_norm_equals_sklearn_scaler_then_plain_head(input_norm, tmp_path):
    """A head with stored input statistics equals the same head fitted on scikit-learn-scaled data."""
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    X = rng.standard_normal((120, 6)) * np.array([30.0, 0.1, 5, 1, 2, 0.5]) + 40.0  # large offset, anisotropic
    y = ((X[:, 1] - 40) * 10 + (X[:, 3] - 40) > 0).astype(int)
    Xtest = rng.standard_normal((30, 6)) * 3 + 40.0
    scaler = StandardScaler(with_std=input_norm == "standardize").fit(X)
    stored = LinearHead.fit(X, y, ["en", "zh"], input_norm=input_norm)
    stored.save(str(tmp_path / "h"))
    reloaded = load_head(str(tmp_path / "h"))
    plain = LinearHead.fit(scaler.transform(X), y, ["en", "zh"])
    np.testing.assert_allclose(reloaded.logits(Xtest), plain.logits(scaler.transform(Xtest)), rtol=1e-4, atol=1e-4)
    assert reloaded.metadata["input_norm"] == input_norm
    with pytest.raises(ValueError, match="input_norm must be one of"):
        LinearHead.fit(X, y, ["en", "zh"], input_norm="whiten")


def test_saved_head_refuses_mismatched_files(fitted, tmp_path):
    """head.json edited to other languages, a weights file from another save, or shapes that do not fit."""
    head = fitted[2]["linear"]
    path = str(tmp_path / "h")
    head.save(path)
    meta_path = os.path.join(path, "head.json")
    original = json.load(open(meta_path))
    edited = {**original, "languages": sorted(["hi", "id", "ms", "ja", "ko"][: len(original["languages"])])}
    json.dump(edited, open(meta_path, "w"))
    with pytest.raises(ValueError, match="label order would be wrong"):
        load_head(path)
    json.dump(original, open(meta_path, "w"))
    other = LinearHead(head.params | {"intercept": head.params["intercept"] + 1.0}, head.metadata)
    other.save(str(tmp_path / "other"))
    os.replace(os.path.join(tmp_path, "other", "head.safetensors"), os.path.join(path, "head.safetensors"))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        load_head(path)
    with pytest.raises(ValueError, match="outputs but the head has"):
        LinearHead(head.params, {**head.metadata, "languages": ["en", "hi", "ms", "zh"]})
    with pytest.raises(ValueError, match="do not take"):
        LinearHead(head.params, {**head.metadata, "embedding_dim": head.embedding_dim + 1})


def test_atomic_write_keeps_the_old_file_when_killed_before_the_rename(tmp_path, monkeypatch):
    import heads.io

    path = tmp_path / "train_config.json"
    heads.io.atomic_write_text(str(path), '{"run": 1}')
    assert json.loads(path.read_text()) == {"run": 1}

    def killed(src, dst):
        raise KeyboardInterrupt("killed between the write and the rename")

    monkeypatch.setattr(heads.io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        heads.io.atomic_write_text(str(path), '{"run": 2, "half": "written"}')
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"run": 1}  # the old file, whole
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "train_config.json"]
    assert all(name.endswith(".tmp") for name in leftovers)  # the new bytes only ever went to a temporary file


@pytest.mark.parametrize("kind", ["convex", "nn", "linear"])
def test_non_finite_weights_are_never_saved(fitted, tmp_path, kind):
    """A diverged training (NaN weights) must not leave a head on disk (issue 16: a NaN w2 was saved silently)."""
    head = fitted[2][kind]
    name = next(k for k, v in head.params.items() if np.issubdtype(np.asarray(v).dtype, np.floating) and np.asarray(v).size)
    broken = np.array(head.params[name], copy=True)
    broken.flat[0] = np.nan
    bad = type(head)(head.params | {name: broken}, head.metadata)
    path = tmp_path / "h"
    with pytest.raises(ValueError, match="NaN or infinite"):
        bad.save(str(path))
    assert not path.exists() or not any(path.iterdir())


def test_convex_head_tolerance_mode_on_large_norm_embeddings_is_finite_and_accurate():
    """Tolerance mode on raw (uncentred, large-norm) embeddings: finite weights, same accuracy as a linear probe."""
    rng = np.random.default_rng(5)
    X, y = _data(classes=3)
    raw = X * 20.0 + rng.standard_normal(X.shape[1]) * 400.0  # a shared mean of norm ~ 400 * sqrt(d)
    head = ConvexReLUHead.fit(raw, y, languages=["en", "hi", "zh"], n_patterns=8, rank=8, seed=3, tol=1e-3,
                              admm_iters=300)
    assert np.isfinite(head.params["W1"]).all() and np.isfinite(head.params["w2"]).all()
    from sklearn.linear_model import LogisticRegression
    reference = LogisticRegression(max_iter=5000).fit(raw, y).score(raw, y)
    assert np.mean(head.predict(raw) == y) >= reference - 0.05
