"""Shared pieces of the benchmark reports: the machine description and writing the markdown file."""

from __future__ import annotations

import os
import platform


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


def write_markdown(path: str, text: str) -> None:
    """Writes `text` to `path` (creating its folder) and says so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    print(f"wrote {path}")
