"""Phonetic projection head: an MLP on frozen encoder span features trained with supervised contrastive loss.

    from heads import supcon
    params, info = supcon.train_projector(X, phone_labels, steps=5000)   # X: (n, 1024) span-pooled layer-15 states
    Z = supcon.project(params, X)                                        # (n, 256), L2-normalised
    supcon.save_projector("out/projector", params); params, meta = supcon.load_projector("out/projector")
    params, meta = supcon.from_torch_checkpoint("mlp_head.pt")           # the released head (needs torch)

Projector: Linear(in -> hidden) -> ReLU -> Dropout(0.1, training only) -> Linear(hidden -> out) -> L2 norm.
Loss: Khosla et al. (2020) L_out. Batches: `classes_per_batch` classes x `instances_per_class` spans, drawn
by a grain sampler that is a pure function of (seed, step), so a resumed run sees the batches an
uninterrupted one would. Checkpoints (orbax) hold params, Adam state, step and keys.
"""

from __future__ import annotations

import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from encoders import runtime
from heads import io
from heads.baselines import (
    MLP,
    _apply,
    _batch_layout,
    _put,
    _replicated,
)

__all__ = ["HEAD_TYPE", "PhoneticProjector", "balanced_batches", "from_torch_checkpoint", "load_projector",
           "project", "save_projector", "supcon_loss", "train_projector"]

HEAD_TYPE = "phonetic_projector"


class PhoneticProjector(MLP):
    """MLP projector in_dim -> hidden -> out_dim (ReLU, dropout in training) with L2-normalised output."""

    def __init__(self, in_dim: int = 1024, hidden: int = 1024, out_dim: int = 256, dropout: float = 0.1, *,
                 rngs: nnx.Rngs | None = None):
        super().__init__(in_dim, hidden, out_dim, dropout, rngs=rngs if rngs is not None else nnx.Rngs(0))

    def __call__(self, x, *, dropout_key=None):
        """(B, out_dim) unit vectors; dropout is active only when `dropout_key` is given."""
        z = super().__call__(x, dropout_key=dropout_key)
        return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def _graphdef(in_dim: int, hidden: int, out_dim: int, dropout: float):
    return nnx.split(nnx.eval_shape(lambda: PhoneticProjector(in_dim, hidden, out_dim, dropout)))


@jax.jit
def project(params: dict, x: jax.Array) -> jax.Array:
    """(n, out_dim) L2-normalised projections of (n, in_dim) features; `params` flat ("linear1.kernel", ...)."""
    k1, k2 = params["linear1.kernel"], params["linear2.kernel"]
    graphdef, abstract = _graphdef(k1.shape[0], k1.shape[1], k2.shape[1], 0.0)
    return _apply(graphdef, abstract, io.unflatten(params), jnp.asarray(x, jnp.float32))


def supcon_loss(z, labels, temperature: float = 0.07, valid=None):
    """Supervised contrastive loss (Khosla et al. 2020, L_out) of L2-normalised z (B, D) with labels (B,).

    For anchor i with positives P(i) (same label, j != i) the loss is
    -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) ), averaged over
    anchors with at least one positive; 0 when no anchor has one. `valid` (B,) bool drops rows entirely.
    """
    z = jnp.asarray(z, jnp.float32)
    labels = jnp.asarray(labels)
    b = z.shape[0]
    valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)
    others = valid[None, :] & valid[:, None] & ~jnp.eye(b, dtype=bool)
    logits = jnp.where(others, z @ z.T / temperature, -jnp.inf)
    log_prob = jax.nn.log_softmax(logits, axis=1)
    positives = others & (labels[:, None] == labels[None, :])
    n_pos = positives.sum(1)
    per_anchor = -jnp.where(positives, log_prob, 0.0).sum(1) / jnp.maximum(n_pos, 1)
    has_pos = n_pos > 0
    return jnp.where(has_pos, per_anchor, 0.0).sum() / jnp.maximum(has_pos.sum(), 1)


class _BalancedSampler:
    """Random-access source: step -> indices of `classes_per_batch` classes x `instances_per_class` rows.

    Classes are drawn without replacement among those with at least two rows (all of them if there are
    fewer than `classes_per_batch`), instances without replacement (with replacement for small classes).
    """

    def __init__(self, labels: np.ndarray, classes_per_batch: int, instances_per_class: int, seed: int, steps: int):
        classes, inverse = np.unique(labels, return_inverse=True)
        self.members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
        self.eligible = np.array([c for c, m in enumerate(self.members) if len(m) >= 2])
        if len(self.eligible) < 2:
            raise ValueError(f"supervised contrastive training needs at least two classes with two or more rows; "
                             f"got {len(self.eligible)}.")
        self.classes_per_batch = min(classes_per_batch, len(self.eligible))
        self.instances, self.seed, self.steps = instances_per_class, seed, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        chosen = rng.choice(self.eligible, self.classes_per_batch, replace=False)
        return np.concatenate([rng.choice(self.members[c], self.instances, replace=len(self.members[c]) < self.instances)
                               for c in chosen]).astype(np.int32)


def balanced_batches(labels, *, classes_per_batch: int = 32, instances_per_class: int = 8, seed: int = 0,
                     steps: int = 5000, start: int = 0):
    """grain iterator over the index batches of steps [start, steps), each a pure function of (seed, step)."""
    source = _BalancedSampler(np.asarray(labels), classes_per_batch, instances_per_class, seed, steps)
    dataset = grain.MapDataset.source(source)[start:]
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def train_projector(features, labels, *, hidden: int = 1024, out_dim: int = 256, dropout: float = 0.1,
                    learning_rate: float = 1e-3, steps: int = 5000, classes_per_batch: int = 32,
                    instances_per_class: int = 8, temperature: float = 0.07, seed: int = 0,
                    checkpoint_dir: str | None = None, checkpoint_every: int = 500, mesh=None,
                    stop_after: int | None = None) -> tuple[dict, dict]:
    """Trains a projector on (n, d) features with integer or string `labels`; returns (flat params, info).

    With `checkpoint_dir`, saves every `checkpoint_every` steps and resumes from the latest checkpoint
    (same configuration required), ending with the parameters of an uninterrupted run. With `mesh`, each
    batch is split over the mesh axis of the "batch" rule (`encoders.runtime`; padded with repeated rows the
    loss ignores) and parameters are replicated; on several processes the features and labels must be the full data,
    identical on every process (so are the parameters). `stop_after` ends the run early after that many steps
    (to simulate an interruption).
    """
    x = np.asarray(features, np.float32)
    labels = np.asarray(labels)
    if x.ndim != 2 or x.shape[0] != labels.shape[0] or x.shape[0] == 0:
        raise ValueError(f"features must be (n, d) with n = len(labels) > 0; got {x.shape} and {labels.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf.")
    if min(steps, checkpoint_every, classes_per_batch, instances_per_class) < 1 or not temperature > 0:
        raise ValueError("steps, checkpoint_every, classes_per_batch, instances_per_class and temperature must be positive.")
    _, y = np.unique(labels, return_inverse=True)
    dim = x.shape[1]
    config = dict(in_dim=dim, hidden=hidden, out_dim=out_dim, dropout=dropout, learning_rate=learning_rate,
                  steps=steps, classes_per_batch=classes_per_batch, instances_per_class=instances_per_class,
                  temperature=temperature, seed=seed)
    graphdef, abstract = _graphdef(dim, hidden, out_dim, dropout)
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    params = nnx.to_pure_dict(nnx.state(PhoneticProjector(dim, hidden, out_dim, dropout, rngs=nnx.Rngs(init_key))))
    tx = optax.adam(learning_rate)
    train = dict(params=params, opt_state=tx.init(params), step=jnp.asarray(0, jnp.int32),
                 dropout_key=jax.random.key_data(dropout_key))
    shards, x_sharding, y_sharding = _batch_layout(mesh)
    if mesh is not None:
        train = _replicated(train, mesh)

    @jax.jit
    def step_fn(train, xb, yb, valid):
        key = jax.random.fold_in(jax.random.wrap_key_data(train["dropout_key"]), train["step"])
        loss_fn = lambda p: supcon_loss(_apply(graphdef, abstract, p, xb, dropout_key=key), yb, temperature, valid)
        loss, grads = jax.value_and_grad(loss_fn)(train["params"])
        updates, opt_state = tx.update(grads, train["opt_state"], train["params"])
        return {**train, "params": optax.apply_updates(train["params"], updates), "opt_state": opt_state,
                "step": train["step"] + 1}, loss

    manager = None
    if checkpoint_dir is not None:
        manager, train = runtime.open_checkpoints(checkpoint_dir, checkpoint_every, train,
                                                  dict(config, n=int(x.shape[0])), mesh=mesh)
    start_step = int(runtime.to_host(train["step"]))
    end = steps if stop_after is None else min(steps, start_step + stop_after)
    losses, started = [], time.perf_counter()
    batches = balanced_batches(y, classes_per_batch=classes_per_batch, instances_per_class=instances_per_class,
                               seed=seed, steps=end, start=start_step) if start_step < end else iter(())
    for step, index in enumerate(batches, start=start_step + 1):
        rows = len(index) + (-len(index) % shards)
        valid = _put(np.arange(rows) < len(index), y_sharding)
        index = np.resize(index, rows)  # padding repeats real rows (a zero row's unit-norm gradient is NaN)
        xb, yb = _put(x[index], x_sharding), _put(y[index].astype(np.int32), y_sharding)
        train, loss = step_fn(train, xb, yb, valid)
        losses.append(float(runtime.to_host(loss)))
        if manager is not None:
            manager.save(step, args=ocp.args.StandardSave(train), force=step == end)
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    info = dict(config=config, steps_run=end - start_step, final_step=end, losses=losses,
                seconds=time.perf_counter() - started)
    return io.flatten(jax.tree.map(runtime.to_host, train["params"])), info


def save_projector(directory: str, params: dict, metadata: dict | None = None) -> None:
    """Writes flat `params` to the safe head format (head.safetensors + head.json) with `metadata`."""
    k1, k2 = params["linear1.kernel"], params["linear2.kernel"]
    shape = dict(in_dim=int(k1.shape[0]), hidden=int(k1.shape[1]), out_dim=int(k2.shape[1]))
    io.write_head(directory, params, {**(metadata or {}), **shape, "head_type": HEAD_TYPE})


def load_projector(directory: str) -> tuple[dict, dict]:
    """(flat params, metadata) saved by `save_projector`."""
    params, metadata = io.read_head(directory)
    if metadata.get("head_type") != HEAD_TYPE:
        raise ValueError(f"{directory} holds a {metadata.get('head_type')!r} head, not a {HEAD_TYPE}.")
    return params, metadata


def from_torch_checkpoint(path: str) -> tuple[dict, dict]:
    """(flat params, metadata) of a released `mlp_head.pt`: {"config": {in_dim, hidden, out_dim, ...},
    "state_dict": {net.0.weight, net.0.bias, net.3.weight, net.3.bias}} loaded with torch's weights_only."""
    try:
        import torch
    except ImportError as error:
        raise ImportError("loading a torch mlp_head.pt needs torch (pip install torch).") from error
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise ValueError(f"{path} is not an mlp_head.pt checkpoint (a dict with 'config' and 'state_dict').")
    config, state = checkpoint["config"], {k: v.detach().float().numpy() for k, v in checkpoint["state_dict"].items()}
    expected = {"net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"}
    if set(state) != expected:
        raise ValueError(f"{path}: state_dict keys {sorted(state)} != {sorted(expected)}.")
    shapes = {"net.0.weight": (config["hidden"], config["in_dim"]), "net.3.weight": (config["out_dim"], config["hidden"])}
    for name, shape in shapes.items():
        if state[name].shape != tuple(shape):
            raise ValueError(f"{path}: {name} has shape {state[name].shape}, config says {tuple(shape)}.")
    params = {"linear1.kernel": state["net.0.weight"].T.copy(), "linear1.bias": state["net.0.bias"],
              "linear2.kernel": state["net.3.weight"].T.copy(), "linear2.bias": state["net.3.bias"]}
    metadata = {"source": "mlp_head.pt", "torch_config": {k: v for k, v in config.items()
                                                           if isinstance(v, (int, float, str, bool, type(None)))}}
    return params, metadata
