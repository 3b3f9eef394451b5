"""Attention of a token tree (speculative candidates) over a paged cache, through XLA.

Each of row b's T tree tokens sees the row's cached prefix (slots before start[b]) and the tree
tokens `tree_mask` allows (its ancestors and itself); their rotary positions (prefix length + depth)
are given apart from start. The tree's keys are the step's own K/V (rounded or quantized as the
pages would hold them), not stored anywhere yet: the prefix then needs one mask per row and the tree
one constant [T, T] mask, where attending over stored tree slots needed a per-query gather of
`tree_mask` (on an H200, the bundled model's Medusa step spent 35 us of ~380 in that masked reduction).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxllm.kv_cache import KVCache
from jaxllm.ops.attention import _attend, gather_pages, quantized_kind
from jaxllm.ops.kv_quant import dequantize, quantize


def as_stored(x: Float[Array, "B T Hkv D"], cache: KVCache, dtype) -> Float[Array, "B T Hkv D"]:
    """K or V as a read of the pages gives it back: rounded to the page dtype, or quantized to int8 /
    fp8 with per-vector scales and dequantized to `dtype`."""
    if cache.k_scale is None:
        return x.astype(cache.k.dtype)
    return dequantize(*quantize(x, quantized_kind(cache)), dtype)


def paged_tree_attention(
    q: Float[Array, "B T Hkv G D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    cache: KVCache,
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "B Pmax"],
    positions: Int[Array, "B T"],
    start: Int[Array, "B"],
    tree_mask: Bool[Array, "T T"],
    sliding_window: Int[Array, ""] | int = 0,
    *,
    scale: float,
    backend: str = "auto",
) -> Float[Array, "B T Hkv G D"]:
    """Row b's tree queries over its prefix slots [0, start[b]) and the tree's own keys `k`, `v`
    (stored nowhere yet); rows with start < 0 (padding) see nothing. A window W > 0 limits prefix
    keys to positions > position - W. `backend` "xla" keeps it off cuDNN."""
    batch, t = q.shape[:2]
    if tuple(tree_mask.shape) != (t, t):
        raise ValueError(f"tree_mask must be [T, T] = [{t}, {t}] for {t} tree tokens, got {tuple(tree_mask.shape)}")
    if k.shape != v.shape or k.shape[:2] != (batch, t):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both hold the {t} tree tokens' K/V "
                         f"of {batch} rows")
    k_prefix = gather_pages(cache.k, cache.k_scale, layer, page_table, q.dtype)
    v_prefix = gather_pages(cache.v, cache.v_scale, layer, page_table, q.dtype)
    keys = jnp.concatenate([k_prefix, as_stored(k, cache, q.dtype)], axis=1)
    values = jnp.concatenate([v_prefix, as_stored(v, cache, q.dtype)], axis=1)
    key = jnp.arange(k_prefix.shape[1])[None, None, :]  # slot = position for prefix keys
    begin = start[:, None, None]
    window = jnp.asarray(sliding_window)
    prefix = (key < begin) & ((window <= 0) | (key > positions[:, :, None] - window))
    tree = jnp.broadcast_to(jnp.asarray(tree_mask)[None], (batch, t, t))
    visible = jnp.concatenate([prefix, tree], axis=2) & (begin >= 0)
    return _attend(q, keys, values, visible, scale, backend)
