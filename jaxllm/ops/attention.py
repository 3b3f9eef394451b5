"""Attention over a paged KV cache: the jnp reference, and the Pallas kernels where they apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm.kv_cache import KVCache
from jaxllm.ops.kv_quant import dequantize, quantize

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
    page, slot = slot_address(page_table, positions, pages.shape[2])
    new = new.astype(pages.dtype)
    if positions.size == 1:
        # One token (batch-1 decode): XLA would guard a one-update scatter with a read and a
        # select of the old value, two kernels more than this in-place update.
        start = (jnp.asarray(layer, jnp.int32), page[0, 0], slot[0, 0]) + (jnp.int32(0),) * (pages.ndim - 3)
        return jax.lax.dynamic_update_slice(pages, new.reshape((1, 1, 1) + new.shape[2:]), start)
    return pages.at[layer, page, slot].set(new)


def quantized_kind(cache: KVCache) -> str:
    """The kv_cache_dtype name ("int8" or "fp8_e4m3") of a cache that holds scales."""
    return "int8" if cache.k.dtype == jnp.int8 else "fp8_e4m3"


def store_kv_layers(
    cache: KVCache,
    k: Float[Array, "L B T Hkv D"],
    v: Float[Array, "L B T Hkv D"],
    page_table: Int[Array, "B Pmax"],
    positions: Int[Array, "B T"],
) -> KVCache:
    """Every layer's K/V of tokens at `positions` (-1: the scratch page) stored at once, quantized
    when the cache holds scales: what `store_kv` does layer by layer, in one scatter per array."""
    want = (cache.k.shape[0], *positions.shape, *cache.k.shape[3:])
    if k.shape != want or v.shape != want:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [layers, batch, tokens, "
                         f"kv_heads, head_dim] = {want} for this cache and positions {tuple(positions.shape)}")
    page, slot = slot_address(page_table, positions, cache.k.shape[2])
    write = lambda pages, new: pages.at[:, page, slot].set(new.astype(pages.dtype))
    if cache.k_scale is None:
        return KVCache(write(cache.k, k), write(cache.v, v))
    (qk, sk), (qv, sv) = quantize(k, quantized_kind(cache)), quantize(v, quantized_kind(cache))
    return KVCache(write(cache.k, qk), write(cache.v, qv), write(cache.k_scale, sk), write(cache.v_scale, sv))


def slot_address(page_table: Int[Array, "B Pmax"], positions: Int[Array, "B T"], page_size: int):
    """(page, slot in page) of token position `positions[b, t]` of sequence b; -1 maps to the
    scratch page 0, slot 0."""
    safe = jnp.maximum(positions, 0)
    page = jnp.take_along_axis(page_table, safe // page_size, axis=1)
    return jnp.where(positions >= 0, page, 0), jnp.where(positions >= 0, safe % page_size, 0)


def gather_pages(pages, scales, layer, page_table: Int[Array, "B Pmax"], dtype) -> Float[Array, "B Pmax*S Hkv D"]:
    """One layer's K or V of every page in each row's table, as one sequence per row (int8 / fp8
    pages dequantized to `dtype` after the gather, so only the context's pages are touched)."""
    x = pages[layer][page_table]  # [B, Pmax, S, Hkv, D]
    if scales is not None:
        x = dequantize(x, scales[layer][page_table], dtype)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


# cuDNN's fused attention for the XLA path's softmax(q k^T) v on GPUs, for chunks of at least
# CUDNN_MIN_QUERIES tokens (one kernel where XLA runs about ten a layer: products, transposes, the
# masked max, exp, sum and scale). The Pallas kernels still take the shapes they support; this
# serves the rest (head_dim 32, token trees). Measured on an H200 with the bundled model
# (benchmarks/NOTES.md): a 62-node Medusa tree 13 us a layer against XLA's ~22; one query (decode)
# 0.975x end to end through cuDNN, five (n-gram verify) 13.5 us a layer against XLA's ~9.
CUDNN_ATTENTION = True
CUDNN_MIN_QUERIES = 32
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _attend(q, k, v, visible, scale, backend: str = "auto"):
    """softmax(q k^T * scale, over visible keys) v, with the statistics in float32: through cuDNN's
    fused attention on a GPU for CUDNN_MIN_QUERIES tokens or more where it takes the shapes (checked
    when traced) unless `backend` is "xla" (XLA's ops only; also what tensor parallelism runs), else
    through XLA."""
    if (CUDNN_ATTENTION and backend != "xla" and q.shape[1] >= CUDNN_MIN_QUERIES and q.dtype in _CUDNN_DTYPES
            and jax.default_backend() == "gpu"):
        batch, t, kv_heads, groups, head_dim = q.shape
        try:
            out = jax.nn.dot_product_attention(
                q.reshape(batch, t, kv_heads * groups, head_dim), k.astype(q.dtype), v.astype(q.dtype),
                mask=visible[:, None], scale=scale, implementation="cudnn")
            return out.reshape(q.shape)
        except (NotImplementedError, ValueError, RuntimeError):
            pass  # a shape, dtype or cuDNN version it does not take
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
    backend: str = "auto",
) -> Float[Array, "B T Hkv G D"]:
    """Causal self-attention within one chunk, no cache (training and scoring); `backend` "xla"
    keeps it off cuDNN."""
    visible = _visible(positions[:, None, :], positions[:, :, None], sliding_window)
    visible &= (positions >= 0)[:, None, :]
    return _attend(q, k, v, visible, scale, backend)


def store_kv(
    cache: KVCache,
    layer: Int[Array, ""] | int,
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    page_table: Int[Array, "B Pmax"],
    positions: Int[Array, "B T"],
) -> KVCache:
    """Writes one layer's new K/V into the cache, quantized when the cache holds scales."""
    if cache.k_scale is None:
        return KVCache(write_kv(cache.k, layer, k, page_table, positions),
                       write_kv(cache.v, layer, v, page_table, positions))
    (qk, sk), (qv, sv) = quantize(k, quantized_kind(cache)), quantize(v, quantized_kind(cache))
    return KVCache(write_kv(cache.k, layer, qk, page_table, positions),
                   write_kv(cache.v, layer, qv, page_table, positions),
                   write_kv(cache.k_scale, layer, sk, page_table, positions),
                   write_kv(cache.v_scale, layer, sv, page_table, positions))


def paged_attention(
    q: Float[Array, "B T Hkv G D"],
    cache: KVCache,
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "B Pmax"],
    positions: Int[Array, "B T"],
    kv_lens: Int[Array, "B"],
    sliding_window: Int[Array, ""] | int = 0,
    *,
    scale: float,
    backend: str = "xla",
) -> Float[Array, "B T Hkv G D"]:
    """Causal attention of queries at `positions` over each sequence's cached keys of `layer`.

    Key j of sequence b is visible to a query at position p when j <= p, j < kv_lens[b] and,
    with a window W > 0, j > p - W (the window holds W tokens, the query's own included).
    Quantized pages are dequantized after the gather, so only the context's pages are touched.
    `backend` (ModelConfig.attention_backend) picks a Pallas kernel where one applies (decode over
    quantized pages included; prefill over them stays here); the prefill kernel expects each row's
    positions to be consecutive, then -1 padding (as prefill chunks are).
    """
    if _kernel_applies(backend, q, cache):
        return _kernel(q, cache, layer, page_table, positions, kv_lens, sliding_window, scale)
    k = gather_pages(cache.k, cache.k_scale, layer, page_table, q.dtype)
    v = gather_pages(cache.v, cache.v_scale, layer, page_table, q.dtype)
    key_pos = jnp.arange(k.shape[1])[None, None, :]
    visible = _visible(key_pos, positions[:, :, None], sliding_window)
    visible &= key_pos < kv_lens[:, None, None]
    return _attend(q, k, v, visible, scale, backend)


# Measured on an H200 (benchmarks/NOTES.md): storing in the kernel gains 1 % at batch-1 decode, is
# even at batch 8 and costs the kernel 3 % at batch 64 (4096-token contexts).
STORE_IN_KERNEL_MAX_BATCH = 8


def store_and_attend(
    q: Float[Array, "B T Hkv G D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    cache: KVCache,
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "B Pmax"],
    positions: Int[Array, "B T"],
    kv_lens: Int[Array, "B"],
    sliding_window: Int[Array, ""] | int = 0,
    *,
    scale: float,
    backend: str = "xla",
) -> tuple[Float[Array, "B T Hkv G D"], KVCache]:
    """`store_kv`, then `paged_attention`: the new tokens' K/V written, then attended over.

    One token per sequence, for up to STORE_IN_KERNEL_MAX_BATCH sequences over bf16/fp16 pages,
    goes, where the decode kernel applies, to the kernel that stores the token itself (no
    cache-update kernels of its own; padding rows store nothing there, where `store_kv` writes them
    to the scratch page).
    """
    if (q.shape[1] == 1 and q.shape[0] <= STORE_IN_KERNEL_MAX_BATCH and cache.k_scale is None
            and _kernel_applies(backend, q, cache)):
        from pallas_kernels.paged_decode_attention import paged_decode_attention_append

        # The token sees keys up to its own position (kv_lens, by AttentionMeta's contract, is that
        # position + 1 or more); padding rows, at -1, see none and store nothing.
        lens = jnp.maximum(positions[:, 0] + 1, 0)
        out, k_pages, v_pages = paged_decode_attention_append(
            q[:, 0], k[:, 0], v[:, 0], cache.k, cache.v, layer, page_table, lens, sliding_window, scale=scale,
            interpret=jax.default_backend() != "gpu")
        return out[:, None], KVCache(k_pages, v_pages)
    cache = store_kv(cache, layer, k, v, page_table, positions)
    return paged_attention(q, cache, layer, page_table, positions, kv_lens, sliding_window, scale=scale,
                           backend=backend), cache


def kernel_limits(q_shape, cache: KVCache, q_dtype=None) -> str | None:
    """Why no Pallas attention kernel can take this call, or None when one can (the decode kernel
    for one query token per sequence, on bf16/fp16 or int8/fp8 pages; the prefill kernel for more,
    on bf16/fp16 pages). `q_dtype`, when given, is checked too (bfloat16 or float16 over quantized pages)."""
    from pallas_kernels.attention_tiles import COMPUTE_DTYPES, ROWS, check_pages

    _, tokens, kv_heads, groups, head_dim = q_shape
    if cache.k_scale is not None:
        if tokens > 1:
            return f"quantized pages ({cache.k.dtype}): the prefill kernel takes bfloat16 or float16 pages"
        if q_dtype is not None and jnp.dtype(q_dtype) not in COMPUTE_DTYPES:
            return f"q of {jnp.dtype(q_dtype)} over quantized pages (the decode kernel takes bfloat16 or float16 queries)"
    try:  # the kernels' own checks, with their default 64-key tiles
        check_pages(kv_heads, head_dim, cache.k, cache.v, 64, cache.k_scale, cache.v_scale)
    except ValueError as err:
        return str(err)
    if tokens == 1 and groups > ROWS:
        return f"{groups} query heads per KV head (at most {ROWS})"
    if tokens > 1 and ROWS % groups:
        return f"{groups} query heads per KV head (a divisor of {ROWS} for prefill)"
    return None


def _kernel_applies(backend: str, q, cache: KVCache) -> bool:
    if backend == "xla":
        return False
    reason = kernel_limits(q.shape, cache, q.dtype)
    if backend == "pallas" and reason is not None:
        raise ValueError(f"attention_backend='pallas' cannot run attention here: {reason}")
    return reason is None and (backend == "pallas" or jax.default_backend() == "gpu")


def _kernel(q, cache, layer, page_table, positions, kv_lens, sliding_window, scale):
    interpret = jax.default_backend() != "gpu"
    if q.shape[1] > 1:
        from pallas_kernels.paged_prefill_attention import paged_prefill_attention

        return paged_prefill_attention(q, cache.k, cache.v, layer, page_table, positions, kv_lens,
                                       sliding_window, scale=scale, interpret=interpret)
    from pallas_kernels.paged_decode_attention import paged_decode_attention

    # The query sees keys up to its own position (padding rows, at -1, see none).
    lens = jnp.minimum(positions[:, 0] + 1, kv_lens)
    out = paged_decode_attention(q[:, 0], cache.k, cache.v, layer, page_table, lens, sliding_window,
                                 scale=scale, k_scale=cache.k_scale, v_scale=cache.v_scale, interpret=interpret)
    return out[:, None]
