"""encoders.runtime without a cluster: initialisation plans from faked cluster environments, the logical-axis
rules table, and `mesh_from_flags` on 8 fake CPU devices (in a subprocess, so XLA_FLAGS only affects it).

Every expectation is written out by hand.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from encoders import runtime
from encoders.runtime import (
    DistributedConfig,
    InitPlan,
    detect_cluster,
    plan_initialization,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SLURM = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}
KUBERNETES = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "2",
              "JAX_COORDINATOR_ADDRESS": "job-0.svc:1234", "JAX_NUM_PROCESSES": "4"}
EXPLICIT = {"coordinator_address": "host0:8476", "num_processes": 4, "process_id": 3}


# ----------------------------------------------------------------------------------------------- clusters


def test_nothing_detected_is_a_single_process_run():
    assert detect_cluster({}) is None
    assert plan_initialization(DistributedConfig(), {}) is None
    assert runtime.initialize(DistributedConfig(), env={}) is None  # returns before touching jax.distributed
    assert detect_cluster({"PATH": "/usr/bin", "HOME": "/root"}) is None


def test_slurm():
    assert detect_cluster(SLURM) == "slurm"
    assert plan_initialization(DistributedConfig(), SLURM) == InitPlan("slurm", None, None, None)
    for single in ({**SLURM, "SLURM_NTASKS": "1"}, {k: v for k, v in SLURM.items() if k != "SLURM_NTASKS"}):
        assert detect_cluster(single) is None
        assert plan_initialization(DistributedConfig(), single) is None
    assert detect_cluster({"SLURM_JOB_ID": "42", "SLURM_NTASKS": "4"}) is None  # an allocation, not a job step


def test_tpu():
    for env in ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, {"TPU_ACCELERATOR_TYPE": "v5litepod-16"},
                {"TPU_PROCESS_ADDRESSES": "t0:8471,t1:8471"}, {**SLURM, "TPU_WORKER_HOSTNAMES": "t0,t1"}):
        assert detect_cluster(env) == "tpu"
        assert plan_initialization(DistributedConfig(), env) == InitPlan("tpu")
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": ""}) is None


def test_kubernetes_indexed_job():
    assert detect_cluster(KUBERNETES) == "kubernetes"
    assert plan_initialization(DistributedConfig(), KUBERNETES) == InitPlan("kubernetes", "job-0.svc:1234", 4, 2)
    assert detect_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is None  # a pod, not an indexed Job
    without = {k: v for k, v in KUBERNETES.items() if k != "JAX_NUM_PROCESSES"}
    with pytest.raises(ValueError, match="was detected \\(JOB_COMPLETION_INDEX\\) but JAX_NUM_PROCESSES is not set"):
        plan_initialization(DistributedConfig(), without)
    bare = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "0"}
    with pytest.raises(ValueError, match="but JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES is not set"):
        plan_initialization(DistributedConfig(), bare)
    with pytest.raises(ValueError, match=r"JOB_COMPLETION_INDEX=4 must lie in \[0, JAX_NUM_PROCESSES=4\)"):
        plan_initialization(DistributedConfig(), {**KUBERNETES, "JOB_COMPLETION_INDEX": "4"})
    with pytest.raises(ValueError, match="integer JAX_NUM_PROCESSES and JOB_COMPLETION_INDEX, got 'four' and '2'"):
        plan_initialization(DistributedConfig(), {**KUBERNETES, "JAX_NUM_PROCESSES": "four"})
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS='job-0.svc' needs HOST:PORT"):
        plan_initialization(DistributedConfig(), {**KUBERNETES, "JAX_COORDINATOR_ADDRESS": "job-0.svc"})


def test_explicit_flags():
    assert plan_initialization(DistributedConfig(mode="explicit", **EXPLICIT), {}) == \
        InitPlan("explicit", "host0:8476", 4, 3)
    # flags alone select explicit initialisation, and win over a detected cluster
    assert plan_initialization(DistributedConfig(**EXPLICIT), SLURM) == InitPlan("explicit", "host0:8476", 4, 3)
    assert plan_initialization(DistributedConfig(mode="explicit", coordinator_address="localhost:1", num_processes=1,
                                                 process_id=0), {}) == InitPlan("explicit", "localhost:1", 1, 0)
    with pytest.raises(ValueError, match="needs --coordinator_address, --num_processes, --process_id as well"):
        plan_initialization(DistributedConfig(mode="explicit"), SLURM)
    with pytest.raises(ValueError, match="needs --num_processes, --process_id as well"):
        plan_initialization(DistributedConfig(coordinator_address="host0:8476"), {})
    with pytest.raises(ValueError, match="needs --coordinator_address as well"):
        plan_initialization(DistributedConfig(num_processes=2, process_id=0), {})
    for num_processes, process_id in ((4, 4), (4, -1), (0, 0)):
        with pytest.raises(ValueError, match=rf"--process_id={process_id} must lie in \[0, "
                                             rf"--num_processes={num_processes}\)"):
            plan_initialization(DistributedConfig(**{**EXPLICIT, "num_processes": num_processes,
                                                     "process_id": process_id}), {})
    for address in ("host0", "host0:", ":8476", "host0:port", "[::1]"):
        with pytest.raises(ValueError, match=r"needs HOST:PORT"):
            plan_initialization(DistributedConfig(**{**EXPLICIT, "coordinator_address": address}), {})


def test_off_and_bad_modes():
    for env in ({}, SLURM, KUBERNETES, {"TPU_WORKER_HOSTNAMES": "t0,t1"}):
        assert plan_initialization(DistributedConfig(mode="off"), env) is None
    assert runtime.initialize(DistributedConfig(mode="off"), env=SLURM) is None
    for flag, value in EXPLICIT.items():
        with pytest.raises(ValueError, match="--distributed=off ignores"):
            plan_initialization(DistributedConfig(mode="off", **{flag: value}), {})
    with pytest.raises(ValueError, match="--distributed='on': use auto, explicit or off"):
        plan_initialization(DistributedConfig(mode="on"), {})


# ----------------------------------------------------------------------------------------------- rules


def test_default_rules_table():
    table = dict(runtime.LOGICAL_AXIS_RULES)
    assert runtime.MESH_AXES == ("data", "model")
    for name in ("rows", "batch", "cache_batch"):
        assert table[name] == "data"
    for name in ("heads", "kv_heads", "mlp", "vocab", "cache_heads"):
        assert table[name] == "model"
    for name in ("length", "embed", "kv", "adapter", "positions"):
        assert table[name] is None
    assert runtime.logical_to_spec(("batch", "length", "heads", "kv")) == P("data", None, "model", None)


def test_parse_rules():
    assert runtime.parse_rules("") == {}
    assert runtime.parse_rules("heads=None,mlp=model") == {"heads": None, "mlp": "model"}
    assert runtime.parse_rules(" vocab = none , embed=data, ") == {"vocab": None, "embed": "data"}
    with pytest.raises(ValueError, match="'bogus=model': expected LOGICAL=MESH_AXIS"):
        runtime.parse_rules("heads=None,bogus=model")
    with pytest.raises(ValueError, match="'heads': expected LOGICAL=MESH_AXIS"):
        runtime.parse_rules("heads")
    with pytest.raises(ValueError, match="'heads=pipeline': mesh axis must be one of"):
        runtime.parse_rules("heads=pipeline")


def test_set_rules_overrides_then_restores_the_defaults():
    try:
        table = runtime.set_rules(runtime.parse_rules("heads=None,embed=model"))
        assert runtime.active_rules() == table
        assert [name for name, _ in table] == [name for name, _ in runtime.LOGICAL_AXIS_RULES]
        assert dict(table)["heads"] is None and dict(table)["embed"] == "model" and dict(table)["mlp"] == "model"
        assert runtime.logical_to_spec(("batch", "heads", "embed")) == P("data", None, "model")
        with pytest.raises(KeyError, match="no sharding rule for logical axes \\['bogus'\\]"):
            runtime.set_rules({"heads": "model", "bogus": None})
        assert runtime.active_rules() == table  # a refused override changes nothing
        assert runtime.set_rules() == runtime.LOGICAL_AXIS_RULES
        assert runtime.active_rules() == runtime.LOGICAL_AXIS_RULES
        assert runtime.logical_to_spec(("batch", "heads", "embed")) == P("data", "model", None)
    finally:
        runtime.set_rules()
    with pytest.raises(KeyError, match="no sharding rule for logical axes \\['bogus'\\]"):
        runtime.logical_to_spec(("batch", "bogus"))
    with pytest.raises(ValueError, match="'heads' -> 'model'"):
        runtime.mesh_spec(("batch", "heads"), ("data",))
    assert runtime.mesh_spec(("batch", "heads"), ("data",), rules={"batch": "data", "heads": None}) == P("data", None)


# ----------------------------------------------------------------------------------------------- mesh flags

MESH_FLAGS = textwrap.dedent("""
    import jax, pytest
    from absl import flags
    from jax.sharding import PartitionSpec as P
    from encoders import runtime
    from experiments.lib import runtime_flags
    assert jax.device_count() == 8 and jax.process_count() == 1
    flags.FLAGS(["prog", "--mesh_model=2", "--mesh_data=-1"])
    mesh = runtime.mesh_from_flags(runtime_flags.MESH_DATA.value, runtime_flags.MESH_MODEL.value)
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 4, "model": 2}, mesh
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert runtime.logical_sharding(mesh, ("rows", "mlp")).spec == P("data", "model")
    for data, model, shape in ((-1, 1, (8, 1)), (-1, 8, (1, 8)), (2, 2, (2, 2)), (1, 4, (1, 4))):
        got = runtime.mesh_from_flags(data, model)
        assert got.devices.shape == shape, (data, model, got)
        assert [d.id for d in got.devices.flat] == list(range(shape[0] * shape[1])), got  # the first devices
    assert runtime.mesh_from_flags(0, 1) is None and runtime.mesh_from_flags(1, 1) is None
    for data, model, message in ((-1, 3, "--mesh_model=3 does not divide the 8 devices"),
                                 (4, 4, "needs 16 devices, but 8 are available"),
                                 (-1, 0, "--mesh_model=0 must be a positive device count")):
        with pytest.raises(ValueError, match=message):
            runtime.mesh_from_flags(data, model)
    print("OK")
""")


def test_mesh_from_flags_on_8_fake_devices():
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", MESH_FLAGS], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr
