"""The model used when none is named."""

from __future__ import annotations

from pathlib import Path


def bundled_model_dir() -> Path:
    """The demo model shipped inside the package (scripts/train_demo_model.py made it)."""
    return Path(__file__).resolve().parent / "demo_model"


def default_model_dir() -> Path:
    """The bundled demo model: a 6.8 M-parameter Llama trained on the Python standard library."""
    path = bundled_model_dir()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the bundled demo model is missing from {path}; reinstall jaxllm")
    return path
