"""encoders.runtime on several real JAX processes (localhost, CPU devices, gloo collectives), via tests/multihost.py.

Each test's reference is computed here, in the parent, with NumPy on the same data (or by hand), never by the
code under test. Workers get their data through files in tmp_path and report through `RESULT {json}` lines.
"""

import os
import signal
import textwrap
import time

import multihost  # tests/multihost.py (tests/ is on sys.path through conftest.py)
import numpy as np
import pytest


def _worker(body: str) -> str:
    """Worker source: imports, then `body`."""
    return "import sys, jax, numpy as np\nimport multihost\nfrom encoders import runtime\n" + textwrap.dedent(body)


# ----------------------------------------------------------------------------------------------- 2 x 2 processes
# Global rows, unequal data and process-0 writes share one run of 2 processes x 2 devices (a cluster start is most
# of a run's cost); each part reports separately and has its own test.

TWO_BY_TWO = _worker("""
    import os
    pid, n = multihost.worker_init()
    X, directory = np.load(sys.argv[1]), sys.argv[2]
    report = {}

    # global rows -> jitted computations over the 2x2 (or 4x1) mesh -> host
    lo, hi = runtime.process_block(X.shape[0])
    local = X[lo:hi]
    out = report["global_rows"] = {"block": [lo, hi]}
    for model in (1, 2):
        mesh = runtime.create_mesh(model=model)
        G = runtime.global_rows(local, mesh, X.shape[0])
        xtx = jax.jit(lambda a: a.T @ a)(G)
        sums = jax.jit(lambda a: a.sum(axis=1))(G)
        out[f"model{model}"] = {
            "mesh": [int(mesh.shape["data"]), int(mesh.shape["model"])],
            "shape": list(G.shape), "spec": [str(a) for a in G.sharding.spec],
            "fully_addressable": G.is_fully_addressable,
            "local_row_ranges": sorted({(s.index[0].start, s.index[0].stop) for s in G.addressable_shards}),
            "sums_spec": [str(a) for a in sums.sharding.spec],
            "xtx": runtime.to_host(xtx).tolist(), "sums": runtime.to_host(sums).tolist(),
            "to_host": runtime.to_host(G).tolist(),
        }
    out["gathered"] = runtime.gather_rows(local).tolist()
    out["broadcast"] = runtime.broadcast_from_writer(np.asarray([pid, 10 + pid])).tolist()

    # unequal data: every process must raise, none may hang
    mesh = runtime.create_mesh()
    errors = report["unequal"] = {}
    for name, call in (("global_rows", lambda: runtime.global_rows(np.zeros((3 if pid == 0 else 5, 2)), mesh, 8)),
                       ("global_rows_total", lambda: runtime.global_rows(np.zeros((2, 2)), mesh, 8)),
                       ("gather_rows", lambda: runtime.gather_rows(np.zeros((1 + pid, 2))))):
        try:
            call()
            errors[name] = None
        except ValueError as err:
            errors[name] = str(err)

    # only process 0 writes; the others see its file after a barrier
    if runtime.is_writer():
        runtime.atomic_write_text(os.path.join(directory, f"written-by-{pid}.txt"), f"process {pid} of {n}")
    runtime.barrier("written")
    with open(os.path.join(directory, "written-by-0.txt")) as f:
        report["writer"] = {"writer": runtime.is_writer(), "seen": f.read()}
    multihost.worker_finish(report)
""")

X_2X2 = np.random.default_rng(0).integers(-3, 4, size=(8, 3)).astype(np.float32)  # small integers: exact sums


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    """The 2 x 2 run: (its Results, the folder process 0 wrote into)."""
    root = tmp_path_factory.mktemp("two_by_two")
    np.save(root / "x.npy", X_2X2)
    (root / "written").mkdir()
    runs = multihost.run_processes(TWO_BY_TWO, 2, 2, args=[root / "x.npy", root / "written"], timeout_s=90)
    return runs, root / "written"


def test_global_rows_and_jit_over_two_processes_equal_numpy(two_by_two):
    results = [out["global_rows"] for out in multihost.check_ok(two_by_two[0])]
    X = X_2X2
    xtx = X.astype(np.float64).T @ X.astype(np.float64)
    sums = X.astype(np.float64).sum(axis=1)
    for pid, out in enumerate(results):
        assert out["block"] == [4 * pid, 4 * pid + 4]
        for model, mesh in ((1, [4, 1]), (2, [2, 2])):
            got = out[f"model{model}"]
            assert got["mesh"] == mesh
            assert got["shape"] == [8, 3] and got["spec"] == ["data", "None"] and not got["fully_addressable"]
            # this process's devices hold only its own 4 rows (split over `data` when model=1)
            expected_ranges = ([[4 * pid, 4 * pid + 2], [4 * pid + 2, 4 * pid + 4]] if model == 1
                               else [[4 * pid, 4 * pid + 4]])
            assert got["local_row_ranges"] == expected_ranges
            assert got["sums_spec"] == ["data"]
            np.testing.assert_array_equal(np.asarray(got["xtx"]), xtx)
            np.testing.assert_array_equal(np.asarray(got["sums"]), sums)
            np.testing.assert_array_equal(np.asarray(got["to_host"], np.float32), X)
        np.testing.assert_array_equal(np.asarray(out["gathered"], np.float32), X)
        assert out["broadcast"] == [0, 10]


def test_unequal_local_rows_raise_on_every_process_without_hanging(two_by_two):
    runs = two_by_two[0]
    results = [out["unequal"] for out in multihost.check_ok(runs)]
    assert not any(r.killed for r in runs)  # neither the harness deadline nor a collective timeout was needed
    for errors in results:
        assert errors["global_rows"] is not None and "the number of local rows differs between processes" in \
            errors["global_rows"] and "{0: 3, 1: 5}" in errors["global_rows"], errors
        assert errors["global_rows_total"] == "2 process(es) x 2 local rows != 8 global rows", errors
        assert errors["gather_rows"] is not None and "{0: 1, 1: 2}" in errors["gather_rows"], errors


def test_only_process_zero_writes(two_by_two):
    runs, written = two_by_two
    results = [out["writer"] for out in multihost.check_ok(runs)]
    assert results == [{"writer": True, "seen": "process 0 of 2"}, {"writer": False, "seen": "process 0 of 2"}]
    assert os.listdir(written) == ["written-by-0.txt"]  # no other file, no temporary left behind
    assert (written / "written-by-0.txt").read_text() == "process 0 of 2"


# ----------------------------------------------------------------------------------------------- checkpoints

CHECKPOINT = _worker("""
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P
    pid, n = multihost.worker_env()
    if n > 1:  # one process restores as a plain single-process run, without the distributed runtime
        multihost.worker_init()
    mode, directory, data, model = sys.argv[1], sys.argv[2], np.load(sys.argv[3]), int(sys.argv[4])
    mesh = runtime.create_mesh(model=model)
    shardings = {"w": runtime.logical_sharding(mesh, ("rows", "mlp")), "b": runtime.logical_sharding(mesh, ("mlp",)),
                 "step": NamedSharding(mesh, P())}
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    if mode == "save":
        lo, hi = runtime.process_block(data["w"].shape[0])
        state = {"w": runtime.global_rows(data["w"][lo:hi], mesh, data["w"].shape[0], ("rows", "mlp")),
                 "b": runtime.place(data["b"], shardings["b"]),
                 "step": runtime.place(np.asarray(int(data["step"]), np.int32), shardings["step"])}
        manager.save(int(data["step"]), args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    else:
        abstract = {k: jax.ShapeDtypeStruct(data[k].shape, data[k].dtype, sharding=shardings[k]) for k in shardings}
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    manager.close()
    multihost.worker_finish({
        "latest_step": manager.latest_step() if mode == "restore" else None,
        "mesh": [int(mesh.shape["data"]), int(mesh.shape["model"])],
        "shardings_match": {k: state[k].sharding == shardings[k] for k in state},
        "global": {k: not state[k].is_fully_addressable for k in state} if n > 1 else None,
        "process_count": jax.process_count(),
        "dtypes": {k: str(state[k].dtype) for k in state},
        "values": {k: runtime.to_host(state[k]).tolist() for k in state},
    })
""")


def test_checkpoint_saved_by_2x2_restores_on_1x4_and_4x1(tmp_path):
    rng = np.random.default_rng(1)
    data = {"w": rng.standard_normal((8, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32),
            "step": np.asarray(7, np.int32)}
    np.savez(tmp_path / "data.npz", **data)
    directory = tmp_path / "ckpt"
    # (processes, devices each, model axis): saved on a 2x2 (data x model) mesh over 2 processes, restored onto
    # a 1x4 mesh of one process and a 4x1 mesh of four processes (every shard boundary moves)
    for mode, processes, devices, model, mesh in (("save", 2, 2, 2, [2, 2]), ("restore", 1, 4, 4, [1, 4]),
                                                   ("restore", 4, 1, 1, [4, 1])):
        results = multihost.check_ok(multihost.run_processes(
            CHECKPOINT, processes, devices, args=[mode, directory, tmp_path / "data.npz", model], timeout_s=90))
        for out in results:
            assert out["mesh"] == mesh and out["process_count"] == processes
            assert out["shardings_match"] == {"w": True, "b": True, "step": True}
            if processes > 1:
                assert out["global"] == {"w": True, "b": True, "step": True}
            assert out["dtypes"] == {"w": "float32", "b": "float32", "step": "int32"}
            if mode == "restore":
                assert out["latest_step"] == 7
            for key, value in data.items():
                np.testing.assert_array_equal(np.asarray(out["values"][key], value.dtype), value, err_msg=key)
        if mode == "save":
            assert sorted(os.listdir(directory)) == ["7"]


# ----------------------------------------------------------------------------------------------- input sharding

GRAIN = _worker("""
    import grain
    pid, n = multihost.worker_init()
    records = int(sys.argv[1])
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    sampler = grain.samplers.IndexSampler(records, shard_options=shard, shuffle=True, num_epochs=1, seed=0)
    source = grain.MapDataset.source([1000 + k for k in range(records)])
    loader = [int(v) - 1000 for v in grain.DataLoader(data_source=source, sampler=sampler, worker_count=0)]
    per = records // shard.shard_count
    block = (grain.MapDataset.source(list(range(records)))[shard.shard_index * per:(shard.shard_index + 1) * per]
             .shuffle(seed=1).batch(2))
    sliced = [int(v) for batch in block.to_iter_dataset() for v in np.asarray(batch).reshape(-1)]
    multihost.worker_finish({"shard": [shard.shard_index, shard.shard_count], "loader": loader, "sliced": sliced})
""")


@pytest.mark.parametrize("processes, expected", [(2, set(range(10))), (4, set(range(8)))])  # 11 records: drop 1, 3
def test_grain_shards_cover_records_disjointly(processes, expected):
    results = multihost.check_ok(multihost.run_processes(GRAIN, processes, 1, args=[11]))
    for pipeline in ("loader", "sliced"):
        seen = [out[pipeline] for out in results]
        assert [out["shard"] for out in results] == [[p, processes] for p in range(processes)]
        assert [len(s) for s in seen] == [11 // processes] * processes, (pipeline, seen)
        assert all(len(set(s)) == len(s) for s in seen), (pipeline, seen)
        for a in range(processes):
            for b in range(a + 1, processes):
                assert not set(seen[a]) & set(seen[b]), (pipeline, seen)
        assert set().union(*map(set, seen)) == expected, (pipeline, seen)


# ----------------------------------------------------------------------------------------------- a dead peer

KILLED = _worker("""
    import os, signal, time
    pid, n = multihost.worker_init(heartbeat_timeout_s=5)
    print("initialised", flush=True)
    if pid == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)  # no collective: only the heartbeat can end process 0
    multihost.report({"survived": pid})
""")


def test_killed_peer_ends_the_survivor_within_the_heartbeat_timeout():
    survivor, victim = multihost.run_processes(KILLED, 2, 1, timeout_s=60, failure_grace_s=None)
    assert victim.returncode == -signal.SIGKILL and "initialised" in victim.stdout, victim.summary()
    assert "initialised" in survivor.stdout and survivor.result is None, survivor.summary()
    assert survivor.returncode != 0 and not survivor.killed, survivor.summary()
    assert "heartbeat" in survivor.stderr.lower(), survivor.summary()  # jax 0.10: "stopped sending heartbeats"
    # 5 s heartbeat timeout: ended well before the harness deadline (60 s) and its own 120 s sleep
    assert survivor.elapsed_s - victim.elapsed_s < 25, survivor.summary()


# ----------------------------------------------------------------------------------------------- the harness

HANGING = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen(["sleep", "300"])  # a grandchild in the worker's process group
    print("grandchild", child.pid, flush=True)
    if os.environ["MULTIHOST_PROCESS_ID"] == "1" and sys.argv[1] == "fail":
        sys.exit(3)
    time.sleep(300)
""")


def _gone(pid: int) -> bool:
    """True once `pid` no longer runs (absent, or a zombie waiting for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_harness_kills_hung_workers_and_their_children():
    for mode, timeout_s in (("hang", 2), ("fail", 60)):
        results = multihost.run_processes(HANGING, 2, 1, args=[mode], timeout_s=timeout_s, failure_grace_s=1)
        grandchildren = [int(r.stdout.split()[1]) for r in results]
        if mode == "hang":  # both killed at the deadline
            assert [(r.returncode, r.killed, r.timed_out) for r in results] == [(-9, True, True)] * 2
            assert all(2 <= r.elapsed_s < 30 for r in results), [r.elapsed_s for r in results]
        else:  # process 1 failed: process 0 killed a grace second later, long before the deadline
            assert [(r.returncode, r.killed, r.timed_out) for r in results] == [(-9, True, False), (3, False, False)]
            assert results[0].elapsed_s < 30, results[0].elapsed_s
        deadline = time.monotonic() + 10
        while not all(map(_gone, grandchildren)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(map(_gone, grandchildren)), grandchildren
