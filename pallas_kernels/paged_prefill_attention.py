"""Paged prefill attention: a chunk of new tokens per sequence, causal within the chunk and over the
sequence's cached prefix, all read through the page table (the chunk's own K/V already written).

One block per (sequence, KV head, 2 x 64/G tokens): two compute warpgroups each own 64 rows, the
G query heads of 64/G consecutive tokens (so one K/V tile serves every head of the group), and a
memory warpgroup streams the K/V tiles both use, up to the block's last visible key. As in
FlashAttention-3, the compute warpgroups take turns on the tensor cores (one's softmax runs while
the other's products do), and tiles every row sees whole skip the mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from pallas_kernels import compat
from pallas_kernels.attention_tiles import (ROWS, Tiles, check_pages, copies_per_tile, memory_loop,
                                            online_softmax, smem_tile)

COMPUTE_WARPGROUPS = 2
COMPUTE_REGISTERS, MEMORY_REGISTERS = 232, 40  # per thread: 2 x 232 + 40 warps' worth fits the SM's 64k
_MASKED = -1e30  # finite: a padding row sees no key, and its (unused) output stays finite
_NO_WINDOW = 1 << 30


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    block_kv: int = 128  # measured on the H200 (BENCHMARKS.md): 128 x 2 beats 64 x 2 and 64 x 3
    num_stages: int = 2

    def __post_init__(self):
        if self.block_kv % 64:
            raise ValueError(f"block_kv={self.block_kv} must be a multiple of 64")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be at least 1")


def paged_prefill_attention_reference(
    q: Float[Array, "B T Hkv G D"],
    k_pages: Float[Array, "L P S Hkv D"],
    v_pages: Float[Array, "L P S Hkv D"],
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "B Pmax"],
    positions: Int[Array, "B T"],
    kv_lens: Int[Array, "B"],
    window: Int[Array, ""] | int = 0,
    *,
    scale: float,
    config: PrefillConfig = PrefillConfig(),
    interpret: bool = False,
) -> Float[Array, "B T Hkv G D"]:
    """Query (b, t) at position p >= 0 sees cached keys j <= p, j < kv_lens[b] and, with a window
    W > 0, j > p - W; softmax in float32. Padding queries (p < 0) give zeros."""
    del config, interpret
    batch, pmax = page_table.shape
    page_size = k_pages.shape[2]
    k = k_pages[layer][page_table].reshape(batch, pmax * page_size, *k_pages.shape[3:])
    v = v_pages[layer][page_table].reshape(batch, pmax * page_size, *v_pages.shape[3:])
    s = jnp.einsum("bthgd,bshd->bhgts", q, k, preferred_element_type=jnp.float32) * scale
    key = jnp.arange(pmax * page_size)[None, None, :]
    pos = positions[:, :, None]
    window = jnp.asarray(window)
    visible = (key <= pos) & (key < kv_lens[:, None, None]) & ((window <= 0) | (key > pos - window))
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where((positions >= 0)[:, None, None, :, None], p, 0.0)
    out = jnp.einsum("bhgts,bshd->bthgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def paged_prefill_attention(
    q: Float[Array, "B T Hkv G D"],
    k_pages: Float[Array, "L P S Hkv D"],
    v_pages: Float[Array, "L P S Hkv D"],
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "B Pmax"],
    positions: Int[Array, "B T"],
    kv_lens: Int[Array, "B"],
    window: Int[Array, ""] | int = 0,
    *,
    scale: float,
    config: PrefillConfig = PrefillConfig(),
    interpret: bool = False,
) -> Float[Array, "B T Hkv G D"]:
    """The Mosaic GPU kernel; the reference's contract, for positions[b] = start_b + arange(n_b)
    followed by -1 padding (how prefill chunks are laid out). Padding rows' outputs are unspecified."""
    batch, tokens, kv_heads, groups, head_dim = q.shape
    page_size, pmax, block_kv = k_pages.shape[2], page_table.shape[1], config.block_kv
    check_pages(kv_heads, head_dim, k_pages, v_pages, block_kv)
    if ROWS % groups:
        raise ValueError(f"{groups} query heads per KV head: the kernel takes a divisor of {ROWS}")
    dtype = k_pages.dtype
    per_wg = ROWS // groups  # tokens per compute warpgroup
    per_block = COMPUTE_WARPGROUPS * per_wg
    padded = -(-tokens // per_block) * per_block
    # [B, T, Hkv, G, D] -> [B, Hkv, T*G, D]: a warpgroup's 64 rows are one TMA box.
    rows = jnp.transpose(q.astype(dtype), (0, 2, 1, 3, 4))
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, padded - tokens), (0, 0), (0, 0)))
    rows = rows.reshape(batch, kv_heads, padded * groups, head_dim)
    counts = jnp.sum(positions >= 0, axis=1).astype(jnp.int32)
    starts = jnp.maximum(positions[:, 0], 0).astype(jnp.int32)
    window = jnp.asarray(window, jnp.int32)
    scalars = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.where(window > 0, window, _NO_WINDOW)])
    kernel = _build(batch, kv_heads, groups, padded, head_dim, page_size, pmax, dtype, block_kv,
                    config.num_stages, float(scale), interpret)
    out = kernel(rows, k_pages, v_pages, scalars, page_table.astype(jnp.int32), kv_lens.astype(jnp.int32),
                 starts, counts)
    out = out.reshape(batch, kv_heads, padded, groups, head_dim)[:, :, :tokens]
    return jnp.transpose(out, (0, 2, 1, 3, 4)).astype(q.dtype)


@functools.lru_cache(maxsize=None)
def _build(batch, kv_heads, groups, padded, head_dim, page_size, pmax, dtype, block_kv, num_stages,
           scale, interpret):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    log2e_scale = scale * math.log2(math.e)
    tiles = Tiles(interpret, dtype, head_dim, block_kv)
    per_wg = ROWS // groups
    per_block = COMPUTE_WARPGROUPS * per_wg
    group_shift = int(math.log2(groups))

    def body(q_ref, k_ref, v_ref, scalars_ref, table_ref, lens_ref, starts_ref, counts_ref, o_ref, scoped):
        q_smem, k_smem, v_smem = scoped[0]
        (q_bar, k_bar, v_bar), (k_free, v_free), turn = scoped[1], scoped[2], scoped[3]
        b, h, blk = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("t")
        wg = lax.axis_index("wg")
        window = scalars_ref[1]
        length, start, count = lens_ref[b], starts_ref[b], counts_ref[b]
        t0 = blk * per_block
        # Keys the block's valid tokens can see: from the first token's window start up to the
        # last valid token's position (or the cache length, if shorter).
        last = jnp.minimum(t0 + per_block, count) - 1
        hi = jnp.minimum(start + last + 1, length)
        lo = jnp.maximum(start + t0 - window + 1, 0)
        begin = lax.div(lo, block_kv) * block_kv
        steps = jnp.maximum(lax.div(hi - begin + (block_kv - 1), block_kv), 0)
        steps = jnp.where(t0 < count, steps, 0)  # all padding: nothing to read, zeros out

        def schedule_barrier():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < COMPUTE_WARPGROUPS)
        def _compute():
            plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
            tile = q_smem.at[wg]
            row0 = (t0 + wg * per_wg) * groups
            plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(row0, ROWS)], tile, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            token = t0 + wg * per_wg + lax.shift_right_logical(tiles.iota(0), group_shift)
            pos = start + token
            # Tiles every row of this warpgroup sees whole (causal, cached, no window) need no mask.
            first_pos = start + t0 + wg * per_wg
            unmasked = lax.div(jnp.minimum(first_pos + 1, length) - begin, block_kv)
            unmasked = jnp.where(window == _NO_WINDOW, jnp.clip(unmasked, 0, steps), 0)

            def step_fn(step, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(step, num_stages)
                plgpu.barrier_wait(k_bar.at[slot])
                qk = tiles.scores(tile, k_smem.at[slot], after_issue=schedule_barrier)
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    key = begin + step * block_kv + tiles.iota(1)
                    visible = (key <= pos) & (key > pos - window) & (key < length) & (token < count)
                else:
                    visible = None
                acc, m_i, l_i, p = online_softmax(acc, m_i, l_i, qk * log2e_scale, visible, _MASKED)
                # The other warpgroup's products run on the tensor cores while this one's softmax
                # runs (FlashAttention-3's ping-pong); then this one takes its turn.
                p = p.astype(dtype)
                acc, m_i, l_i, p = lax.optimization_barrier((acc, m_i, l_i, p))
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(turn)
                acc = tiles.accumulate_pv(acc, p, v_smem.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_i, l_i

            init = (tiles.zero_output(), tiles.row_stat(_MASKED), tiles.row_stat(0.0))
            pl.when(wg == 1)(schedule_barrier)  # warpgroup 1 starts half a step behind
            carry = lax.fori_loop(0, unmasked, functools.partial(step_fn, masked=False), init)
            acc, m_i, l_i = lax.fori_loop(unmasked, steps, functools.partial(step_fn, masked=True), carry)
            pl.when(wg == 0)(schedule_barrier)  # both warpgroups pass the barrier equally often
            acc /= lax.broadcast_in_dim(jnp.maximum(l_i, 1e-30), acc.shape, [0])
            tile[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(tile, o_ref.at[b, h, pl.ds(row0, ROWS)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WARPGROUPS)
        def _memory():
            plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
            memory_loop(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free, begin=begin,
                        steps=steps, num_stages=num_stages, layer=scalars_ref[0], table_ref=table_ref,
                        b=b, h=h, page_size=page_size, block_kv=block_kv, pmax=pmax, drain=True)

    def entry(q_ref, k_ref, v_ref, scalars_ref, table_ref, lens_ref, starts_ref, counts_ref, o_ref):
        copies = copies_per_tile(page_size, block_kv)
        smem = (
            smem_tile((COMPUTE_WARPGROUPS, ROWS, head_dim), dtype),
            smem_tile((num_stages, block_kv, head_dim), dtype),
            smem_tile((num_stages, block_kv, head_dim), dtype),
        )
        ready = (
            plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),
            plgpu.Barrier(num_arrivals=copies, num_barriers=num_stages),
            plgpu.Barrier(num_arrivals=copies, num_barriers=num_stages),
        )
        free = (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=num_stages),) * 2
        turn = plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS)
        pl.run_scoped(
            lambda *scoped: body(q_ref, k_ref, v_ref, scalars_ref, table_ref, lens_ref, starts_ref,
                                 counts_ref, o_ref, scoped),
            smem, ready, free, turn, collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((batch, kv_heads, padded * groups, head_dim), dtype),
        grid=(batch, kv_heads, padded // per_block),
        grid_names=("b", "h", "t"),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=compat.gpu_interpret_params() if interpret else False,
    )
