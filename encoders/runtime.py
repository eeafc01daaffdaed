"""The runtime layer: device mesh, logical-axis sharding rules, JAX's distributed runtime, host-local <-> global
arrays, process-0 writes and the atomic file writer.

Every package except `cronos` (which stays importable on its own and takes a mesh and a row-axis name) runs
through this module, so the same code runs on one CPU, a GPU node, several processes on one machine and a TPU pod:

    runtime.initialize(runtime.DistributedConfig())            # auto: TPU / Slurm / Kubernetes detected, else off
    mesh = runtime.create_mesh(model=2)                         # (data, model) over every device of every process
    X = runtime.global_rows(local_rows, mesh, n_rows)           # this process's rows -> one global array
    if runtime.is_writer(): runtime.atomic_write_text(path, text)   # process 0 writes; never around a collective

Parameters and activations carry *logical* axis names ("batch", "rows", "embed", "heads", "kv_heads", "mlp",
"vocab", "cache_*", ...). One rules table maps each onto a mesh axis of the (`data`, `model`) mesh or onto
nothing (replicated); `set_rules` (from `--axis_rules`) overrides entries for every later `constrain`,
`shard_model` and `logical_sharding` call.

Random keys: parameters come from one seed on every process. Dropout is drawn inside the global jit over the
global batch from one key (partitionable threefry: each element's bits depend on the key and its global index),
so rows on different hosts get different masks and a run's result does not depend on the process count; host-side
randomness per process, had we any, would use `jax.random.fold_in(key, jax.process_index())`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

# Logical name -> mesh axis (None = replicated). Rows and batches are data parallel; attention heads (query and
# key/value), the MLP hidden dimension and the vocabulary are tensor parallel over `model`. KV caches follow the
# attention they serve: batch over `data`, heads over `model`.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("rows", "data"),
    ("batch", "data"),
    ("length", None),
    ("embed", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("vocab", "model"),
    ("cache_batch", "data"),
    ("cache_heads", "model"),
    ("cache_length", None),
    ("cache_kv", None),
    ("adapter", None),
    ("conv_kernel", None),
    ("conv_in", None),
    ("conv_out", None),
    ("positions", None),
)

_active_rules: tuple[tuple[str, str | None], ...] = LOGICAL_AXIS_RULES


# ----------------------------------------------------------------------------------------------- rules


def parse_rules(text: str) -> dict[str, str | None]:
    """'heads=None,mlp=model' -> {"heads": None, "mlp": "model"} (the `--axis_rules` syntax); names and mesh axes
    are checked against the table and `MESH_AXES`."""
    overrides: dict[str, str | None] = {}
    known = dict(LOGICAL_AXIS_RULES)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, axis = (s.strip() for s in item.partition("="))
        if not sep or name not in known:
            raise ValueError(f"--axis_rules entry {item!r}: expected LOGICAL=MESH_AXIS with LOGICAL one of "
                             f"{sorted(known)}")
        axis = None if axis in ("None", "none", "") else axis
        if axis is not None and axis not in MESH_AXES:
            raise ValueError(f"--axis_rules entry {item!r}: mesh axis must be one of {MESH_AXES} or None")
        overrides[name] = axis
    return overrides


def set_rules(overrides: Mapping[str, str | None] | None = None) -> tuple[tuple[str, str | None], ...]:
    """Makes LOGICAL_AXIS_RULES with `overrides` the active table (None: the defaults); returns it."""
    global _active_rules
    table = dict(LOGICAL_AXIS_RULES)
    unknown = sorted(set(overrides or {}) - set(table))
    if unknown:
        raise KeyError(f"no sharding rule for logical axes {unknown}; known: {sorted(table)}")
    table.update(overrides or {})
    _active_rules = tuple(table.items())
    return _active_rules


def active_rules() -> tuple[tuple[str, str | None], ...]:
    """The rules table every constraint and placement uses unless given one."""
    return _active_rules


def logical_to_spec(names: Sequence[str | None], rules=None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec of mesh axes using `rules` (default: the active table)."""
    table = dict(rules or _active_rules)
    unknown = [n for n in names if n is not None and n not in table]
    if unknown:
        raise KeyError(f"no sharding rule for logical axes {unknown}")
    return PartitionSpec(*(None if n is None else table[n] for n in names))


def mesh_spec(names: Sequence[str | None], axis_names: Sequence[str], rules=None) -> PartitionSpec:
    """`logical_to_spec`, with rules naming a mesh axis missing from `axis_names` refused (ValueError)."""
    spec = logical_to_spec(names, rules)
    missing = [(n, a) for n, a in zip(names, spec) if a is not None and a not in axis_names]
    if missing:
        raise ValueError(
            f"sharding rules map logical axes to mesh axes the mesh lacks: "
            f"{', '.join(f'{n!r} -> {a!r}' for n, a in missing)} (mesh axes {tuple(axis_names)}); build the mesh "
            f"with encoders.runtime.create_mesh, or map those logical axes to None (replicated) with --axis_rules")
    return spec


def logical_sharding(mesh: Mesh, names: Sequence[str | None], rules=None) -> NamedSharding:
    """NamedSharding on `mesh` of an array whose axes carry the logical `names`."""
    return NamedSharding(mesh, mesh_spec(names, mesh.axis_names, rules))


def constrain(x: jax.Array, names: Sequence[str | None], rules=None) -> jax.Array:
    """Sharding constraint on an activation by logical names (active rules unless given); a no-op without an
    active mesh. Raises ValueError when a rule maps onto a mesh axis the active mesh does not have."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, mesh_spec(names, mesh.axis_names, rules))


def param_sharding(var: nnx.Variable, mesh: Mesh, rules=None) -> NamedSharding:
    """NamedSharding of one parameter, from its `logical_axes` metadata. A dimension its mesh axis does not divide
    (Whisper's 51865-token vocabulary over 2 devices) is replicated: parameters must split evenly, while the
    activations constrained by the same name inside jit stay split."""
    shape = var.get_value().shape
    names = var.get_metadata().get("logical_axes") or (None,) * len(shape)
    spec = mesh_spec(names, mesh.axis_names, rules)
    spec = PartitionSpec(*(axis if axis is None or size % mesh.shape[axis] == 0 else None
                           for axis, size in zip(spec, shape)))
    return NamedSharding(mesh, spec)


def shard_model(model: nnx.Module, mesh: Mesh, rules=None) -> nnx.Module:
    """Places every parameter of `model` on `mesh` by the logical-axis rules (in place). Parameters must be the
    same on every process (load or initialise them from the same seed); each process places its shards."""
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            value, sharding = var.get_value(), param_sharding(var, mesh, rules)
            if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
                continue  # already placed: a second call costs nothing
            if isinstance(value, jax.Array) and not value.is_fully_addressable:
                var.set_value(jax.device_put(value, sharding))  # global -> global reshard
            else:
                var.set_value(place(value, sharding))
    return model


def place(value, sharding: NamedSharding) -> jax.Array:
    """A host value known in full on every process -> a global array with `sharding` (each process keeps its
    shards; `jax.device_put` alone cannot place onto devices of other processes)."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


# ----------------------------------------------------------------------------------------------- mesh


def create_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A (`data`, `model`) mesh over exactly `devices` (default: every device of every process) with
    `jax.make_mesh` (topology-aware device order); `data` defaults to devices // model. A shape that leaves
    devices idle is refused; to use only some devices, pass them as `devices`."""
    if model < 1:
        raise ValueError(f"model must be a positive device count, got {model}")
    devices = list(jax.devices() if devices is None else devices)
    if data is None or data < 0:
        data = len(devices) // model
    if data < 1 or data * model != len(devices):
        raise ValueError(
            f"a {data}x{model} (data x model) mesh uses {data * model} devices, but {len(devices)} were given and "
            f"a mesh must use every one; choose data * model == {len(devices)} (data=None or -1 picks "
            f"{len(devices)} // model), or pass only the devices to use as `devices`")
    return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def mesh_from_flags(data: int, model: int) -> Mesh | None:
    """The mesh of the `--mesh_data` / `--mesh_model` flags: data -1 takes every device left by `model`; None
    (no mesh) when data is 0, or when the mesh would hold one device of a single process."""
    if model < 1:
        raise ValueError(f"--mesh_model={model} must be a positive device count")
    if data == 0:
        if jax.process_count() > 1:
            raise ValueError("--mesh_data=0 (no mesh) cannot run on several processes: use --mesh_data=-1")
        return None
    if data < 0:
        if jax.device_count() % model:
            raise ValueError(f"--mesh_model={model} does not divide the {jax.device_count()} devices; choose a "
                             "divisor, or set --mesh_data explicitly")
        data = jax.device_count() // model
    if data * model > jax.device_count():
        raise ValueError(f"--mesh_data={data} x --mesh_model={model} needs {data * model} devices, but "
                         f"{jax.device_count()} are available: lower them (or --mesh_data=-1 to use all)")
    if data * model == 1 and jax.process_count() == 1:
        return None
    if jax.process_count() > 1 and data * model != jax.device_count():
        raise ValueError(f"on {jax.process_count()} processes the mesh must hold all {jax.device_count()} devices; "
                         f"--mesh_data={data} x --mesh_model={model} holds {data * model}")
    return create_mesh(data, model, devices=jax.devices()[: data * model])


def data_shards(mesh: Mesh | None, axis: str = "data") -> int:
    """Devices along `axis` of `mesh` (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[axis])


def shards_of(mesh: Mesh | None, name: str = "batch") -> int:
    """Devices the logical axis `name` (by the active rules) is split over on `mesh`: what a batch must be padded
    to a multiple of (1 without a mesh, or when the rule replicates it)."""
    axis = dict(_active_rules).get(name)
    return 1 if mesh is None or axis is None else int(mesh.shape[axis])


def padded_size(rows: int, mesh: Mesh | None, name: str = "batch") -> int:
    """`rows` rounded up to a multiple of `shards_of(mesh, name)`: the one batch-padding rule."""
    shards = shards_of(mesh, name)
    return -(-rows // shards) * shards


# ----------------------------------------------------------------------------------------------- distributed

CLUSTER_KINDS = ("tpu", "slurm", "kubernetes")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How to join JAX's distributed runtime (the `--distributed` flag family).

    mode "auto": a TPU pod, Slurm job step or Kubernetes indexed job found in the environment is joined, otherwise
    the run is single-process; "explicit": `coordinator_address`, `num_processes` and `process_id` are required;
    "off": never initialise. Timeouts are in seconds; `collective_timeout_s` turns a hung CPU collective into an
    error (XLA flag `--xla_cpu_collective_timeout_seconds`, set before the backend starts).
    """

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout_s: int = 300
    heartbeat_timeout_s: int = 100
    collective_timeout_s: int | None = 600


@dataclasses.dataclass(frozen=True)
class InitPlan:
    """The arguments `initialize` passes to `jax.distributed.initialize` (None: JAX detects them itself)."""

    cluster: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """The multi-process cluster `env` (default os.environ) describes: "tpu" (Cloud TPU VM worker list or
    accelerator type), "slurm" (a job step of more than one task), "kubernetes" (an indexed Job), or None."""
    env = os.environ if env is None else env
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_ACCELERATOR_TYPE"):
        return "tpu"
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
        return "kubernetes"
    return None


def plan_initialization(config: DistributedConfig, env: Mapping[str, str] | None = None) -> InitPlan | None:
    """What `initialize(config)` will do in `env`: an `InitPlan`, or None for a single-process run. Pure (no
    device touched), so flag and environment parsing is testable by faking a cluster's environment."""
    env = os.environ if env is None else env
    explicit = (config.coordinator_address, config.num_processes, config.process_id)
    if config.mode not in ("auto", "explicit", "off"):
        raise ValueError(f"--distributed={config.mode!r}: use auto, explicit or off")
    if config.mode == "off":
        if any(v is not None for v in explicit):
            raise ValueError("--distributed=off ignores --coordinator_address/--num_processes/--process_id; "
                             "drop them or use --distributed=explicit")
        return None
    if config.mode == "explicit" or any(v is not None for v in explicit):
        missing = [f"--{name}" for name, v in zip(("coordinator_address", "num_processes", "process_id"), explicit)
                   if v is None]
        if missing:
            raise ValueError(f"explicit distributed initialisation needs {', '.join(missing)} as well "
                             "(or --distributed=auto to detect TPU, Slurm or Kubernetes)")
        if config.num_processes < 1 or not 0 <= config.process_id < config.num_processes:
            raise ValueError(f"--process_id={config.process_id} must lie in [0, --num_processes="
                             f"{config.num_processes})")
        _check_address(config.coordinator_address, "--coordinator_address")
        return InitPlan("explicit", *explicit)
    cluster = detect_cluster(env)
    if cluster == "kubernetes":
        missing = [v for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES") if v not in env]
        if missing:
            raise ValueError(f"a Kubernetes indexed Job was detected (JOB_COMPLETION_INDEX) but {', '.join(missing)} "
                             "is not set: set both in the pod spec (coordinator = pod 0's HOST:PORT), or pass "
                             "--distributed=explicit flags")
        try:
            num_processes, index = int(env["JAX_NUM_PROCESSES"]), int(env["JOB_COMPLETION_INDEX"])
        except ValueError:
            raise ValueError(f"a Kubernetes indexed Job needs integer JAX_NUM_PROCESSES and JOB_COMPLETION_INDEX, got "
                             f"{env['JAX_NUM_PROCESSES']!r} and {env['JOB_COMPLETION_INDEX']!r}") from None
        if num_processes < 1 or not 0 <= index < num_processes:
            raise ValueError(f"JOB_COMPLETION_INDEX={index} must lie in [0, JAX_NUM_PROCESSES={num_processes}): "
                             "set JAX_NUM_PROCESSES to the Job's completions")
        _check_address(env["JAX_COORDINATOR_ADDRESS"], "JAX_COORDINATOR_ADDRESS")
        return InitPlan("kubernetes", env["JAX_COORDINATOR_ADDRESS"], num_processes, index)
    return None if cluster is None else InitPlan(cluster)


def _check_address(address: str, what: str) -> None:
    """Refuses a coordinator address that is not HOST:PORT with a numeric port."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{what}={address!r} needs HOST:PORT (a numeric port)")


def initialize(config: DistributedConfig | None = None, env: Mapping[str, str] | None = None) -> InitPlan | None:
    """Joins JAX's distributed runtime as `config` says (see `plan_initialization`); call before touching a device.
    Sets the CPU collective timeout first, so a skipped collective fails instead of hanging. Idempotent."""
    config = config or DistributedConfig()
    plan = plan_initialization(config, env)
    if plan is None:
        return None
    if config.collective_timeout_s:
        flag = f"--xla_cpu_collective_timeout_seconds={config.collective_timeout_s}"
        if "xla_cpu_collective_timeout_seconds" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=plan.coordinator_address, num_processes=plan.num_processes,
            process_id=plan.process_id, initialization_timeout=config.initialization_timeout_s,
            heartbeat_timeout_seconds=config.heartbeat_timeout_s)
    return plan


# ----------------------------------------------------------------------------------------------- arrays


def is_writer() -> bool:
    """True on process 0, the one process that logs and writes results, model cards and cache indexes. Test it
    only around host-side work: a collective inside `if is_writer():` hangs every other process."""
    return jax.process_index() == 0


def process_block(n: int) -> tuple[int, int]:
    """[start, stop) of this process's contiguous block when n items (a multiple of the process count) are split
    evenly over processes in process order."""
    count = jax.process_count()
    if n % count:
        raise ValueError(f"{n} items do not split evenly over {count} processes; pad them first")
    size = n // count
    return jax.process_index() * size, (jax.process_index() + 1) * size


def check_same_on_every_process(value: int, what: str) -> None:
    """Raises ValueError on every process (the same message) when the integer `value` differs between processes,
    instead of letting a mismatched collective hang later."""
    if jax.process_count() == 1:
        return
    values = np.asarray(multihost_utils.process_allgather(np.asarray([value], np.int64))).reshape(-1)
    if len(set(values.tolist())) > 1:
        raise ValueError(f"{what} differs between processes ({dict(enumerate(values.tolist()))} by process index); "
                         "give every process the same amount of data (pad, or use drop_remainder)")


def global_rows(local: np.ndarray, mesh: Mesh, global_rows: int, names: Sequence[str | None] | None = None,
                rules=None) -> jax.Array:
    """This process's contiguous block of rows -> the global (global_rows, ...) array sharded by logical `names`
    (default ("rows", None, ...)). Every process must hold global_rows / process_count rows: a process with more
    or fewer is a ValueError on every process, never a silently different global shape or a hang."""
    local = np.asarray(local)
    count = jax.process_count()
    check_same_on_every_process(local.shape[0], "the number of local rows")
    if local.shape[0] * count != global_rows:
        raise ValueError(f"{count} process(es) x {local.shape[0]} local rows != {global_rows} global rows")
    names = tuple(names) if names is not None else ("rows",) + (None,) * (local.ndim - 1)
    sharding = logical_sharding(mesh, names, rules)
    if count == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, (global_rows,) + local.shape[1:])


def to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-process) array on every process, as NumPy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenation, in process order, of every process's equally shaped host `local` block (on every process)."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    check_same_on_every_process(local.shape[0], "the number of gathered rows")
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def broadcast_from_writer(value):
    """Process 0's value of a pytree of host arrays on every process (identity on one process)."""
    if jax.process_count() == 1:
        return value
    return multihost_utils.broadcast_one_to_all(value)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------- files


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same folder, fsync and a rename, so a kill leaves
    the old file or the new one, never half of one (the repository's one atomic file writer)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=directory, delete=False, suffix=".tmp") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def atomic_write_text(path: str, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def open_checkpoints(directory: str, every: int, train, run: dict, *, mesh: Mesh | None = None,
                     run_file: str = "train_config.json"):
    """(orbax manager for `directory`, `train` restored from its latest checkpoint, if any) of a resumable run.

    `run` (JSON) describes the run: it is written to `directory/run_file` on the first call (process 0,
    atomically: a half-written file would block every resume) and a later call with a different one is refused.
    Checkpoints are saved every `every` steps, the last two kept. On several processes `train` must be global
    arrays on `mesh` (orbax saves them collectively).
    """
    import orbax.checkpoint as ocp

    if mesh is None and jax.process_count() > 1:
        raise ValueError(f"checkpointing on {jax.process_count()} processes needs a mesh: pass mesh= (orbax saves "
                         "global arrays), or no checkpoint_dir")
    directory = os.path.abspath(directory)
    run_path = os.path.join(directory, run_file)
    if os.path.exists(run_path):
        with open(run_path) as f:
            saved = json.load(f)
        if saved != run:
            changed = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
            raise ValueError(f"{directory} holds checkpoints of a different run (differs in {changed}): {saved} != "
                             f"{run}; use a fresh checkpoint directory")
    elif is_writer():
        atomic_write_text(run_path, json.dumps(run, indent=1))
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=2, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(directory, options=options)
    latest = manager.latest_step()
    if latest is not None:
        train = manager.restore(latest, args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                                                  train)))
    return manager, train


def mesh_context(mesh: Mesh | None):
    """`jax.set_mesh(mesh)`, or a null context without a mesh."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
