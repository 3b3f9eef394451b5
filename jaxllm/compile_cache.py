"""XLA's persistent compilation cache, on by default so that a second process starts fast."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxllm" / "xla"


def enable_compilation_cache(path: str | Path | None = None) -> Path | None:
    """Points jax's persistent cache at `path` (default ~/.cache/jaxllm/xla), on GPUs and TPUs.

    JAXLLM_COMPILATION_CACHE=0 turns it off, =1 turns it on for any backend. It stays off on the
    CPU by default: jax 0.10.2 was seen to crash (SIGSEGV) writing a multi-device CPU executable
    to the cache. A directory the user configured is left alone. Returns the directory in use,
    or None when off.
    """
    setting = os.environ.get("JAXLLM_COMPILATION_CACHE")
    if setting == "0" or (setting != "1" and jax.default_backend() not in ("gpu", "cuda", "rocm", "tpu")):
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = Path(path or default_cache_dir())
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every executable: small ones add up across the buckets of a run.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
