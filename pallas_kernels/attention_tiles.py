"""Building blocks shared by the paged attention kernels (Mosaic GPU, Lane semantics).

A compute warpgroup owns a 64-row query tile (wgmma's M); K/V tiles of `block_kv` keys arrive in
shared memory from a memory warpgroup that copies pages through the page table (`copy_tile`, which
also copies int8 / fp8 pages' per-token scales). Under Pallas' GPU interpreter (CPU tests) registers
have no layouts and wgmma takes neither transposed nor register operands, so there the products are
jnp dots on the tiles read from shared memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax


ROWS = 64  # wgmma's M for one warpgroup
COMPUTE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
QUANTIZED_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
# Promising in-bounds copies of contiguous memory lets Mosaic use a plain bulk copy (no tensor map,
# so no 256-element limit on a box side).
_CONTIGUOUS = plgpu.OOBFillMode.PROMISE_IN_BOUNDS


def smem_tile(shape, dtype):
    """A shared-memory tile in the layout wgmma and TMA use: rows of the widest swizzle (128 bytes
    for 16-bit tiles of 64 or more columns) that divides a row, in 8-row tiles."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = next(s for s in (128, 64, 32) if (shape[-1] * itemsize) % s == 0)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                                plgpu.SwizzleTransform(swizzle)))


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Register-level operations on one warpgroup's (ROWS x block_kv) scores and (ROWS x D) output."""

    interpret: bool
    dtype: Any
    head_dim: int
    block_kv: int

    def _layout(self, x, layout):
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def row_stat(self, value: float):
        """A (ROWS,) float32 vector laid out like a row reduction of the scores."""
        return self._layout(jnp.full((ROWS,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))

    def zero_output(self):
        return self._layout(jnp.zeros((ROWS, self.head_dim), jnp.float32), plgpu.Layout.WGMMA)

    def zero_tile(self):
        """Zeros in the input dtype, for clearing a query tile in shared memory."""
        return self._layout(jnp.zeros((ROWS, self.head_dim), self.dtype), plgpu.Layout.WGMMA)

    def iota(self, dim: int):
        """Row (dim 0) or key (dim 1) index within a score tile."""
        shape = (ROWS, self.block_kv)
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def scores(self, q_smem, k_smem, after_issue=None):
        """Q K^T in float32. `after_issue()`, if given, runs while the product is in flight."""
        if self.interpret:
            if after_issue is not None:
                after_issue()
            return jnp.dot(q_smem[...], k_smem[...].T, preferred_element_type=jnp.float32)

        def scope(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
            if after_issue is not None:
                after_issue()
            return acc_ref[...]

        return pl.run_scoped(scope, plgpu.ACC((ROWS, self.block_kv), jnp.float32))

    def accumulate_pv(self, acc, p, v_smem):
        """acc + P V, P in the input dtype."""
        p = p.astype(self.dtype)
        if self.interpret:
            return acc + jnp.dot(p, v_smem[...], preferred_element_type=jnp.float32)
        return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p, v_smem))(plgpu.ACC.init(acc))


def online_softmax(acc, m_i, l_i, s, visible, masked: float):
    """One FlashAttention step in log2 units: `s` are scores already scaled by log2(e)/sqrt(d);
    hidden ones become `masked` (`visible=None`: every score is seen). Returns the rescaled
    accumulator, new max and sum, and P."""
    if visible is not None:
        s = jnp.where(visible, s, masked)
    m_new = jnp.maximum(m_i, s.max(axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    return acc, m_new, l_i * alpha + p.sum(axis=1), p


def copy_tile(copies, *, layer, table_ref, b, h, token, page_size: int, block_kv: int, pmax: int):
    """Starts the TMA copies of keys [token, token + block_kv) of sequence b: each page id is read
    from the page table once, for every (src_ref, dst, barrier, is_scales) in `copies`. Values copy
    head h of each page (or the tile's slice of a page larger than the tile); scales copy every
    head's ([page_size * kv_heads] float32 a page in `src_ref`'s last axis, contiguous) as plain bulk
    copies, of any length but with no bounds check: page ids must index the pool."""
    if page_size >= block_kv:
        page = table_ref[b, jnp.minimum(lax.div(token, page_size), pmax - 1)]
        first = lax.rem(token, page_size)
        for src_ref, dst, barrier, is_scales in copies:
            if is_scales:
                kv_heads = src_ref.shape[-1] // page_size
                src = src_ref.at[layer, page, pl.ds(first * kv_heads, block_kv * kv_heads)]
                plgpu.copy_gmem_to_smem(src, dst, barrier, oob_mode=_CONTIGUOUS)
            else:
                plgpu.copy_gmem_to_smem(src_ref.at[layer, page, pl.ds(first, block_kv), h], dst, barrier)
        return
    for i in range(block_kv // page_size):
        page = table_ref[b, jnp.minimum(lax.div(token, page_size) + i, pmax - 1)]
        for src_ref, dst, barrier, is_scales in copies:
            if is_scales:
                per_page = src_ref.shape[-1]
                plgpu.copy_gmem_to_smem(src_ref.at[layer, page], dst.at[pl.ds(i * per_page, per_page)], barrier,
                                        oob_mode=_CONTIGUOUS)
            else:
                plgpu.copy_gmem_to_smem(src_ref.at[layer, page, :, h], dst.at[pl.ds(i * page_size, page_size)],
                                        barrier)


def copy_kv_pages(src_ref, dst, barrier, **page_args):
    """Starts the TMA copies of keys [token, token + block_kv) of sequence b, head h, into `dst`:
    one copy per page (or one slice of a page larger than the tile), all on `barrier`."""
    copy_tile([(src_ref, dst, barrier, False)], **page_args)


def check_pages(kv_heads: int, head_dim: int, k_pages, v_pages, block_kv: int, k_scale=None,
                v_scale=None) -> None:
    """ValueError unless the pages fit the kernels: shapes matching q, head_dim a multiple of 64,
    bf16/fp16 (or, with both scales given, int8/fp8 e4m3 with float32 [L, P, S, Hkv] scales), pages
    of a multiple of 8 tokens that divide or are divided by a K/V tile."""
    _, _, page_size, kv_heads_c, head_dim_c = k_pages.shape
    if (kv_heads_c, head_dim_c) != (kv_heads, head_dim) or v_pages.shape != k_pages.shape:
        raise ValueError(f"q with {kv_heads} KV heads of {head_dim} does not match pages k {k_pages.shape} "
                         f"/ v {v_pages.shape}")
    if head_dim % 64:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 64 for the kernel")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale must be given together (or neither)")
    if k_scale is None and k_pages.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"pages of {k_pages.dtype}: the kernel takes bfloat16 or float16")
    if page_size % 8 or (block_kv % page_size and page_size % block_kv):
        raise ValueError(f"page_size={page_size} must be a multiple of 8 that divides or is "
                         f"divided by block_kv={block_kv}")
    if k_scale is not None:
        _check_scales(k_pages, v_pages, k_scale, v_scale, block_kv)


def _check_scales(k_pages, v_pages, k_scale, v_scale, block_kv: int) -> None:
    if k_pages.dtype not in QUANTIZED_DTYPES or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"pages of {k_pages.dtype} / {v_pages.dtype} with scales: the kernel takes "
                         "int8 or float8_e4m3fn pages (both alike) with scales")
    for name, scales in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scales.shape != k_pages.shape[:4] or scales.dtype != jnp.float32:
            raise ValueError(f"{name} of {scales.dtype} {scales.shape}: the kernel takes float32 "
                             f"{k_pages.shape[:4]}, one scale per token and KV head")
    _, _, page_size, kv_heads, _ = k_pages.shape
    # Scales travel as whole rows of every head: copies of a multiple of 128 bytes.
    if min(page_size, block_kv) * kv_heads % 32:
        raise ValueError(f"page_size={page_size} x kv_heads={kv_heads} (at most block_kv={block_kv} "
                         "tokens a copy) must be a multiple of 32 for quantized pages")


def copies_per_tile(page_size: int, block_kv: int) -> int:
    return max(block_kv // page_size, 1)


def memory_loop(k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free, *, begin, steps,
                num_stages: int, before_copy=None, drain: bool = False, **page_args):
    """The memory warpgroup: for each step, wait for its slot to be free, then copy K and V.
    `before_copy(step)`, if given, runs before each step's copies are issued. `drain` also waits
    for the last slots' releases (the hardware does not need it; Pallas' GPU interpreter checks that
    a waiting thread sees every phase of a barrier, so with more steps than stages it does)."""

    def issue(step, carry):
        slot = lax.rem(step, num_stages)
        token = begin + step * page_args["block_kv"]
        if before_copy is not None:
            before_copy(step)

        @pl.when(step >= num_stages)
        def _():
            plgpu.barrier_wait(k_free.at[slot])

        copy_kv_pages(k_ref, k_smem.at[slot], k_ready.at[slot], token=token, **page_args)

        @pl.when(step >= num_stages)
        def _():
            plgpu.barrier_wait(v_free.at[slot])

        copy_kv_pages(v_ref, v_smem.at[slot], v_ready.at[slot], token=token, **page_args)
        return carry

    lax.fori_loop(0, steps, issue, None)
    if drain:
        def wait_free(step, carry):
            slot = lax.rem(step, num_stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            return carry

        lax.fori_loop(jnp.maximum(steps - num_stages, 0), steps, wait_free, None)
