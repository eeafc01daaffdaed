"""Shared pieces of the binaries: the machine description, the run stamp, writing the file, and the
`--compilation_cache_dir` flag of the binaries that fit heads or run cronos."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

from absl import flags

from encoders.runtime import atomic_write_bytes, atomic_write_text  # noqa: F401  (the one atomic writer, used as report.*)

COMPILATION_CACHE_FLAG = "compilation_cache_dir"


def define_compilation_cache_flag() -> None:
    """Defines `--compilation_cache_dir` (once per process, however many binaries' modules call it)."""
    if COMPILATION_CACHE_FLAG not in flags.FLAGS:
        flags.DEFINE_string(
            COMPILATION_CACHE_FLAG, None,
            "JAX's persistent compilation cache (compiled solves and models reused by later runs). Unset: "
            "$CRONOS_COMPILATION_CACHE, else ~/.cache/cronos/jax (or the directory JAX is already configured "
            "with); an empty string disables it (JAX's config is left alone).")


def enable_compilation_cache() -> str | None:
    """Enables the cache named by `--compilation_cache_dir` (see `cronos.enable_compilation_cache`); returns its
    directory, or None when the flag is the empty string. Binaries call it first thing in main."""
    value = flags.FLAGS[COMPILATION_CACHE_FLAG].value
    if value == "":
        return None
    from cronos import enable_compilation_cache as enable  # noqa: PLC0415

    return enable(value or None)


def machine(*extra: str) -> str:
    """CPU model, cores, RAM, OS, Python and jax versions (plus `extra` items, e.g. other libraries)."""
    import jax

    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    parts = [cpu, f"{os.cpu_count()} cores", f"{memory:.0f} GiB RAM", f"{platform.system()} {platform.machine()}",
             f"Python {platform.python_version()}", f"jax {jax.__version__} ({jax.default_backend()})", *extra]
    return ", ".join(parts)


def gemm_gflops(n: int = 2048, rounds: int = 5) -> float:
    """fp32 GEMM rate of this machine in GFLOP/s: jit-compiled `jnp.dot` of two n x n matrices, best of `rounds`
    after a warm-up call (how fast this CPU is today, so tables from different machines can be put side by side)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def median_range(values, digits: int = 2) -> str:
    """'median (min-max)' of a list of numbers: how every benchmark reports a quantity measured over rounds."""
    values = list(values)
    med = statistics.median(values)
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _espeak_version() -> str:
    try:
        out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "not installed"
    match = re.search(r"(\d+\.\d+(\.\d+)?)", out)
    return match.group(1) if match else out.strip()


@functools.lru_cache(maxsize=1)
def run_facts() -> str:
    """The machine line of the stamp: CPU, cores, RAM, fp32 GEMM GFLOP/s, jaxlib/torch/espeak-ng versions and the
    load average, measured once per process. Binaries call it first thing, so the GEMM rate is the idle machine's
    at the start of the run; the stamp says when it was measured."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{machine()}; fp32 GEMM {gemm_gflops():.0f} GFLOP/s (jnp.dot 2048^3, best of 5, measured at {date} "
            f"with load average {load}); jaxlib {_version('jaxlib')}, torch "
            f"{_version('torch')}, espeak-ng {_espeak_version()}")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def stamp() -> str:
    """Markdown lines naming the exact command, git commit (with `+dirty` for uncommitted changes), date, load and
    the machine (`run_facts`)."""
    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    command = "python -m " + " ".join(shlex.quote(a) for a in [sys.modules["__main__"].__spec__.name
                                                               if getattr(sys.modules["__main__"], "__spec__", None)
                                                               else sys.argv[0], *sys.argv[1:]])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Generated by `{command}` at commit `{commit}` on {date} (load average at the end {load}).\n"
            f"Machine: {run_facts()}.")


def write_markdown(path: str, text: str) -> None:
    """Writes `text` plus the run `stamp()` to `path` atomically and says so."""
    atomic_write_text(path, (text if text.endswith("\n") else text + "\n") + "\n" + stamp() + "\n")
    print(f"wrote {path}")
