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
    """Builds a (`data`, `model`) mesh over exactly `devices` (default: all); `data` defaults to devices // model.

    A shape that leaves devices idle is refused; to use only some devices, pass them as `devices`.
    """
    if model < 1:
        raise ValueError(f"model must be a positive device count, got {model}")
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = len(devices) // model
    if data < 1 or data * model != len(devices):
        raise ValueError(
            f"a {data}x{model} (data x model) mesh uses {data * model} devices, but {len(devices)} were given and "
            f"a mesh must use every one; choose data * model == {len(devices)} (data=None picks {len(devices)} // "
            "model), or pass only the devices to use as `devices`")
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def logical_to_spec(names: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec of mesh axes using `rules`."""
    table = dict(rules)
    unknown = [n for n in names if n is not None and n not in table]
    if unknown:
        raise KeyError(f"no sharding rule for logical axes {unknown}")
    return PartitionSpec(*(None if n is None else table[n] for n in names))


def mesh_spec(names: Sequence[str | None], axis_names: Sequence[str], rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """`logical_to_spec`, refused (ValueError) when a rule names a mesh axis missing from `axis_names`."""
    spec = logical_to_spec(names, rules)
    missing = [(n, a) for n, a in zip(names, spec) if a is not None and a not in axis_names]
    if missing:
        raise ValueError(
            f"sharding rules map logical axes to mesh axes the mesh lacks: "
            f"{', '.join(f'{n!r} -> {a!r}' for n, a in missing)} (mesh axes {tuple(axis_names)}); build the mesh "
            f"with encoders.sharding.create_mesh, or pass rules that map those logical axes to None (replicated)")
    return spec


def constrain(x: jax.Array, names: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op without an active mesh.

    Raises ValueError when a rule maps onto a mesh axis the active mesh does not have (see `mesh_spec`).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, mesh_spec(names, mesh.axis_names, rules))


def param_sharding(var: nnx.Variable, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """NamedSharding of one parameter, from its `logical_axes` metadata."""
    names = var.get_metadata().get("logical_axes") or (None,) * var.get_value().ndim
    return NamedSharding(mesh, mesh_spec(names, mesh.axis_names, rules))


def shard_model(model: nnx.Module, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> nnx.Module:
    """Places every parameter of `model` on `mesh` according to the logical-axis rules (in place)."""
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            var.set_value(jax.device_put(var.get_value(), param_sharding(var, mesh, rules)))
    return model
