"""Paged KV cache: one page pool per layer stack, a page table per sequence."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from jaxllm.config import ModelConfig

SCRATCH_PAGE = 0  # page 0 absorbs writes of padding tokens and is never handed out


class KVCache(NamedTuple):
    """K and V page pools; int8/fp8 pools carry a float32 scale per token and head."""

    k: Float[Array, "L P S Hkv D"]
    v: Float[Array, "L P S Hkv D"]
    k_scale: Float[Array, "L P S Hkv"] | None = None
    v_scale: Float[Array, "L P S Hkv"] | None = None


class AttentionMeta(NamedTuple):
    """Where each token of a batch sits in its sequence and in the page pool."""

    positions: Int[Array, "B T"]  # token position in its sequence, -1 for padding
    page_table: Int[Array, "B Pmax"]  # page ids of each sequence, in order
    kv_lens: Int[Array, "B"]  # tokens cached per sequence once this batch is written
    # Token trees (speculative verification, `forward_tree`): row b's T tokens see its cached prefix,
    # slots [0, tree_start[b]), plus the tree tokens tree_mask[t] allows; None for ordinary chunks.
    tree_start: Int[Array, "B"] | None = None
    tree_mask: Bool[Array, "T T"] | None = None


def pages_for(num_tokens: int, page_size: int) -> int:
    return math.ceil(num_tokens / page_size)


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape: tuple[int, ...], dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def init_cache(config: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None,
               kv_cache_dtype: str = "auto") -> KVCache:
    """An all-zero cache of `num_pages` pages (page 0 is scratch), made on the devices.

    `sharding` is the pages' NamedSharding (KV heads split); scales drop its last axis.
    """
    from jaxllm.ops.kv_quant import storage_dtype

    shape = (config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim)
    make = _zeros_fn(shape, storage_dtype(kv_cache_dtype, dtype), sharding)
    if kv_cache_dtype == "auto":
        return KVCache(make(), make())
    scale_sharding = None if sharding is None else NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:4]))
    make_scales = _zeros_fn(shape[:4], jnp.dtype(jnp.float32), scale_sharding)
    return KVCache(make(), make(), make_scales(), make_scales())


def bytes_per_page(config: ModelConfig, page_size: int, dtype, kv_cache_dtype: str = "auto") -> int:
    """Device bytes of one page across all layers, K and V (scales included)."""
    from jaxllm.ops.kv_quant import storage_dtype

    values = page_size * config.num_kv_heads * config.head_dim * storage_dtype(kv_cache_dtype, dtype).itemsize
    scales = 0 if kv_cache_dtype == "auto" else page_size * config.num_kv_heads * 4
    return 2 * config.num_layers * (values + scales)


def free_device_bytes(devices, utilization: float) -> float | None:
    """The least, over `devices`, of `utilization` x the allocator's limit minus the bytes in use;
    None where a device reports no limit (the CPU)."""
    free = []
    for device in devices:
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] * utilization - stats.get("bytes_in_use", 0))
    return min(free)


def contiguous_page_table(batch: int, pages_per_seq: int) -> np.ndarray:
    """Sequence b owns pages 1 + b*pages_per_seq ... : the simple layout of one batched call."""
    first = SCRATCH_PAGE + 1
    return (first + np.arange(batch * pages_per_seq, dtype=np.int32)).reshape(batch, pages_per_seq)
