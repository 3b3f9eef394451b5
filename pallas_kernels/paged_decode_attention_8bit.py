"""Paged decode attention over int8 / fp8 (e4m3) pages, with the query heads as wgmma's N side.

The bf16-page kernel pads a KV head's G query heads to wgmma's 64-row M tile, so its tensor work per
key is 64 / G times what the heads need; over bf16 pages that hides under the copies, over 8-bit
pages (half the bytes) it does not. Here the products are transposed so the keys fill M and the
query heads pad only to N = 16 (32 or 64 for more heads):

    S^T = K Q^T          K [keys, D] 8-bit in shared memory, converted in registers (fp8 -> float16,
                         int8 -> bfloat16, both exact) as wgmma's register operand; Q^T from shared memory.
    P^T = exp2(S^T * k_scale * c - m), per query head (column) statistics, times v_scale per key
    O^T += V^T P^T       V converted (unscaled) into shared memory by the memory warpgroup, read
                         transposed; P^T stored from registers as wgmma's B operand.

Scales multiply scores and probabilities (one per key and KV head), not the tiles. Over fp8 pages the
products run in float16, so q is clipped to float16's range first. One memory warpgroup copies each
tile's 8-bit K and V pages and both scale rows by TMA (`num_stages` deep) and converts V; K never
leaves registers. The output is O^T [D, N] per block, transposed back by the split merge. Blocks run
heads-fastest, so the heads of a sequence, which share each page's scale rows, read them from L2 at
about the same time. On an H200 at 64 sequences x 4096 keys: fp8 pages 0.208 ms, 1.36x the bf16-page
kernel in the same call and 1.72x the earlier dequantize-to-bf16 kernel (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import compat
from pallas_kernels.attention_tiles import copies_per_tile, copy_tile, smem_tile
from pallas_kernels.smem import swizzled

CONVERTED_SLOTS = 2  # converted V tiles between the memory and the compute warpgroup
F16_MAX = float(jnp.finfo(jnp.float16).max)
# K/V tiles in flight a block: 3 keeps a block's shared memory near 100 KB, so two blocks share an
# SM (4 fit one block and measured 1.5x slower on an H200; NOTES.md, twentieth session).
NUM_STAGES = 3


def product_dtype(page_dtype):
    """What the products take: float16 for fp8 pages (e4m3 converts to it in one instruction a pair),
    bfloat16 for int8 (its fast conversion; both exact)."""
    return jnp.dtype(jnp.float16 if jnp.dtype(page_dtype) == jnp.dtype(jnp.float8_e4m3fn) else jnp.bfloat16)


def query_columns(groups: int) -> int:
    """wgmma's N for G query heads: 16, 32 or 64 (P^T's shared-memory rows must be whole swizzles)."""
    return next(n for n in (16, 32, 64) if groups <= n)


@functools.lru_cache(maxsize=None)
def build(batch, kv_heads, groups, head_dim, page_size, pmax, out_dtype, splits, block_kv, num_stages, scale,
          interpret, page_dtype):
    """The kernel: (q [B, Hkv, N, D] in `product_dtype`, k8, v8, k_scale, v_scale (a page's scales as one row),
    layer [1], table, lens, starts) -> (O^T [B, Hkv, splits, D, N] out_dtype, lse [B, Hkv, splits, N])."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    cols = query_columns(groups)
    dtype = product_dtype(page_dtype)
    log2e_scale = scale * math.log2(math.e)
    p_swizzle = cols * 2  # bytes in a row of P^T; V's converted tile must use the same swizzle

    def layout(x, lay):
        return x if interpret else plgpu.layout_cast(x, lay)

    def column_stat(value):
        return layout(jnp.full((cols,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(0))

    def scale_column(scales_smem, head):
        """This head's per-key scales out of a tile's token-major [block_kv * kv_heads] scale row."""
        if interpret:
            return scales_smem[...].reshape(block_kv, kv_heads)[:, head]
        return compat.mgpu_load(scales_smem.reshape(block_kv, kv_heads).at[:, head],
                                layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)

    def scores_t(k8_smem, q_smem):
        """S^T = K Q^T in float32, K converted in registers."""
        if interpret:
            k = k8_smem[...].astype(dtype)
            return jnp.dot(k, q_smem[...].T, preferred_element_type=jnp.float32)
        k = compat.mgpu_load(k8_smem, layout=plgpu.Layout.WGMMA).astype(dtype)

        def scope(acc_ref):
            plgpu.wgmma(acc_ref, k, plgpu.transpose_ref(q_smem, (1, 0)))
            return acc_ref[...]

        return pl.run_scoped(scope, plgpu.ACC((block_kv, cols), jnp.float32))

    def accumulate_t(acc, v16_smem, p_smem):
        """acc + V^T P^T."""
        if interpret:
            return acc + jnp.dot(v16_smem[...].T, p_smem[...], preferred_element_type=jnp.float32)
        return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, plgpu.transpose_ref(v16_smem, (1, 0)), p_smem))(
            plgpu.ACC.init(acc))

    def softmax_step(s_t, acc, m_i, l_i, k_scale, key_base, lo, length):
        """One online-softmax step over S^T's keys (rows), per query head (column). l_i holds per-key
        partial sums, summed over keys once at the end: a reduction across warps fewer a step (the
        maximum needs its own)."""
        s_t = s_t * lax.broadcast_in_dim(k_scale, s_t.shape, [0])
        key = key_base + (
            lax.broadcasted_iota(jnp.int32, s_t.shape, 0) if interpret else
            plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0, layout=plgpu.Layout.WGMMA))
        # Every tile holds a visible key (the split starts inside [lo, length)), so -inf
        # never meets -inf in the running maximum.
        s_t = jnp.where((key >= lo) & (key < length), s_t, -jnp.inf)
        m_new = jnp.maximum(m_i, s_t.max(axis=0))
        alpha = jnp.exp2(m_i - m_new)
        p_t = jnp.exp2(s_t - lax.broadcast_in_dim(m_new, s_t.shape, [1]))
        l_i = l_i * lax.broadcast_in_dim(alpha, s_t.shape, [1]) + p_t
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])
        return acc, m_new, l_i, p_t

    def body(q_ref, k_ref, v_ref, ks_ref, vs_ref, layer_ref, table_ref, lens_ref, starts_ref, o_ref, lse_ref,
             scoped):
        (q_smem, k8, v8, k_scales, v_scales, v16, p_smem, out_smem, lse_smem), \
            (q_bar, k_arrived, v_arrived, v_ready), (k_free, v_free) = scoped
        b, h, s = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("s")
        length, lo = lens_ref[b], starts_ref[b]
        # This split's keys: an equal share of the sequence's steps, from the window's start.
        first = lax.div(lo, block_kv) * block_kv
        total_steps = lax.div(length - first + (block_kv - 1), block_kv)
        per_split = lax.div(total_steps + (splits - 1), splits)
        begin = first + s * per_split * block_kv
        steps = jnp.minimum(jnp.maximum(lax.div(length - begin + (block_kv - 1), block_kv), 0), per_split)
        page_args = dict(layer=layer_ref[0], table_ref=table_ref, b=b, h=h, page_size=page_size,
                         block_kv=block_kv, pmax=pmax)

        @pl.when(lax.axis_index("wg") == 0)
        def _compute():
            plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_bar)
            plgpu.barrier_wait(q_bar)

            def step_fn(step, carry):
                acc, m_i, l_i = carry
                slot, vslot = lax.rem(step, num_stages), lax.rem(step, CONVERTED_SLOTS)
                with jax.named_scope("wait_k"):  # scopes name the events of a Mosaic GPU profile
                    plgpu.barrier_wait(k_arrived.at[slot])
                with jax.named_scope("scores"):
                    k_scale = scale_column(k_scales.at[slot], h) * log2e_scale
                    v_scale = scale_column(v_scales.at[slot], h)
                    s_t = scores_t(k8.at[slot], q_smem)
                    plgpu.barrier_arrive(k_free.at[slot])
                with jax.named_scope("softmax"):
                    acc, m_new, l_i, p_t = softmax_step(s_t, acc, m_i, l_i, k_scale, begin + step * block_kv, lo,
                                                        length)
                with jax.named_scope("store_p"):
                    p_smem[...] = (p_t * lax.broadcast_in_dim(v_scale, p_t.shape, [0])).astype(dtype)
                    plgpu.commit_smem()  # every thread's P^T, before wgmma reads it
                with jax.named_scope("wait_v"):
                    plgpu.barrier_wait(v_ready.at[vslot])
                with jax.named_scope("pv"):
                    acc = accumulate_t(acc, v16.at[vslot], p_smem)
                plgpu.barrier_arrive(v_free.at[vslot])
                return acc, m_new, l_i

            init = (layout(jnp.zeros((head_dim, cols), jnp.float32), plgpu.Layout.WGMMA), column_stat(-jnp.inf),
                    layout(jnp.zeros((block_kv, cols), jnp.float32), plgpu.Layout.WGMMA))
            acc, m_i, l_i = lax.fori_loop(0, steps, step_fn, init)
            l_i = l_i.sum(axis=0)
            l_safe = jnp.maximum(l_i, 1e-30)  # an empty split leaves zeros and lse = -inf
            acc /= lax.broadcast_in_dim(l_safe, acc.shape, [1])
            out_smem[...] = acc.astype(out_dtype)
            lse_smem[...] = m_i + jnp.log(l_i) * (1.0 / math.log(2.0))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, o_ref.at[b, h, s])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, s])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(lax.axis_index("wg") == 1)
        def _memory():
            def issue(step):
                slot = lax.rem(step, num_stages)
                copy_tile([(k_ref, k8.at[slot], k_arrived.at[slot], False),
                           (ks_ref, k_scales.at[slot], k_arrived.at[slot], True),
                           (vs_ref, v_scales.at[slot], k_arrived.at[slot], True),
                           (v_ref, v8.at[slot], v_arrived.at[slot], False)],
                          token=begin + step * block_kv, **page_args)

            def prologue(step, carry):
                issue(step)
                return carry

            lax.fori_loop(0, jnp.minimum(steps, num_stages), prologue, None)

            def convert(step, carry):
                slot, vslot = lax.rem(step, num_stages), lax.rem(step, CONVERTED_SLOTS)
                with jax.named_scope("wait_v8"):
                    plgpu.barrier_wait(v_arrived.at[slot])

                    @pl.when(step >= CONVERTED_SLOTS)
                    def _():
                        plgpu.barrier_wait(v_free.at[vslot])

                with jax.named_scope("convert_v"):
                    if interpret:
                        v16.at[vslot][...] = v8.at[slot][...].astype(dtype)
                    else:  # 4 bytes a thread per load; wgmma reads the result, so the layout is free
                        v16.at[vslot][...] = compat.mgpu_load(
                            v8.at[slot], layout=plgpu.Layout.WGMMA_8BIT).astype(dtype)
                    plgpu.commit_smem()  # the generic-proxy stores, before wgmma reads them
                plgpu.barrier_arrive(v_ready.at[vslot])

                # Refill the previous step's slot (its V is converted, its K released a step ago, so
                # this rarely waits); waiting for this step's K would tie the conversions to the
                # compute warpgroup's progress.
                @pl.when((step >= 1) & (step - 1 + num_stages < steps))
                def _():
                    with jax.named_scope("issue"):
                        plgpu.barrier_wait(k_free.at[lax.rem(step - 1, num_stages)])
                        issue(step - 1 + num_stages)

                return carry

            lax.fori_loop(0, steps, convert, None)

            # Observe the last releases too: the hardware does not care, Pallas' GPU interpreter
            # checks that a thread waiting on a barrier sees every phase of it.
            def drain(step, carry):
                plgpu.barrier_wait(k_free.at[lax.rem(step, num_stages)])
                return carry

            lax.fori_loop(jnp.maximum(steps - num_stages, 0), steps, drain, None)
            for tail in range(CONVERTED_SLOTS):
                step = steps + tail

                @pl.when(step >= CONVERTED_SLOTS)
                def _(step=step):
                    plgpu.barrier_wait(v_free.at[lax.rem(step, CONVERTED_SLOTS)])

    def entry(q_ref, k_ref, v_ref, ks_ref, vs_ref, layer_ref, table_ref, lens_ref, starts_ref, o_ref, lse_ref):
        copies = copies_per_tile(page_size, block_kv)
        smem = (
            smem_tile((cols, head_dim), dtype),
            smem_tile((num_stages, block_kv, head_dim), page_dtype),
            smem_tile((num_stages, block_kv, head_dim), page_dtype),
            plgpu.SMEM((num_stages, block_kv * kv_heads), jnp.float32),
            plgpu.SMEM((num_stages, block_kv * kv_heads), jnp.float32),
            swizzled((CONVERTED_SLOTS, block_kv, head_dim), dtype, p_swizzle),
            swizzled((block_kv, cols), dtype, p_swizzle),
            plgpu.SMEM((head_dim, cols), out_dtype),
            plgpu.SMEM((cols,), jnp.float32),
        )
        ready = (
            plgpu.Barrier(),
            plgpu.Barrier(num_arrivals=3 * copies, num_barriers=num_stages),  # K, K's and V's scales
            plgpu.Barrier(num_arrivals=copies, num_barriers=num_stages),
            plgpu.Barrier(num_barriers=CONVERTED_SLOTS),
        )
        free = (plgpu.Barrier(num_barriers=num_stages), plgpu.Barrier(num_barriers=CONVERTED_SLOTS))
        pl.run_scoped(
            lambda *scoped: body(q_ref, k_ref, v_ref, ks_ref, vs_ref, layer_ref, table_ref, lens_ref, starts_ref,
                                 o_ref, lse_ref, scoped),
            smem, ready, free, collective_axes="wg")

    out_type = (
        jax.ShapeDtypeStruct((batch, kv_heads, splits, head_dim, cols), out_dtype),
        jax.ShapeDtypeStruct((batch, kv_heads, splits, cols), jnp.float32),
    )
    # Heads fastest (grid axis 0 varies fastest): the heads of a sequence share each page's scale rows in L2.
    return plgpu.kernel(entry, out_type=out_type, grid=(kv_heads, batch, splits), grid_names=("h", "b", "s"),
                        num_threads=2, thread_name="wg",
                        compiler_params=compat.lane_compiler_params(approx_math=True),
                        interpret=compat.gpu_interpret_params() if interpret else False)


def queries(q: jax.Array, page_dtype) -> jax.Array:
    """q [B, Hkv, G, D] as the kernel's [B, Hkv, N, D] in `product_dtype` (clipped to float16's range
    for fp8 pages), the rows past G zero."""
    dtype = product_dtype(page_dtype)
    if dtype == jnp.float16:
        q = jnp.clip(q.astype(jnp.float32), -F16_MAX, F16_MAX)
    return jnp.pad(q.astype(dtype), ((0, 0), (0, 0), (0, query_columns(q.shape[2]) - q.shape[2]), (0, 0)))
