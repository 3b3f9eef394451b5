"""Attention over a paged KV cache (jnp reference; Pallas kernels plug in here later)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

_MASKED = -1e30  # finite, so rows with no visible key (padding) stay finite, not NaN


def write_kv(
    pages: Float[Array, "L P S Hkv D"],
    layer: Int[Array, ""],
    new: Float[Array, "B T Hkv D"],
    page_table: Int[Array, "B Pmax"],
    positions: Int[Array, "B T"],
) -> Float[Array, "L P S Hkv D"]:
    """Stores `new[b, t]` at token position `positions[b, t]` of sequence b.

    Padding tokens (position < 0) land in page 0, which the cache reserves as scratch.
    """
    page_size = pages.shape[2]
    safe_pos = jnp.maximum(positions, 0)
    page = jnp.take_along_axis(page_table, safe_pos // page_size, axis=1)
    page = jnp.where(positions >= 0, page, 0)
    slot = jnp.where(positions >= 0, safe_pos % page_size, 0)
    return pages.at[layer, page, slot].set(new.astype(pages.dtype))


def _attend(q, k, v, visible, scale):
    """softmax(q k^T * scale, over visible keys) v, with the statistics in float32."""
    scores = jnp.einsum("bthgd,bshd->bhgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgts,bshd->bthgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _visible(key_pos, query_pos, sliding_window):
    """Causal mask, narrowed to the last W positions when a window W > 0 is set."""
    window = jnp.asarray(sliding_window)
    return (key_pos <= query_pos) & ((window <= 0) | (key_pos > query_pos - window))


def causal_attention(
    q: Float[Array, "B T Hkv G D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    positions: Int[Array, "B T"],
    sliding_window: Int[Array, ""] | int = 0,
    *,
    scale: float,
) -> Float[Array, "B T Hkv G D"]:
    """Causal self-attention within one chunk, no cache (training and scoring)."""
    visible = _visible(positions[:, None, :], positions[:, :, None], sliding_window)
    visible &= (positions >= 0)[:, None, :]
    return _attend(q, k, v, visible, scale)


def paged_attention(
    q: Float[Array, "B T Hkv G D"],
    k_pages: Float[Array, "P S Hkv D"],
    v_pages: Float[Array, "P S Hkv D"],
    page_table: Int[Array, "B Pmax"],
    positions: Int[Array, "B T"],
    kv_lens: Int[Array, "B"],
    sliding_window: Int[Array, ""] | int = 0,
    *,
    scale: float,
) -> Float[Array, "B T Hkv G D"]:
    """Causal attention of queries at `positions` over each sequence's cached keys.

    Key j of sequence b is visible to a query at position p when j <= p, j < kv_lens[b] and,
    with a window W > 0, j > p - W (the window holds W tokens, the query's own included).
    """
    batch, pmax = page_table.shape
    page_size = k_pages.shape[1]
    k = k_pages[page_table].reshape(batch, pmax * page_size, *k_pages.shape[2:])
    v = v_pages[page_table].reshape(batch, pmax * page_size, *v_pages.shape[2:])
    key_pos = jnp.arange(pmax * page_size)[None, None, :]
    visible = _visible(key_pos, positions[:, :, None], sliding_window)
    visible &= key_pos < kv_lens[:, None, None]
    return _attend(q, k, v, visible, scale)
