"""The dispatch layer between models and kernels: models call these, never a kernel directly."""

from jaxllm.ops.attention import (causal_attention, paged_attention, store_and_attend, store_kv,
                                  store_kv_layers, write_kv)
from jaxllm.ops.matmul import einsum, observing
from jaxllm.ops.topk import top_k
from jaxllm.ops.tree_attention import paged_tree_attention

__all__ = ["causal_attention", "einsum", "observing", "paged_attention", "paged_tree_attention", "store_and_attend",
           "store_kv", "store_kv_layers", "top_k", "write_kv"]
