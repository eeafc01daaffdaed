"""The flags every binary shares (distributed runtime, mesh, sharding rules, compilation cache) and `init`.

Every binary imports this module (which defines the flags once) and calls `init()` first thing in `main`,
before anything touches a device:

    --distributed=auto|explicit|off  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
    --initialization_timeout=300 --heartbeat_timeout=100 --collective_timeout=600
    --mesh_data=-1 --mesh_model=1 --axis_rules=heads=None,mlp=model
    --compilation_cache_dir=DIR
"""

from __future__ import annotations

from absl import app, flags, logging

from encoders import runtime

DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "explicit", "off"],
    "JAX distributed runtime: auto joins a TPU pod, Slurm job step or Kubernetes indexed Job found in the "
    "environment (else one process); explicit needs --coordinator_address, --num_processes and --process_id.")
COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes).")
INITIALIZATION_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for every process.")
HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without a peer's heartbeat before the run fails (a killed peer ends it).")
COLLECTIVE_TIMEOUT = flags.DEFINE_integer(
    "collective_timeout", 600, "Seconds a CPU collective may wait before failing instead of hanging (0: XLA's).")
MESH_DATA = flags.DEFINE_integer("mesh_data", -1, "Devices on the `data` mesh axis (-1: all left by --mesh_model; "
                                 "0: no mesh, one process only).")
MESH_MODEL = flags.DEFINE_integer("mesh_model", 1, "Devices on the `model` mesh axis (attention heads, MLP, vocab).")
AXIS_RULES = flags.DEFINE_string(
    "axis_rules", "", "Overrides of the logical-axis rules table, LOGICAL=MESH_AXIS|None comma-separated "
    "(e.g. heads=None,mlp=None); see encoders.runtime.LOGICAL_AXIS_RULES.")
COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "JAX's persistent compilation cache (compiled solves and models reused by later runs). Unset: "
    "$CRONOS_COMPILATION_CACHE, else ~/.cache/cronos/jax (or the directory JAX is already configured with); an "
    "empty string disables it (JAX's config is left alone).")


def distributed_config() -> runtime.DistributedConfig:
    """The `runtime.DistributedConfig` the flags describe."""
    return runtime.DistributedConfig(
        mode=DISTRIBUTED.value, coordinator_address=COORDINATOR_ADDRESS.value, num_processes=NUM_PROCESSES.value,
        process_id=PROCESS_ID.value, initialization_timeout_s=INITIALIZATION_TIMEOUT.value,
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT.value, collective_timeout_s=COLLECTIVE_TIMEOUT.value or None)


def enable_compilation_cache() -> str | None:
    """Enables the cache `--compilation_cache_dir` names (see `cronos.enable_compilation_cache`); returns its
    directory, or None when the flag is the empty string."""
    if COMPILATION_CACHE_DIR.value == "":
        return None
    from cronos import enable_compilation_cache as enable  # noqa: PLC0415

    return enable(COMPILATION_CACHE_DIR.value or None)


def init():
    """Applies the shared flags before any device is touched: joins the distributed runtime, sets the sharding
    rules, enables the compilation cache and leaves logging to process 0; returns the `--mesh_data` x
    `--mesh_model` mesh (None: one device of one process)."""
    runtime.initialize(distributed_config())
    runtime.set_rules(runtime.parse_rules(AXIS_RULES.value))
    enable_compilation_cache()
    if not runtime.is_writer():
        logging.set_verbosity(logging.WARNING)
    return runtime.mesh_from_flags(MESH_DATA.value, MESH_MODEL.value)


def init_host_tool(argv) -> bool:
    """`init` for a binary whose work is host-side file work (exporters, converters, corpus builders): refuses
    stray arguments and returns True on process 0, the one process that does all of it."""
    init()
    if not runtime.is_writer():
        return False
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    return True
