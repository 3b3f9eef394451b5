"""Model registry keyed by the Hugging Face `architectures` name."""

from __future__ import annotations

import dataclasses
from types import ModuleType

from models import llama, llama_checkpoint


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the runtime needs of an architecture: its forward and its checkpoint mapping."""

    name: str
    model: ModuleType  # param_axes, param_shapes, forward_hidden, forward_tree, logits
    checkpoint: ModuleType  # hf_global_names, hf_layer_names, hf_shapes, convert_global, convert_layer


_LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

REGISTRY: dict[str, ModelSpec] = {
    name: ModelSpec(name, llama, llama_checkpoint) for name in _LLAMA_FAMILY
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(REGISTRY))


def get_model_spec(architecture: str) -> ModelSpec:
    """The spec of `architecture`, or a ValueError listing what is supported."""
    try:
        return REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        ) from None
