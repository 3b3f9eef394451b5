"""The dispatch layer between models and kernels: models call these, never a kernel directly."""

from jaxllm.ops.attention import paged_attention, write_kv
from jaxllm.ops.matmul import einsum

__all__ = ["einsum", "paged_attention", "write_kv"]
