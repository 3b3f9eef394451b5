"""The model used when none is named."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("jaxllm")


def cache_dir() -> Path:
    return Path(os.environ.get("JAXLLM_CACHE", Path.home() / ".cache" / "jaxllm"))


def bundled_model_dir() -> Path:
    """The demo model shipped inside the package (scripts/train_demo_model.py made it)."""
    return Path(__file__).resolve().parent / "demo_model"


def default_model_dir() -> Path:
    """A tiny random-weight Llama, written once to the cache (a trained bundled model comes later).

    Its output is gibberish: it exists so that every command runs with no download.
    """
    from jaxllm.tiny_checkpoint import write_tiny_checkpoint

    path = cache_dir() / "tiny-random-llama"
    if not (path / "config.json").is_file():
        write_tiny_checkpoint(path, "LlamaForCausalLM", seed=0)
    log.warning("no model given: using a tiny random-weight Llama at %s (its text is gibberish)", path)
    return path
