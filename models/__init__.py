"""Model definitions as pure functions over parameter pytrees, and their registry."""

from models.registry import ModelSpec, get_model_spec, supported_architectures

__all__ = ["ModelSpec", "get_model_spec", "supported_architectures"]
