"""Baseline heads: `NNHead` (Flax NNX MLP, AdamW, resumable orbax checkpoints, optionally data parallel on a
mesh) and `LinearHead` (multinomial logistic regression by L-BFGS, sklearn's objective). Same interface and
format as `ConvexReLUHead`.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from encoders import runtime
from heads import io
from heads.base import (
    Head,
    check_embeddings,
    check_languages,
    encode_labels,
    input_statistics,
    normalize_inputs,
)

__all__ = ["LinearHead", "NNHead", "linear_logits"]


class MLP(nnx.Module):
    """Linear(d -> hidden) -> ReLU -> Dropout -> Linear(hidden -> C)."""

    def __init__(self, dim: int, hidden: int, num_classes: int, dropout: float, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.linear2 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x, *, dropout_key=None):
        """Logits; dropout is active only when `dropout_key` is given."""
        h = jax.nn.relu(self.linear1(x))
        h = self.dropout(h, deterministic=dropout_key is None, rngs=dropout_key)
        return self.linear2(h)


def _graphdef(dim: int, hidden: int, num_classes: int, dropout: float):
    """(graphdef, abstract state) of the MLP; parameters come from explicit pure dicts."""
    return nnx.split(nnx.eval_shape(lambda: MLP(dim, hidden, num_classes, dropout, rngs=nnx.Rngs(0))))


def _apply(graphdef, abstract, params: dict, x, dropout_key=None):
    """MLP logits for pure-dict `params` (the abstract state is copied, never filled in place)."""
    state = jax.tree.map(lambda leaf: leaf, abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)(x, dropout_key=dropout_key)


def _nn_forward(params: dict, x: jax.Array) -> jax.Array:
    """(B, C) logits of the MLP stored as flat params ("linear1.kernel", ...)."""
    kernel1, kernel2 = params["linear1.kernel"], params["linear2.kernel"]
    graphdef, abstract = _graphdef(kernel1.shape[0], kernel1.shape[1], kernel2.shape[1], 0.0)
    return _apply(graphdef, abstract, io.unflatten(params), x)


def _cross_entropy(logits, y, weights=None):
    """Mean cross-entropy, or its `weights`-weighted mean (zero-weight rows are padding)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return losses.mean() if weights is None else jnp.sum(losses * weights) / jnp.sum(weights)


def _replicated(tree, mesh):
    """Every leaf of `tree` (identical on every process) as a global array replicated over `mesh`."""
    sharding = runtime.logical_sharding(mesh, ())
    return jax.tree.map(lambda leaf: runtime.place(leaf, sharding), tree)


def _batch_layout(mesh):
    """(rows a batch is padded to a multiple of, (B, d) sharding, (B,) sharding) on `mesh` by the "batch" rule;
    (1, None, None) without a mesh."""
    if mesh is None:
        return 1, None, None
    rows = runtime.logical_sharding(mesh, ("batch",))
    shards = 1 if rows.spec[0] is None else runtime.data_shards(mesh, rows.spec[0])
    return shards, runtime.logical_sharding(mesh, ("batch", None)), rows


def _put(value, sharding):
    """A host batch on the default device (no sharding) or placed with `sharding`."""
    return jnp.asarray(value) if sharding is None else runtime.place(value, sharding)


class NNHead(Head):
    """MLP baseline trained with AdamW on shuffled mini-batches (deterministic given `seed`)."""

    head_type = "nn"
    forward = staticmethod(jax.jit(_nn_forward))

    @classmethod
    def fit(cls, embeddings, labels, languages, *, hidden: int = 256, dropout: float = 0.1,
            learning_rate: float = 1e-3, weight_decay: float = 1e-2, epochs: int = 20, batch_size: int = 64,
            seed: int = 0, checkpoint_dir: str | None = None, checkpoint_every: int = 100, mesh=None,
            encoder: str | None = None, pooling: str = "mean", input_norm: str = "none") -> "NNHead":
        """Trains on (n, d) embeddings; with `checkpoint_dir`, saves every `checkpoint_every` steps and resumes.

        A checkpoint holds params, AdamW state, step and the data-order / dropout keys, so a run killed
        and restarted with the same arguments ends with exactly the parameters of an uninterrupted run.
        Each epoch visits a permutation of the data in batches of `batch_size` (the last one may be short).
        With `mesh`, each batch is split over the mesh axis of the "batch" rule (`encoders.runtime`; padded with
        zero-weight rows to a multiple of it) and parameters are replicated; on several processes the
        embeddings and labels must be the full data, identical on every process (so is the head).
        `input_norm` as in `ConvexReLUHead.fit`.
        """
        languages = check_languages(languages)
        x = check_embeddings(embeddings)
        y = encode_labels(labels, languages, x.shape[0]).astype(np.int32)
        stats = input_statistics(x, input_norm)
        x = normalize_inputs(stats, x).astype(np.float32)
        n, dim = x.shape
        if batch_size < 1 or epochs < 1 or checkpoint_every < 1:
            raise ValueError(f"batch_size, epochs and checkpoint_every must be positive; got {batch_size}, {epochs}, {checkpoint_every}.")
        hyperparameters = dict(hidden=hidden, dropout=dropout, learning_rate=learning_rate, weight_decay=weight_decay,
                               epochs=epochs, batch_size=batch_size)
        graphdef, abstract = _graphdef(dim, hidden, len(languages), dropout)
        init_key, data_key, dropout_key = jax.random.split(jax.random.key(seed), 3)
        params = nnx.to_pure_dict(nnx.state(MLP(dim, hidden, len(languages), dropout, rngs=nnx.Rngs(init_key))))
        tx = optax.adamw(learning_rate, weight_decay=weight_decay)
        train = dict(params=params, opt_state=tx.init(params), step=jnp.asarray(0, jnp.int32),
                     data_key=jax.random.key_data(data_key), dropout_key=jax.random.key_data(dropout_key))
        shards, x_sharding, y_sharding = _batch_layout(mesh)
        if mesh is not None:
            train = _replicated(train, mesh)

        @jax.jit
        def step_fn(train, xb, yb, wb):
            key = jax.random.fold_in(jax.random.wrap_key_data(train["dropout_key"]), train["step"])
            loss, grads = jax.value_and_grad(
                lambda p: _cross_entropy(_apply(graphdef, abstract, p, xb, dropout_key=key), yb, wb))(train["params"])
            updates, opt_state = tx.update(grads, train["opt_state"], train["params"])
            return {**train, "params": optax.apply_updates(train["params"], updates), "opt_state": opt_state,
                    "step": train["step"] + 1}, loss

        steps_per_epoch = -(-n // batch_size)
        total = epochs * steps_per_epoch
        manager = None
        if checkpoint_dir is not None:
            manager, train = runtime.open_checkpoints(
                checkpoint_dir, checkpoint_every, train,
                dict(hyperparameters, seed=seed, n=n, dim=dim, languages=list(languages), input_norm=input_norm),
                mesh=mesh)
        start = time.perf_counter()
        padded = {b: b + (-b % shards) for b in {min(batch_size, n), n % batch_size or batch_size}}
        executables = {p: step_fn.lower(train, jax.ShapeDtypeStruct((p, dim), jnp.float32, sharding=x_sharding),
                                        jax.ShapeDtypeStruct((p,), jnp.int32, sharding=y_sharding),
                                        jax.ShapeDtypeStruct((p,), jnp.float32, sharding=y_sharding)).compile()
                       for p in padded.values()}
        compile_seconds, start = time.perf_counter() - start, time.perf_counter()
        step_flops = {p: float(exe.cost_analysis().get("flops", np.nan)) for p, exe in executables.items()}
        step, order, losses, flops = int(runtime.to_host(train["step"])), None, [], 0.0
        data_key = jax.random.wrap_key_data(jnp.asarray(runtime.to_host(train["data_key"])))
        while step < total:
            epoch, batch = divmod(step, steps_per_epoch)
            if order is None or batch == 0:  # the epoch's data order is a function of (data key, epoch)
                order = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), n))
            index = order[batch * batch_size:(batch + 1) * batch_size]
            rows = padded[len(index)]
            pad = rows - len(index)
            xb = _put(np.pad(x[index], ((0, pad), (0, 0))), x_sharding)
            yb = _put(np.pad(y[index], (0, pad)), y_sharding)
            wb = _put(np.pad(np.ones(len(index), np.float32), (0, pad)), y_sharding)
            train, loss = _train_step(executables[rows], train, xb, yb, wb)
            flops += step_flops[rows]
            step += 1
            losses.append(float(runtime.to_host(loss)))
            if manager is not None:
                manager.save(step, args=ocp.args.StandardSave(train), force=step == total)
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
        flat = io.flatten(jax.tree.map(runtime.to_host, train["params"]))
        metadata = cls.make_metadata(languages, dim, hyperparameters=hyperparameters, seeds=dict(seed=seed),
                                     encoder=encoder, pooling=pooling, trainer="optax.adamw", input_norm=input_norm)
        train_info = dict(compile_seconds=compile_seconds, run_seconds=time.perf_counter() - start, steps=total,
                          flops=flops, losses=losses)  # flops and losses: the steps this call ran
        return cls({**flat, **stats}, metadata, train_info)


def _train_step(step_fn, train, *batch):
    """One optimisation step (module-level so tests can interrupt training between steps)."""
    return step_fn(train, *batch)


@jax.jit
def linear_logits(params: dict, x: jax.Array) -> jax.Array:
    """(B, C) logits x @ coef.T + intercept (scikit-learn's layout)."""
    return x @ params["coef"].T + params["intercept"]


class LinearHead(Head):
    """Multinomial logistic regression: min_W,b sum_i CE(x_i W + b, y_i) + ||W||^2 / (2 C), as scikit-learn's
    `LogisticRegression(C=C)` (intercept unpenalised), solved with optax L-BFGS in float32."""

    head_type = "linear"
    forward = staticmethod(linear_logits)

    @classmethod
    def fit(cls, embeddings, labels, languages, *, C: float = 1.0, max_iter: int = 500, tol: float = 1e-5,
            encoder: str | None = None, pooling: str = "mean", input_norm: str = "none") -> "LinearHead":
        """Fits by full-batch L-BFGS until the gradient norm falls below `tol` (or `max_iter` steps);
        `input_norm` as in `ConvexReLUHead.fit`."""
        languages = check_languages(languages)
        x = check_embeddings(embeddings)
        y = encode_labels(labels, languages, x.shape[0])
        stats = input_statistics(x, input_norm)
        x = normalize_inputs(stats, x)
        if not C > 0:
            raise ValueError(f"C (inverse regularisation strength) must be positive, got {C}.")
        start = time.perf_counter()
        args = (jnp.asarray(x), jnp.asarray(y), len(languages), C, max_iter, tol)
        executable = _lbfgs_logistic.lower(*args).compile()
        compile_seconds, start = time.perf_counter() - start, time.perf_counter()
        params, iterations = jax.device_get(executable(args[0], args[1], args[3], args[5]))
        hyperparameters = dict(C=C, max_iter=max_iter, tol=tol)
        metadata = cls.make_metadata(languages, x.shape[1], hyperparameters=hyperparameters, seeds={},
                                     encoder=encoder, pooling=pooling, trainer="optax.lbfgs", input_norm=input_norm)
        train_info = dict(compile_seconds=compile_seconds, run_seconds=time.perf_counter() - start, iterations=int(iterations))
        return cls({**params, **stats}, metadata, train_info)


@jax.jit(static_argnums=(2, 4))
def _lbfgs_logistic(x, y, num_classes: int, C, max_iter: int, tol):
    n, d = x.shape

    def objective(params):
        # sklearn's objective divided by n * C: mean cross-entropy + ||coef||^2 / (2 C n).
        return _cross_entropy(linear_logits(params, x), y) + 0.5 * jnp.sum(params["coef"] ** 2) / (C * n)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)
    params = dict(coef=jnp.zeros((num_classes, d), x.dtype), intercept=jnp.zeros((num_classes,), x.dtype))

    def body(carry):
        params, state, k = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(params, updates), state, k + 1

    def cond(carry):
        _, state, k = carry
        grad = optax.tree.get(state, "grad")
        return (k == 0) | ((k < max_iter) & (optax.tree.norm(grad) >= tol))

    params, _, k = jax.lax.while_loop(cond, body, (params, solver.init(params), 0))
    return params, k
