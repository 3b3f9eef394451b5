"""Attention of a token tree (speculative candidates) over a paged cache, through XLA.

The T tree tokens of row b sit in cache slots start[b] .. start[b]+T-1; each sees the row's cached
prefix (slots before start[b]) and the tree tokens `tree_mask` allows (its ancestors and itself).
Their rotary positions (prefix length + depth) differ from their slots, so both are given.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxllm.kv_cache import KVCache
from jaxllm.ops.attention import _attend, gather_pages


def paged_tree_attention(
    q: Float[Array, "B T Hkv G D"],
    cache: KVCache,
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "B Pmax"],
    positions: Int[Array, "B T"],
    start: Int[Array, "B"],
    tree_mask: Bool[Array, "T T"],
    sliding_window: Int[Array, ""] | int = 0,
    *,
    scale: float,
) -> Float[Array, "B T Hkv G D"]:
    """Row b's tree queries over its prefix slots [0, start[b]) and its tree slots; rows with
    start < 0 (padding) see nothing. A window W > 0 limits prefix keys to positions > position - W."""
    batch, t = q.shape[:2]
    if tuple(tree_mask.shape) != (t, t):
        raise ValueError(f"tree_mask must be [T, T] = [{t}, {t}] for {t} tree tokens, got {tuple(tree_mask.shape)}")
    k = gather_pages(cache.k, cache.k_scale, layer, page_table, q.dtype)
    v = gather_pages(cache.v, cache.v_scale, layer, page_table, q.dtype)
    key = jnp.arange(k.shape[1])[None, None, :]  # slot = position for prefix keys
    begin = start[:, None, None]
    rel = key - begin
    in_tree = (rel >= 0) & (rel < t)
    tree_ok = jnp.asarray(tree_mask)[None, :, :].repeat(batch, 0)  # [B, T, T]
    tree_ok = jnp.take_along_axis(tree_ok, jnp.broadcast_to(jnp.clip(rel, 0, t - 1), (batch, t, key.shape[-1])),
                                  axis=2)
    window = jnp.asarray(sliding_window)
    prefix = (key < begin) & ((window <= 0) | (key > positions[:, :, None] - window))
    visible = (prefix | (in_tree & tree_ok)) & (begin >= 0)
    return _attend(q, k, v, visible, scale)
