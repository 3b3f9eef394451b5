"""Paged decode attention: one new query token per sequence against its cached pages.

Each thread block takes one (sequence, KV head, split) and runs a FlashAttention loop over the
split's keys: a memory warpgroup copies pages into shared memory through the page table (TMA,
`num_stages` deep), a compute warpgroup multiplies with wgmma and keeps the softmax statistics
in registers. The G query heads that share a KV head are the rows of one 64-row wgmma tile
(zero rows pad it), so every K/V byte is read once for all of them. Splits of a long context
are merged afterwards from their log-sum-exps. The output holds the G heads' rows only (written
from an unswizzled tile), so no slice of the padded tile follows the kernel.

`paged_decode_attention_append` also stores each sequence's new token: its K and V rows travel
after the query rows, and the memory warpgroup of the split whose keys end with the token copies
them into their page (the pages are aliased in and out), waits for those stores to complete, and
only then copies the tile that holds them. At batch-1 decode this replaces the two cache-update
kernels of every layer.

int8 / fp8 (e4m3) pages come with a float32 scale per token and KV head and go to their own kernel
(`paged_decode_attention_8bit`), which puts the query heads on wgmma's N side so that the tensor work
shrinks with the bytes; same contract and split merge.
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
from pallas_kernels import paged_decode_attention_8bit as pda8
from pallas_kernels.attention_tiles import (COMPUTE_DTYPES, ROWS, Tiles, check_pages,
                                            copies_per_tile, memory_loop, online_softmax,
                                            smem_tile)

MIN_STEPS_PER_SPLIT = 4
BF16_STAGES = 4


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tuning knobs. `num_stages=None` takes 4 for bf16/fp16 pages and `paged_decode_attention_8bit`'s
    3 for 8-bit ones; `num_splits=None` picks enough splits to fill the GPU's multiprocessors."""

    block_kv: int = 64  # keys per pipeline step
    num_stages: int | None = None  # K/V tiles in flight per block
    num_splits: int | None = None

    def __post_init__(self):
        if self.block_kv % 64:
            raise ValueError(f"block_kv={self.block_kv} must be a multiple of 64")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be at least 1")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be at least 1")

    def stages(self, quantized: bool) -> int:
        """The stage count a launch uses, over 8-bit pages or not."""
        return self.num_stages or (pda8.NUM_STAGES if quantized else BF16_STAGES)


def window_start(kv_lens: Int[Array, "B"], window) -> Int[Array, "B"]:
    """First visible key: with a sliding window W > 0 the last W keys, else all of them."""
    window = jnp.asarray(window, jnp.int32)
    return jnp.where(window > 0, jnp.maximum(kv_lens - window, 0), 0).astype(jnp.int32)


def paged_decode_attention_reference(
    q: Float[Array, "B Hkv G D"],
    k_pages: Float[Array, "L P S Hkv D"],
    v_pages: Float[Array, "L P S Hkv D"],
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "B Pmax"],
    kv_lens: Int[Array, "B"],
    window: Int[Array, ""] | int = 0,
    *,
    scale: float,
    k_scale: Float[Array, "L P S Hkv"] | None = None,
    v_scale: Float[Array, "L P S Hkv"] | None = None,
    config: DecodeConfig = DecodeConfig(),
    interpret: bool = False,
) -> Float[Array, "B Hkv G D"]:
    """softmax(q k^T * scale) v over keys [max(len - W, 0), len) of each sequence, in float32.
    With scales, the (int8 / fp8) pages hold value / scale: they are dequantized to q's dtype first."""
    del config, interpret
    batch, pmax = page_table.shape
    page_size = k_pages.shape[2]

    def gather(pages, scales):
        x = pages[layer][page_table]
        if scales is not None:
            x = (x.astype(jnp.float32) * scales[layer][page_table][..., None]).astype(q.dtype)
        return x.reshape(batch, pmax * page_size, *pages.shape[3:])

    k, v = gather(k_pages, k_scale), gather(v_pages, v_scale)
    scores = jnp.einsum("bhgd,bshd->bhgs", q, k, preferred_element_type=jnp.float32) * scale
    key = jnp.arange(pmax * page_size)[None, :]
    visible = (key < kv_lens[:, None]) & (key >= window_start(kv_lens, window)[:, None])
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(kv_lens[:, None, None, None] > 0, probs, 0.0)  # empty rows (padding): zeros
    out = jnp.einsum("bhgs,bshd->bhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def choose_splits(blocks: int, max_steps: int, sms: int) -> int:
    """Fewest splits whose blocks fill the multiprocessors in waves at least 85 % full."""
    for splits in range(1, max(max_steps, 1) + 1):
        n = blocks * splits
        if n >= sms and n / (math.ceil(n / sms) * sms) >= 0.85:
            return splits
    return max(max_steps, 1)


def paged_decode_attention(
    q: Float[Array, "B Hkv G D"],
    k_pages: Float[Array, "L P S Hkv D"],
    v_pages: Float[Array, "L P S Hkv D"],
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "B Pmax"],
    kv_lens: Int[Array, "B"],
    window: Int[Array, ""] | int = 0,
    *,
    scale: float,
    k_scale: Float[Array, "L P S Hkv"] | None = None,
    v_scale: Float[Array, "L P S Hkv"] | None = None,
    config: DecodeConfig = DecodeConfig(),
    interpret: bool = False,
) -> Float[Array, "B Hkv G D"]:
    """The Mosaic GPU kernel; same contract as `paged_decode_attention_reference`."""
    out, _ = _attend(q, None, k_pages, v_pages, layer, page_table, kv_lens, window, scale, k_scale, v_scale,
                     config, interpret)
    return out


def paged_decode_attention_append_reference(
    q: Float[Array, "B Hkv G D"],
    k_new: Float[Array, "B Hkv D"],
    v_new: Float[Array, "B Hkv D"],
    k_pages: Float[Array, "L P S Hkv D"],
    v_pages: Float[Array, "L P S Hkv D"],
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "B Pmax"],
    kv_lens: Int[Array, "B"],
    window: Int[Array, ""] | int = 0,
    *,
    scale: float,
    config: DecodeConfig = DecodeConfig(),
    interpret: bool = False,
) -> tuple[Float[Array, "B Hkv G D"], Float[Array, "L P S Hkv D"], Float[Array, "L P S Hkv D"]]:
    """Stores k_new[b], v_new[b] at position kv_lens[b] - 1 of sequence b (rows with kv_lens 0 store
    nothing), then attends as `paged_decode_attention_reference`. Returns (out, k_pages, v_pages)."""
    del config, interpret
    num_pages, page_size = k_pages.shape[1:3]
    pos = kv_lens.astype(jnp.int32) - 1
    page = jnp.take_along_axis(page_table, jnp.maximum(pos, 0)[:, None] // page_size, axis=1)[:, 0]
    page = jnp.where(pos >= 0, page, num_pages)  # out of bounds: dropped
    slot = jnp.maximum(pos, 0) % page_size
    k_pages = k_pages.at[layer, page, slot].set(k_new.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[layer, page, slot].set(v_new.astype(v_pages.dtype), mode="drop")
    out = paged_decode_attention_reference(q, k_pages, v_pages, layer, page_table, kv_lens, window, scale=scale)
    return out, k_pages, v_pages


def paged_decode_attention_append(
    q: Float[Array, "B Hkv G D"],
    k_new: Float[Array, "B Hkv D"],
    v_new: Float[Array, "B Hkv D"],
    k_pages: Float[Array, "L P S Hkv D"],
    v_pages: Float[Array, "L P S Hkv D"],
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "B Pmax"],
    kv_lens: Int[Array, "B"],
    window: Int[Array, ""] | int = 0,
    *,
    scale: float,
    config: DecodeConfig = DecodeConfig(),
    interpret: bool = False,
) -> tuple[Float[Array, "B Hkv G D"], Float[Array, "L P S Hkv D"], Float[Array, "L P S Hkv D"]]:
    """The Mosaic GPU kernel over bf16/fp16 pages, updated in place; same contract as
    `paged_decode_attention_append_reference`."""
    if k_new.shape != v_new.shape or k_new.shape != (q.shape[0], q.shape[1], q.shape[3]):
        raise ValueError(f"k_new {k_new.shape} / v_new {v_new.shape} must both be {(q.shape[0], q.shape[1], q.shape[3])}"
                         " (one token per sequence and KV head)")
    out, (k_pages, v_pages) = _attend(q, (k_new, v_new), k_pages, v_pages, layer, page_table, kv_lens, window,
                                      scale, None, None, config, interpret)
    return out, k_pages, v_pages


def _attend(q, new, k_pages, v_pages, layer, page_table, kv_lens, window, scale, k_scale, v_scale, config,
            interpret):
    """Runs the kernel: the attention output, and with `new` = (k_new, v_new) the updated pages."""
    batch, kv_heads, groups, head_dim = q.shape
    layers, num_pages, page_size = k_pages.shape[:3]
    pmax, block_kv = page_table.shape[1], config.block_kv
    check_pages(kv_heads, head_dim, k_pages, v_pages, block_kv, k_scale, v_scale)
    if groups > ROWS:
        raise ValueError(f"{groups} query heads per KV head: the kernel takes at most {ROWS}")
    quantized = k_scale is not None
    if quantized and q.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"q of {q.dtype} over {k_pages.dtype} pages: the kernel takes bfloat16 or float16 "
                         "queries (and returns that dtype)")
    max_steps = pl_cdiv(pmax * page_size, block_kv)
    # Splits fill the GPU, but each keeps at least MIN_STEPS_PER_SPLIT steps: below that, the
    # merge's extra kernels cost more than the parallelism gains (short contexts at batch 1).
    splits = config.num_splits or min(choose_splits(batch * kv_heads, max_steps, compat.num_sms()),
                                      max(1, max_steps // MIN_STEPS_PER_SPLIT))
    splits = min(splits, max_steps)

    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    lens = kv_lens.astype(jnp.int32)
    starts = window_start(lens, window)
    if quantized:  # query heads as wgmma's N side (paged_decode_attention_8bit)
        kernel = pda8.build(batch, kv_heads, groups, head_dim, page_size, pmax, jnp.dtype(q.dtype), splits, block_kv,
                            config.stages(True), float(scale), interpret, jnp.dtype(k_pages.dtype))
        # A page's scales, every head's, as one contiguous row: one copy a page.
        scales = tuple(s.reshape(layers, num_pages, page_size * kv_heads) for s in (k_scale, v_scale))
        out_t, lse = kernel(pda8.queries(q, k_pages.dtype), k_pages, v_pages, *scales, layer_arr,
                            page_table.astype(jnp.int32), lens, starts)
        out = jnp.swapaxes(out_t, -1, -2)[..., :groups, :]
        return _merge_splits(out, lse[..., :groups]).astype(q.dtype), None

    dtype = k_pages.dtype  # what the products take
    rows = -(-groups // 8) * 8  # what TMA moves: whole 8-row tiles; the kernel zeroes the rest
    q_rows = q.astype(dtype)
    if rows != groups:
        q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - groups), (0, 0)))
    if new is not None:  # the new K and V rows after q's, padded to a whole 8-row tile for TMA
        new_rows = jnp.stack([x.astype(dtype) for x in new], axis=2)
        new_rows = jnp.pad(new_rows, ((0, 0), (0, 0), (0, 8 - len(new)), (0, 0)))
        q_rows = jnp.concatenate([q_rows, new_rows], axis=2)
    kernel = _build(batch, kv_heads, groups, head_dim, page_size, pmax, dtype, splits, block_kv,
                    config.stages(False), float(scale), interpret, new is not None)
    pages = (k_pages, v_pages)
    if new is not None:  # stored into in place: the kernel takes them as references
        pages = tuple(compat.gmem_ref(x) for x in pages)
    out, lse = kernel(q_rows, *pages, layer_arr, page_table.astype(jnp.int32), lens, starts)
    out = _merge_splits(out, lse[:, :, :, :groups]).astype(q.dtype)
    return out, None if new is None else tuple(compat.freeze(x) for x in pages)


def pl_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _merge_splits(out, lse):
    """Weights each split's normalised output by its share of the softmax mass (log2 units)."""
    if out.shape[2] == 1:
        return out[:, :, 0]
    top = jnp.max(lse, axis=2, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weight = jnp.exp2(lse - top)  # [B, H, S, G]; empty splits weigh 0
    total = jnp.sum(weight, axis=2)
    merged = jnp.einsum("bhsg,bhsgd->bhgd", weight, out.astype(jnp.float32))
    return merged / jnp.where(total > 0, total, 1.0)[..., None]


@functools.lru_cache(maxsize=None)
def _build(batch, kv_heads, groups, head_dim, page_size, pmax, dtype, splits, block_kv, num_stages,
           scale, interpret, append=False):
    """The kernel over `dtype` pages. `append`: q's rows are followed by the new token's K and V rows,
    and the pages are references to store them into."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    rows = -(-groups // 8) * 8
    log2e_scale = scale * math.log2(math.e)
    tiles = Tiles(interpret, dtype, head_dim, block_kv)

    def body(q_ref, page_refs, layer_ref, table_ref, lens_ref, starts_ref, o_ref, lse_ref, scoped):
        (q_smem, out_smem, k_smem, v_smem, lse_smem), (q_bar, k_bar, v_bar), (k_free, v_free) = scoped[:3]
        row_smem, row_bar = scoped[3] if append else (None, None)
        b, h, s = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("s")
        wg = lax.axis_index("wg")
        length = lens_ref[b]
        lo = starts_ref[b]
        # This split's keys: an equal share of the sequence's steps, from the window's start.
        first = lax.div(lo, block_kv) * block_kv
        total_steps = lax.div(length - first + (block_kv - 1), block_kv)
        per_split = lax.div(total_steps + (splits - 1), splits)
        begin = first + s * per_split * block_kv
        steps = lax.div(length - begin + (block_kv - 1), block_kv)
        steps = jnp.minimum(jnp.maximum(steps, 0), per_split)
        if append:  # the new token is key length - 1, the last of the split that reads it
            stores_new = (length > 0) & (begin < length) & (length <= begin + per_split * block_kv)

        @pl.when(wg == 0)
        def _compute():
            if rows < ROWS:  # rows past the query heads multiply as zeros
                q_smem[...] = tiles.zero_tile()
                plgpu.commit_smem()
            plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(0, rows)], q_smem.at[pl.ds(0, rows)], q_bar)
            plgpu.barrier_wait(q_bar)

            def step_fn(step, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(step, num_stages)
                plgpu.barrier_wait(k_bar.at[slot])
                qk = tiles.scores(q_smem, k_smem.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                key = begin + step * block_kv + tiles.iota(1)
                # Every tile holds a visible key (the split starts inside [lo, length)), so -inf
                # never meets -inf in the running maximum.
                acc, m_i, l_i, p = online_softmax(acc, m_i, l_i, qk * log2e_scale,
                                                  (key >= lo) & (key < length), -jnp.inf)
                plgpu.barrier_wait(v_bar.at[slot])
                acc = tiles.accumulate_pv(acc, p, v_smem.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_i, l_i

            init = (tiles.zero_output(), tiles.row_stat(-jnp.inf), tiles.row_stat(0.0))
            acc, m_i, l_i = lax.fori_loop(0, steps, step_fn, init)
            l_safe = jnp.maximum(l_i, 1e-30)  # an empty split leaves zeros and lse = -inf
            acc /= lax.broadcast_in_dim(l_safe, acc.shape, [0])
            out_smem[...] = acc.astype(dtype)
            lse_smem[...] = m_i + jnp.log(l_i) * (1.0 / math.log(2.0))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, groups)], o_ref.at[b, h, s])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, s])
            plgpu.wait_smem_to_gmem(0)

        def page_args():
            return {"layer": layer_ref[0], "table_ref": table_ref, "b": b, "h": h,
                    "page_size": page_size, "block_kv": block_kv, "pmax": pmax}

        @pl.when(wg == 1)
        def _memory():
            k_ref, v_ref = page_refs
            before_copy = None
            if append:
                pos = length - 1
                page, slot = table_ref[b, lax.div(pos, page_size)], lax.rem(pos, page_size)

                @pl.when(stores_new)
                def _fetch_new_token():
                    for i in range(2):
                        plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(rows + i, 1)], row_smem.at[i], row_bar)

                def before_copy(step):
                    # Stored once the first tile is on its way, so that the stores overlap the
                    # copies; complete before the last tile, which holds the token, is copied.
                    @pl.when(stores_new & (step == jnp.minimum(steps - 1, 1)))
                    def _store_new_token():
                        plgpu.barrier_wait(row_bar)
                        for i, ref in enumerate((k_ref, v_ref)):
                            plgpu.copy_smem_to_gmem(row_smem.at[i], ref.at[layer_ref[0], page, pl.ds(slot, 1), h])

                    @pl.when(stores_new & (step == steps - 1))
                    def _stored():
                        plgpu.wait_smem_to_gmem(0)

            memory_loop(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free, begin=begin,
                        steps=steps, num_stages=num_stages, before_copy=before_copy, **page_args())

    def entry(q_ref, *refs):
        *page_refs, layer_ref, table_ref, lens_ref, starts_ref, o_ref, lse_ref = refs
        copies = copies_per_tile(page_size, block_kv)
        smem = (
            smem_tile((ROWS, head_dim), dtype),
            plgpu.SMEM((ROWS, head_dim), dtype),  # the output, unswizzled: its G rows copy out alone
            smem_tile((num_stages, block_kv, head_dim), dtype),
            smem_tile((num_stages, block_kv, head_dim), dtype),
            plgpu.SMEM((ROWS,), jnp.float32),
        )
        ready = (
            plgpu.Barrier(),
            plgpu.Barrier(num_arrivals=copies, num_barriers=num_stages),
            plgpu.Barrier(num_arrivals=copies, num_barriers=num_stages),
        )
        free = (plgpu.Barrier(num_barriers=num_stages),) * 2
        scoped = [smem, ready, free]
        if append:  # the new token's K and V rows, on their way to the page
            scoped.append((plgpu.SMEM((2, 1, head_dim), dtype), plgpu.Barrier(num_arrivals=2)))
        pl.run_scoped(
            lambda *scoped: body(q_ref, page_refs, layer_ref, table_ref, lens_ref, starts_ref, o_ref, lse_ref,
                                 scoped),
            *scoped, collective_axes="wg")

    out_type = (
        jax.ShapeDtypeStruct((batch, kv_heads, splits, groups, head_dim), dtype),
        jax.ShapeDtypeStruct((batch, kv_heads, splits, ROWS), jnp.float32),
    )
    params = plgpu.CompilerParams(approx_math=True)
    mesh = dict(grid=(batch, kv_heads, splits), grid_names=("b", "h", "s"), num_threads=2, thread_name="wg")
    interpret = compat.gpu_interpret_params() if interpret else False
    if append:  # pl.kernel takes the pages as references (plgpu.kernel's vmap rule cannot)
        return pl.kernel(entry, out_type=out_type, mesh=plgpu.Mesh(**mesh), compiler_params=params,
                         interpret=interpret)
    return plgpu.kernel(entry, out_type=out_type, compiler_params=params, interpret=interpret, **mesh)
