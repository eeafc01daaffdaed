"""JAX's persistent compilation cache for cronos: compiled solves are reused across processes.

    import cronos
    cronos.enable_compilation_cache()  # ~/.cache/cronos/jax, or $CRONOS_COMPILATION_CACHE

A cache hit replaces the seconds of XLA compilation a fresh process spends on each solve shape with a
file read. The cache is trusted code (JAX's own warning): keep it in a directory only you can write.
"""

from __future__ import annotations

import os

import jax

__all__ = ["DEFAULT_DIRECTORY", "ENV_VAR", "default_directory", "enable_compilation_cache"]

ENV_VAR = "CRONOS_COMPILATION_CACHE"
DEFAULT_DIRECTORY = os.path.join("~", ".cache", "cronos", "jax")


def default_directory() -> str:
    """$CRONOS_COMPILATION_CACHE if set and non-empty, else ~/.cache/cronos/jax (expanded, absolute)."""
    return os.path.abspath(os.path.expanduser(os.environ.get(ENV_VAR) or DEFAULT_DIRECTORY))


def enable_compilation_cache(directory: str | os.PathLike | None = None, *, min_compile_time_secs: float = 0.0) -> str:
    """Turns on JAX's persistent compilation cache in `directory` (created if missing); returns it.

    directory: None keeps the directory JAX is already configured with (e.g. an earlier call or
      JAX_COMPILATION_CACHE_DIR), else uses `default_directory()`.
    min_compile_time_secs: executables that compiled faster are not written (JAX's default is 1 s;
      0 caches every executable, CPU ones included).

    Idempotent: calling it again with the same directory changes nothing. It sets process-wide JAX
    options (jax_compilation_cache_dir, jax_enable_compilation_cache,
    jax_persistent_cache_min_compile_time_secs, and jax_persistent_cache_min_entry_size_bytes = -1, i.e.
    no size floor), so it affects every later compilation in the process, not only cronos's.
    """
    current = jax.config.jax_compilation_cache_dir
    if directory is None:
        directory = current or default_directory()
    directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    if not (min_compile_time_secs >= 0):
        raise ValueError(f"min_compile_time_secs must be a non-negative number, got {min_compile_time_secs}.")
    os.makedirs(directory, exist_ok=True)
    if current != directory:
        if current:
            # JAX binds its cache object to the first directory it used; rebind it to the new one.
            from jax.experimental.compilation_cache import (
                compilation_cache as jax_cache,  # noqa: PLC0415
            )

            jax_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", directory)
    if not jax.config.jax_enable_compilation_cache:
        jax.config.update("jax_enable_compilation_cache", True)
    if jax.config.jax_persistent_cache_min_compile_time_secs != min_compile_time_secs:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    if jax.config.jax_persistent_cache_min_entry_size_bytes != -1:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory
