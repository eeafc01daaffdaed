"""One-line description of the machine a benchmark ran on, for the committed result tables."""

from __future__ import annotations

import os
import platform


def describe(*extra: str) -> str:
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
