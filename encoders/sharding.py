"""Device mesh and logical-axis sharding rules (MaxText style).

Parameters and activations carry *logical* axis names ("batch", "embed",
"heads", "mlp", ...). A rules table maps each logical name onto a mesh axis of a
(`data`, `model`) mesh, or onto nothing (replicated).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical name -> mesh axis (None = replicated). Batch is data parallel; attention
# heads and the MLP hidden dimension are tensor parallel over `model`.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("length", None),
    ("embed", None),
    ("heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("adapter", None),
    ("conv_kernel", None),
    ("conv_in", None),
    ("conv_out", None),
    ("positions", None),
)


def create_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """Builds a (`data`, `model`) mesh; `data` defaults to all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = len(devices) // model
    if data * model > len(devices) or data < 1:
        raise ValueError(f"mesh {data}x{model} needs more than the {len(devices)} available devices")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def logical_to_spec(names: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec of mesh axes using `rules`."""
    table = dict(rules)
    unknown = [n for n in names if n is not None and n not in table]
    if unknown:
        raise KeyError(f"no sharding rule for logical axes {unknown}")
    return PartitionSpec(*(None if n is None else table[n] for n in names))


def constrain(x: jax.Array, names: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op without an active mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names, rules)
    spec = PartitionSpec(*(a if a in mesh.axis_names else None for a in spec))
    return jax.lax.with_sharding_constraint(x, spec)


def param_sharding(var: nnx.Variable, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """NamedSharding of one parameter, from its `logical_axes` metadata."""
    names = var.get_metadata().get("logical_axes") or (None,) * var.get_value().ndim
    return NamedSharding(mesh, logical_to_spec(names, rules))


def shard_model(model: nnx.Module, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> nnx.Module:
    """Places every parameter of `model` on `mesh` according to the logical-axis rules (in place)."""
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            var.set_value(jax.device_put(var.get_value(), param_sharding(var, mesh, rules)))
    return model
