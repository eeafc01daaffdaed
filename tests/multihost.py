"""Multi-process test harness: one worker program run as N cooperating JAX processes on this machine.

Parent side (a pytest test)::

    results = multihost.run_processes(WORKER_SOURCE, num_processes=2, devices_per_process=2, args=[str(tmp_path)])
    values = multihost.check_ok(results)          # every process exited 0 and printed a RESULT line

Worker side (the program, run as ``python -c WORKER_SOURCE ARGS...``)::

    import multihost                               # found through PYTHONPATH, which the harness sets
    process_id, num_processes = multihost.worker_init()      # runtime.initialize(explicit) + start barrier
    ...                                            # the code under test, on jax.devices() of every process
    multihost.worker_finish({"rows": 8})           # end barrier, then prints "RESULT {json}"

Each child gets its process id, the process count and the coordinator address (a free localhost port) through
`MULTIHOST_*` environment variables, `JAX_NUM_CPU_DEVICES` CPU devices, and
`--xla_cpu_collective_timeout_seconds` in XLA_FLAGS, so a collective that some process skips fails instead of
hanging. Every child runs in its own process group under one wall-clock deadline: at the deadline (or a while
after a peer failed, or when the parent itself fails) every group is SIGKILLed, so no test leaves processes behind.

The file is deliberately not named ``multiprocess.py``: tests/ is on sys.path, and a module of that name would
shadow the `multiprocess` package that Hugging Face `datasets` imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
RESULT_PREFIX = "RESULT "
_ENV_COORDINATOR = "MULTIHOST_COORDINATOR"
_ENV_NUM_PROCESSES = "MULTIHOST_NUM_PROCESSES"
_ENV_PROCESS_ID = "MULTIHOST_PROCESS_ID"
_ENV_DEVICES = "MULTIHOST_DEVICES_PER_PROCESS"
_ENV_TIMEOUT = "MULTIHOST_TIMEOUT_S"
_ENV_COLLECTIVE_TIMEOUT = "MULTIHOST_COLLECTIVE_TIMEOUT_S"


# ----------------------------------------------------------------------------------------------- parent side


@dataclasses.dataclass
class Result:
    """How one worker process ended.

    `returncode` is negative for a signal (-9: SIGKILL); `killed` says the harness killed it (`timed_out`: at the
    deadline; otherwise after a peer failed); `result` is the JSON of its last ``RESULT`` line (None without one);
    `elapsed_s` is the time from its start to its exit as seen by the parent.
    """

    process_id: int
    returncode: int
    stdout: str
    stderr: str
    result: Any
    elapsed_s: float
    killed: bool = False
    timed_out: bool = False

    def summary(self, tail: int = 3000) -> str:
        """A few lines for an assertion message: exit status and the end of stderr and stdout."""
        how = " (killed at the deadline)" if self.timed_out else " (killed after a peer failed)" if self.killed else ""
        return (f"--- process {self.process_id}: rc={self.returncode}{how} after {self.elapsed_s:.1f}s\n"
                f"stdout tail:\n{self.stdout[-tail:]}\nstderr tail:\n{self.stderr[-tail:]}")


def free_port() -> int:
    """A TCP port that was free on localhost a moment ago (for the coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _xla_flags(existing: str, collective_timeout_s: int) -> str:
    """`existing` XLA_FLAGS without device-count or collective-timeout flags, plus the harness's timeout."""
    keep = [f for f in existing.split() if not f.startswith(("--xla_force_host_platform_device_count",
                                                               "--xla_cpu_collective_timeout_seconds"))]
    return " ".join(keep + [f"--xla_cpu_collective_timeout_seconds={collective_timeout_s}"])


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILLs the process group of `proc` (its own session), ignoring a group that is already gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _parse_result(stdout: str) -> Any:
    """The JSON of the last line starting with RESULT_PREFIX, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def run_processes(worker: str | Path, num_processes: int, devices_per_process: int = 2, *, timeout_s: float = 60,
                  args: Sequence[str] = (), env: Mapping[str, str] | None = None, collective_timeout_s: int = 30,
                  failure_grace_s: float | None = 10.0) -> list[Result]:
    """Runs `worker` (Python source, or a Path to a script) as `num_processes` JAX processes of
    `devices_per_process` CPU devices each, with `args` as argv[1:] and `env` added to the environment; returns
    one `Result` per process, in process order.

    Every process is SIGKILLed (with its process group) when `timeout_s` have passed since the start, when
    `failure_grace_s` (None: never) have passed since some process exited non-zero, or when this function is
    interrupted. `collective_timeout_s` turns a hung CPU collective into an error in the workers.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("num_processes and devices_per_process must be positive")
    command = [sys.executable, str(worker)] if isinstance(worker, Path) else [sys.executable, "-c", worker]
    command += [str(a) for a in args]
    coordinator = f"localhost:{free_port()}"
    base = dict(os.environ)
    base.update(env or {})
    base.update({
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(devices_per_process),
        "XLA_FLAGS": _xla_flags(base.get("XLA_FLAGS", ""), collective_timeout_s),
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO)] + ([base["PYTHONPATH"]] if base.get("PYTHONPATH")
                                                                      else [])),
        "PYTHONUNBUFFERED": "1",
        _ENV_COORDINATOR: coordinator,
        _ENV_NUM_PROCESSES: str(num_processes),
        _ENV_DEVICES: str(devices_per_process),
        _ENV_TIMEOUT: str(int(timeout_s)),
        _ENV_COLLECTIVE_TIMEOUT: str(collective_timeout_s),
    })
    procs: list[subprocess.Popen] = []
    ended: dict[int, float] = {}
    killed: set[int] = set()
    timed_out = False
    with contextlib.ExitStack() as files:
        outputs = [tuple(files.enter_context(tempfile.TemporaryFile("w+")) for _ in "oe")
                   for _ in range(num_processes)]  # files, not pipes: no pipe can fill up and block a worker
        start = time.monotonic()
        try:
            for i, (out, err) in enumerate(outputs):
                procs.append(subprocess.Popen(command, cwd=REPO, env={**base, _ENV_PROCESS_ID: str(i)}, stdout=out,
                                              stderr=err, stdin=subprocess.DEVNULL, start_new_session=True))
            first_failure: float | None = None
            while len(ended) < num_processes:
                now = time.monotonic()
                for i, proc in enumerate(procs):
                    if i not in ended and proc.poll() is not None:
                        ended[i] = now
                        if proc.returncode != 0 and first_failure is None:
                            first_failure = now
                if len(ended) == num_processes:
                    break
                timed_out = now - start > timeout_s
                if timed_out or (failure_grace_s is not None and first_failure is not None
                                 and now - first_failure > failure_grace_s):
                    for i, proc in enumerate(procs):
                        if i not in ended:
                            _kill_group(proc)
                            killed.add(i)
                    for i, proc in enumerate(procs):
                        if i not in ended:
                            proc.wait()
                            ended[i] = time.monotonic()
                    break
                time.sleep(0.05)
        finally:
            for proc in procs:  # what finished workers left in their group too, and everything on an exception
                _kill_group(proc)
            for proc in procs:
                proc.wait()
        results = []
        for i, (proc, (out, err)) in enumerate(zip(procs, outputs)):
            out.seek(0)
            err.seek(0)
            stdout = out.read()
            results.append(Result(i, proc.returncode, stdout, err.read(), _parse_result(stdout), ended[i] - start,
                                  killed=i in killed, timed_out=i in killed and timed_out))
    return results


def check_ok(results: Sequence[Result]) -> list[Any]:
    """Asserts that every process exited 0 and printed a RESULT line (else an AssertionError showing each
    process's exit and output tails); returns the parsed results in process order."""
    bad = [r for r in results if r.returncode != 0 or r.result is None]
    if bad:
        raise AssertionError(f"{len(bad)} of {len(results)} worker processes failed:\n"
                             + "\n".join(r.summary() for r in results))
    return [r.result for r in results]


def run_on_fake_devices(script: str, devices: int = 8) -> None:
    """Runs Python `script` in one subprocess with `devices` fake CPU devices
    (`--xla_force_host_platform_device_count`); it must exit 0 and print OK."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    print(proc.stdout)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


# ----------------------------------------------------------------------------------------------- worker side


def worker_env() -> tuple[int, int]:
    """In a worker: (process_id, num_processes) as the harness assigned them, without initialising anything."""
    return int(os.environ[_ENV_PROCESS_ID]), int(os.environ[_ENV_NUM_PROCESSES])


def worker_init(**config) -> tuple[int, int]:
    """In a worker: joins the harness's cluster through `encoders.runtime.initialize` (mode "explicit"; `config`
    overrides `DistributedConfig` fields such as `heartbeat_timeout_s`), checks the process and device counts, and
    waits at a start barrier. Returns (process_id, num_processes)."""
    import jax  # noqa: PLC0415  (workers only: the parent never imports jax for the harness)

    from encoders import runtime  # noqa: PLC0415

    process_id, num_processes = worker_env()
    fields = {"initialization_timeout_s": int(os.environ[_ENV_TIMEOUT]),
              "collective_timeout_s": int(os.environ[_ENV_COLLECTIVE_TIMEOUT]), **config}
    runtime.initialize(runtime.DistributedConfig(mode="explicit", coordinator_address=os.environ[_ENV_COORDINATOR],
                                                 num_processes=num_processes, process_id=process_id, **fields))
    devices = int(os.environ[_ENV_DEVICES])
    if (jax.process_index(), jax.process_count(), jax.local_device_count()) != (process_id, num_processes, devices):
        raise RuntimeError(f"worker {process_id}: jax sees process {jax.process_index()} of {jax.process_count()} "
                           f"with {jax.local_device_count()} local devices; expected {process_id} of {num_processes} "
                           f"with {devices}")
    runtime.barrier("multihost-start")
    return process_id, num_processes


def report(result: Any) -> None:
    """In a worker: prints `result` as the ``RESULT {json}`` line the parent parses (no barrier)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def worker_finish(result: Any) -> None:
    """In a worker: waits at the end barrier (so no process leaves while a peer still needs it), then `report`s."""
    from encoders import runtime  # noqa: PLC0415

    runtime.barrier("multihost-end")
    report(result)
