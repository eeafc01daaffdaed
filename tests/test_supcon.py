"""Phonetic projector and supervised contrastive loss against NumPy references."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from heads import supcon


def _normalised(rng, b, d):
    z = rng.standard_normal((b, d))
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def supcon_reference(z, labels, t):
    """Loop-by-anchor L_out in float64."""
    z = z.astype(np.float64)
    sims = z @ z.T / t
    losses = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        log_denominator = np.log(np.sum(np.exp(sims[i, others])))
        positives = [p for p in others if labels[p] == labels[i]]
        if positives:
            losses.append(-np.mean([sims[i, p] - log_denominator for p in positives]))
    return float(np.mean(losses)) if losses else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_supcon_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    z, labels = _normalised(rng, 24, 8), rng.integers(0, 5, 24)
    np.testing.assert_allclose(supcon.supcon_loss(z, labels, 0.07), supcon_reference(z, labels, 0.07), rtol=1e-4)
    np.testing.assert_allclose(supcon.supcon_loss(z, labels, 0.5), supcon_reference(z, labels, 0.5), rtol=1e-4)


def test_supcon_order_invariant_and_singletons():
    rng = np.random.default_rng(3)
    z = _normalised(rng, 16, 6)
    labels = np.array([0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11])  # many singleton classes
    perm = rng.permutation(16)
    loss = float(supcon.supcon_loss(z, labels))
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, float(supcon.supcon_loss(z[perm], labels[perm])), rtol=1e-5)
    np.testing.assert_allclose(loss, supcon_reference(z, labels, 0.07), rtol=1e-4)
    all_singletons = supcon.supcon_loss(z, np.arange(16))
    assert float(all_singletons) == 0.0
    grad = jax.grad(lambda q: supcon.supcon_loss(q, np.arange(16)))(z)
    assert np.isfinite(np.asarray(grad)).all()


def test_valid_mask_drops_rows_with_finite_gradients():
    rng = np.random.default_rng(4)
    z, labels = _normalised(rng, 12, 6), np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 3, 3])
    valid = np.arange(12) < 9  # the last three rows are padding
    loss = supcon.supcon_loss(z, labels, 0.1, valid)
    np.testing.assert_allclose(loss, supcon_reference(z[:9], labels[:9], 0.1), rtol=1e-4)
    grad = np.asarray(jax.grad(lambda q: supcon.supcon_loss(q, labels, 0.1, valid))(z))
    assert np.isfinite(grad).all() and not grad[9:].any()


def test_projector_shapes_and_norm():
    proj = supcon.PhoneticProjector(in_dim=12, hidden=16, out_dim=4)
    z = np.asarray(proj(np.ones((3, 12), np.float32)))
    assert z.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


def test_balanced_batches_are_deterministic_and_balanced():
    labels = np.repeat(np.arange(10), [1, 3, 5, 8, 9, 2, 20, 4, 6, 7])
    first = list(supcon.balanced_batches(labels, classes_per_batch=4, instances_per_class=3, seed=1, steps=5))
    again = list(supcon.balanced_batches(labels, classes_per_batch=4, instances_per_class=3, seed=1, steps=5, start=2))
    for a, b in zip(first[2:], again):
        np.testing.assert_array_equal(a, b)
    for batch in first:
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 4 and (counts == 3).all() and 0 not in classes  # class 0 has one row: never drawn


def _toy_data(n_classes=6, per_class=20, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim)) * 2
    labels = np.repeat(np.arange(n_classes), per_class)
    return (centres[labels] + rng.standard_normal((len(labels), dim))).astype(np.float32), labels


def test_training_reduces_loss_and_resume_equals_uninterrupted(tmp_path):
    x, y = _toy_data()
    kw = dict(hidden=16, out_dim=8, steps=12, classes_per_batch=4, instances_per_class=4, seed=0)
    _, info = supcon.train_projector(x, y, **{**kw, "steps": 40, "learning_rate": 1e-2})
    assert np.mean(info["losses"][-10:]) < 0.8 * np.mean(info["losses"][:5])
    full, _ = supcon.train_projector(x, y, **kw)
    ckpt = str(tmp_path / "ckpt")
    part, info1 = supcon.train_projector(x, y, checkpoint_dir=ckpt, checkpoint_every=5, stop_after=7, **kw)
    assert info1["final_step"] == 7
    resumed, info2 = supcon.train_projector(x, y, checkpoint_dir=ckpt, checkpoint_every=5, **kw)
    assert info2["steps_run"] == 5  # restored step 7 (forced save at the interruption), ran 8..12
    for name in full:
        np.testing.assert_array_equal(full[name], resumed[name])
    with pytest.raises(ValueError, match="different run"):
        supcon.train_projector(x, y, checkpoint_dir=ckpt, **{**kw, "hidden": 8})


def test_save_load_and_bad_inputs(tmp_path):
    x, y = _toy_data()
    params, _ = supcon.train_projector(x, y, hidden=8, out_dim=4, steps=2, classes_per_batch=3, instances_per_class=2)
    supcon.save_projector(str(tmp_path / "p"), params, {"encoder": "test"})
    loaded, meta = supcon.load_projector(str(tmp_path / "p"))
    assert meta["out_dim"] == 4 and meta["encoder"] == "test"
    np.testing.assert_array_equal(supcon.project(params, x), supcon.project(loaded, x))
    with pytest.raises(ValueError, match="two classes"):
        supcon.train_projector(x, np.arange(len(x)), steps=1)
    with pytest.raises(ValueError, match="features must be"):
        supcon.train_projector(x[:0], y[:0], steps=1)


def test_torch_mlp_head_checkpoint(tmp_path):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 4)).eval()
    path = str(tmp_path / "mlp_head.pt")
    torch.save({"config": {"in_dim": 12, "hidden": 16, "out_dim": 4, "dropout": 0.1},
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    params, meta = supcon.from_torch_checkpoint(path)
    x = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(net(torch.from_numpy(x)), dim=-1).numpy()
    np.testing.assert_allclose(supcon.project(params, x), ref, atol=1e-5)
    assert meta["torch_config"]["hidden"] == 16
    torch.save({"config": {"in_dim": 12, "hidden": 16, "out_dim": 4}, "state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="state_dict keys"):
        supcon.from_torch_checkpoint(path)


def test_training_on_meshes_and_rules_equals_no_mesh(tmp_path):
    code = """
import sys
import numpy as np
from encoders import runtime
from heads import supcon
rng = np.random.default_rng(0)
y = np.repeat(np.arange(6), 20)
x = (rng.standard_normal((6, 10))[y] * 2 + rng.standard_normal((120, 10))).astype(np.float32)
kw = dict(hidden=16, out_dim=8, steps=12, classes_per_batch=4, instances_per_class=3, seed=0)  # batch 12 -> 16 on 8
ref, ref_info = supcon.train_projector(x, y, **kw)
for model, rules in ((1, None), (2, {"batch": "model"})):
    runtime.set_rules(rules)
    mesh = runtime.create_mesh(model=model)
    ckpt = f"{sys.argv[1]}/ckpt{model}"
    supcon.train_projector(x, y, mesh=mesh, checkpoint_dir=ckpt, checkpoint_every=5, stop_after=7, **kw)
    ours, info = supcon.train_projector(x, y, mesh=mesh, checkpoint_dir=ckpt, checkpoint_every=5, **kw)
    assert info["steps_run"] == 5, info
    np.testing.assert_allclose(info["losses"], ref_info["losses"][7:], rtol=1e-5)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-5, atol=1e-6)
print("ok")
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
