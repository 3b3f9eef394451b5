"""Weight-only quantized matmuls for decode shapes (M = 1..64 tokens): w8a16 and w4a16.

`x @ W` where W is int8 with one scale per output channel (jaxllm's QuantizedWeight), or 4-bit codes
packed two to a byte along K with a scale and zero point per group of inputs (Int4Weight's layout,
used as stored). The kernels compute out^T = W^T x^T ("swap AB"): 64 output features fill wgmma's
M side and the tokens, padded to a multiple of 8, are its N, so a decode step's few tokens waste no
tensor-core rows. A block owns `block_n` output features (one compute warpgroup per 64) and a range
of K; a memory warpgroup streams the weight tiles and the matching activation tiles into shared
memory by TMA, `num_stages` deep; each compute warpgroup dequantizes its 64 columns of a tile in
registers into a bf16 tile in shared memory and runs wgmma on it. K is split across blocks when the
output blocks alone do not fill the GPU; a small XLA epilogue sums the splits, applies int8's
channel scales and transposes back to [M, N].

int4 dequantization is two bit operations per 16-bit lane: `(byte & 0xF) | 0x4300` is the bf16 bit
pattern of 128 + low nibble, `(byte >> 4) | 0x4300` that of 128 + high nibble (the code lands in the
mantissa of 128.0). The low nibbles hold the even inputs and the high nibbles the odd ones, so the
activations enter split the same way and each step (one group of inputs) runs two products. The
offset, the zero point and the group scale are applied to the group's float32 partial product, not
to each weight: sum_k (q - z) s x = s * (P - (128 + z) * sum_k x), with the activation sums per
group computed beforehand (XLA).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int8, UInt8

from pallas_kernels import compat

WG_ROWS = 64  # output features per compute warpgroup: wgmma's M
MAX_TOKENS = 64  # tokens per call: wgmma's N is the padded token count
SMEM_PER_SM = 228 * 1024  # H100/H200; a block may take 227 KiB of it, and 1 KiB more is reserved
SMEM_BUDGET = 110 * 1024  # bytes of shared memory per block for the default stage count (two per SM)
MIN_STEPS_PER_SPLIT = 4
SUMS_WIDTH = 64  # int4's per-group activation sums, padded to 256 bytes a row (TMA copies 128-byte multiples)


@dataclasses.dataclass(frozen=True)
class QuantMatmulConfig:
    """Tuning knobs; None picks a default from the shapes (see `plan`)."""

    block_n: int | None = None  # output features per block: 64 or 128 (one compute warpgroup per 64)
    block_k: int | None = None  # int8 only: weight rows per pipeline step (int4 steps one group)
    num_stages: int | None = None  # weight tiles in flight per block
    num_splits: int | None = None  # blocks sharing one output block's K range

    def __post_init__(self):
        if self.block_n is not None and self.block_n not in (64, 128):
            raise ValueError(f"block_n={self.block_n} must be 64 or 128")
        if self.block_k is not None and (self.block_k < 64 or self.block_k % 64):
            raise ValueError(f"block_k={self.block_k} must be a positive multiple of 64")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be at least 1")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be at least 1")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static shape of one kernel launch."""

    kind: str  # "int8" or "int4"
    k: int
    n: int
    tokens: int  # padded token count (wgmma's N)
    block_n: int
    rows: int  # weight rows (packed rows for int4) per step
    steps: int  # K steps in all
    num_stages: int
    num_splits: int

    @property
    def compute_wgs(self) -> int:
        return self.block_n // WG_ROWS

    @property
    def per_split(self) -> int:
        return -(-self.steps // self.num_splits)

    def stage_bytes(self) -> int:
        """Shared memory of one pipeline stage: weight tile, activations, group data."""
        if self.kind == "int8":
            return self.rows * self.block_n + self.tokens * self.rows * 2
        return self.rows * self.block_n + 2 * self.tokens * self.rows * 2 + self.block_n * 5 + 4 * SUMS_WIDTH

    def fixed_bytes(self) -> int:
        """Shared memory outside the pipeline: the bf16 dequantized tiles and the output tile."""
        halves = 1 if self.kind == "int8" else 2
        return halves * self.rows * self.block_n * 2 + self.block_n * self.tokens * 4

    def smem_bytes(self) -> int:
        return self.num_stages * self.stage_bytes() + self.fixed_bytes()


def choose_splits(blocks: int, steps: int, slots: int) -> int:
    """K splits that bring the blocks up to `slots`, the blocks resident at once (two a
    multiprocessor when their shared memory allows: on the H200 two blocks of one SM streamed more
    than one), keeping MIN_STEPS_PER_SPLIT steps a split."""
    most = max(1, steps // MIN_STEPS_PER_SPLIT)
    return max(1, min(most, slots // blocks))


def plan(kind: str, m: int, k: int, n: int, config: QuantMatmulConfig | None,
         group_size: int | None = None) -> Plan:
    """Block sizes, stages and splits for an [m, k] x [k, n] product; ValueError if they do not fit."""
    config = config or QuantMatmulConfig()
    if not 1 <= m <= MAX_TOKENS:
        raise ValueError(f"{m} tokens: the kernel takes 1 to {MAX_TOKENS} (decode shapes); use XLA above")
    if n % WG_ROWS:
        raise ValueError(f"N={n} output features must be a multiple of {WG_ROWS}")
    block_n = config.block_n or (128 if n % 128 == 0 else 64)
    if n % block_n:
        raise ValueError(f"block_n={block_n} must divide N={n}")
    if kind == "int4" and block_n != 128:  # a TMA copy moves a multiple of 128 bytes: zero points
        raise ValueError(f"the int4 kernel takes block_n=128 (got {block_n}), so N={n} must be a multiple of 128")
    if kind == "int8":
        if config.block_k is not None:
            rows = config.block_k
        else:
            rows = next((b for b in (128, 64) if k % b == 0), 0)
        if not rows or k % rows:
            raise ValueError(f"K={k} must be a multiple of block_k={rows or 64} for the int8 kernel")
    else:
        if group_size is None or group_size % 128 or k % group_size:
            raise ValueError(f"int4 group size {group_size} must be a multiple of 128 that divides K={k}")
        rows = group_size // 2
    tokens = -(-m // 8) * 8
    base = Plan(kind, k, n, tokens, block_n, rows, k // rows if kind == "int8" else k // group_size, 1, 1)
    stages = config.num_stages or max(2, min(8, (SMEM_BUDGET - base.fixed_bytes()) // base.stage_bytes()))
    smem = dataclasses.replace(base, num_stages=stages).smem_bytes()
    if smem > SMEM_PER_SM - 1024:
        raise ValueError(f"num_stages={stages} needs {smem} bytes of shared memory a block; at most "
                         f"{SMEM_PER_SM - 1024} fit")
    per_sm = 2 if 2 * (smem + 1024) <= SMEM_PER_SM else 1
    splits = config.num_splits or choose_splits(n // block_n, base.steps, per_sm * compat.num_sms())
    return dataclasses.replace(base, num_stages=stages, num_splits=min(splits, base.steps))


# -- references ------------------------------------------------------------------------------


def w8a16_matmul_reference(
    x: Float[Array, "M K"],
    w: Int8[Array, "K N"],
    scale: Float[Array, "N"],
    *,
    config: QuantMatmulConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """x @ (w * scale) in float32, returned in x's dtype."""
    del config, interpret
    y = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return (y * jnp.reshape(scale, (1, -1)).astype(jnp.float32)).astype(x.dtype)


def dequantize_int4(packed: UInt8[Array, "K/2 N"], scale: Float[Array, "G N"], zero: UInt8[Array, "G N"],
                    input_scale: Float[Array, "K"] | None = None) -> Float[Array, "K N"]:
    """The float32 matrix an Int4Weight's arrays stand for: diag(1/input_scale) ((q - zero) * scale)."""
    k2, n = packed.shape
    q = jnp.stack([packed & 15, packed >> 4], axis=1).reshape(2 * k2, n).astype(jnp.float32)
    group = 2 * k2 // scale.shape[0]
    repeat = lambda a: jnp.repeat(a.astype(jnp.float32), group, axis=0)
    w = (q - repeat(zero)) * repeat(scale)
    return w if input_scale is None else w / input_scale.astype(jnp.float32)[:, None]


def w4a16_matmul_reference(
    x: Float[Array, "M K"],
    packed: UInt8[Array, "K/2 N"],
    scale: Float[Array, "G N"],
    zero: UInt8[Array, "G N"],
    input_scale: Float[Array, "K"] | None = None,
    *,
    config: QuantMatmulConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """x @ dequantize_int4(...) in float32, returned in x's dtype."""
    del config, interpret
    w = dequantize_int4(packed, scale, zero, input_scale)
    return jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST).astype(x.dtype)


# -- kernels ---------------------------------------------------------------------------------


def _check_x(x, k: int) -> int:
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x of shape {tuple(x.shape)} must be [M, {k}] for a weight with K={k}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x of dtype {x.dtype}: the kernel takes floating-point activations")
    return x.shape[0]


def _pad_tokens(x, tokens: int):
    return jnp.pad(x, ((0, tokens - x.shape[0]), (0, 0)))


def w8a16_matmul(
    x: Float[Array, "M K"],
    w: Int8[Array, "K N"],
    scale: Float[Array, "N"],
    *,
    config: QuantMatmulConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """The Mosaic GPU kernel (activations in bf16); same contract as `w8a16_matmul_reference`."""
    if w.ndim != 2 or w.dtype != jnp.int8:
        raise ValueError(f"w of shape {tuple(w.shape)} and dtype {w.dtype} must be a 2-D int8 [K, N] matrix")
    k, n = w.shape
    m = _check_x(x, k)
    if math.prod(scale.shape) != n:
        raise ValueError(f"scale of shape {tuple(scale.shape)} must hold one value per output channel ({n})")
    p = plan("int8", m, k, n, config)
    xb = _pad_tokens(x.astype(jnp.bfloat16), p.tokens)
    partial = _build(p, interpret)(xb, w)
    y = jnp.sum(partial, axis=0) * jnp.reshape(scale, (n, 1)).astype(jnp.float32)
    return y.T[:m].astype(x.dtype)


def int4_group_sums(x_lo, x_hi, group_rows: int):
    """Per-group sums of the bf16 activations the kernel multiplies, [tokens, G]."""
    lo = x_lo.astype(jnp.float32).reshape(x_lo.shape[0], -1, group_rows).sum(-1)
    hi = x_hi.astype(jnp.float32).reshape(x_hi.shape[0], -1, group_rows).sum(-1)
    return lo + hi


def w4a16_matmul(
    x: Float[Array, "M K"],
    packed: UInt8[Array, "K/2 N"],
    scale: Float[Array, "G N"],
    zero: UInt8[Array, "G N"],
    input_scale: Float[Array, "K"] | None = None,
    *,
    config: QuantMatmulConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """The Mosaic GPU kernel (activations in bf16); same contract as `w4a16_matmul_reference`."""
    if packed.ndim != 2 or packed.dtype != jnp.uint8:
        raise ValueError(f"packed of shape {tuple(packed.shape)} and dtype {packed.dtype} must be uint8 [K/2, N]")
    k, n = 2 * packed.shape[0], packed.shape[1]
    m = _check_x(x, k)
    if scale.ndim != 2 or scale.shape[1] != n or k % scale.shape[0] or zero.shape != scale.shape:
        raise ValueError(f"scale {tuple(scale.shape)} and zero {tuple(zero.shape)} must both be [G, {n}] "
                         f"with G dividing K={k}")
    if input_scale is not None and input_scale.shape != (k,):
        raise ValueError(f"input_scale of shape {tuple(input_scale.shape)} must be ({k},)")
    group_size = k // scale.shape[0]
    p = plan("int4", m, k, n, config, group_size)
    xf = x.astype(jnp.float32)
    if input_scale is not None:
        xf = xf / input_scale.astype(jnp.float32)
    xf = _pad_tokens(xf, p.tokens)
    x_lo = xf[:, 0::2].astype(jnp.bfloat16)  # even inputs: low nibbles
    x_hi = xf[:, 1::2].astype(jnp.bfloat16)  # odd inputs: high nibbles
    sums = int4_group_sums(x_lo, x_hi, p.rows).T  # [G, tokens]
    sums = jnp.pad(sums, ((0, 0), (0, SUMS_WIDTH - p.tokens)))  # a TMA copy moves a multiple of 128 bytes
    partial = _build(p, interpret)(jnp.stack([x_lo, x_hi]), packed, scale.astype(jnp.float32),
                                   zero.astype(jnp.uint8), sums)
    return jnp.sum(partial, axis=0).T[:m].astype(x.dtype)


def _swizzled(shape, dtype):
    """A shared-memory tile in the layout TMA writes and wgmma reads: 8-row tiles, rows of up to
    128 bytes swizzled."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    swizzle = min(128, shape[-1] * jnp.dtype(dtype).itemsize)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)))


@functools.lru_cache(maxsize=None)
def _build(p: Plan, interpret: bool):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    int4 = p.kind == "int4"
    wgs, rows, tokens, stages = p.compute_wgs, p.rows, p.tokens, p.num_stages
    copies = wgs + (4 if int4 else 1)  # TMA copies landing on a stage's barrier

    def layout(x, kind):
        return x if interpret else plgpu.layout_cast(x, kind)

    def products(pairs):
        """sum of a^T x^T over (a [rows, 64] bf16 weights, x [tokens, rows] bf16 activations)."""
        if interpret:
            return sum(jnp.dot(a[...].T, x[...].T, preferred_element_type=jnp.float32) for a, x in pairs)

        def scope(acc_ref):
            for a, x in pairs:
                plgpu.wgmma(acc_ref, plgpu.transpose_ref(a, (1, 0)), plgpu.transpose_ref(x, (1, 0)))
            return acc_ref[...]

        return pl.run_scoped(scope, plgpu.ACC((WG_ROWS, tokens), jnp.float32))

    def body(refs, scoped):
        if int4:
            x_ref, w_ref, s_ref, z_ref, sums_ref, out_ref = refs
            (w_smem, x_smem, s_smem, z_smem, sums_smem, dq_smem, o_smem), ready, free = scoped
        else:
            x_ref, w_ref, out_ref = refs
            (w_smem, x_smem, dq_smem, o_smem), ready, free = scoped
        nb, sp, wg = lax.axis_index("n"), lax.axis_index("s"), lax.axis_index("wg")
        first = sp * p.per_split
        steps = jnp.clip(p.steps - first, 0, p.per_split)
        n0 = nb * p.block_n

        @pl.when(wg < wgs)
        def _compute():
            def step_fn(i, acc):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(ready.at[slot])
                raw = layout(w_smem.at[slot, wg][...], plgpu.Layout.WGMMA_8BIT)
                if int4:
                    code = raw.astype(jnp.uint16)
                    dq_smem.at[wg, 0][...] = lax.bitcast_convert_type((code & 0xF) | 0x4300, jnp.bfloat16)
                    dq_smem.at[wg, 1][...] = lax.bitcast_convert_type((code >> 4) | 0x4300, jnp.bfloat16)
                    if not interpret:
                        plgpu.commit_smem()  # the stores, visible to wgmma
                    prod = products([(dq_smem.at[wg, h], x_smem.at[slot, h]) for h in range(2)])
                    # The group's scale and zero point per output feature, its activation sum per token.
                    cols = pl.ds(wg * WG_ROWS, WG_ROWS)
                    scale = layout(s_smem.at[slot, cols][...], plgpu.Layout.WGMMA.reduce(1))
                    zero = layout(z_smem.at[slot, cols][...], plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
                    total = layout(sums_smem.at[slot, pl.ds(0, tokens)][...], plgpu.Layout.WGMMA.reduce(0))
                    shape = (WG_ROWS, tokens)
                    by_row = lambda v: lax.broadcast_in_dim(v, shape, [0])
                    contrib = by_row(scale) * (prod - by_row(zero + 128.0) * lax.broadcast_in_dim(total, shape, [1]))
                else:
                    dq_smem.at[wg][...] = raw.astype(jnp.bfloat16)
                    if not interpret:
                        plgpu.commit_smem()
                    contrib = products([(dq_smem.at[wg], x_smem.at[slot])])
                plgpu.barrier_arrive(free.at[slot])
                return acc + contrib

            zeros = layout(jnp.zeros((WG_ROWS, tokens), jnp.float32), plgpu.Layout.WGMMA)
            acc = lax.fori_loop(0, steps, step_fn, zeros)
            o_smem.at[wg][...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], out_ref.at[sp, pl.ds(n0 + wg * WG_ROWS, WG_ROWS)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _memory():
            def issue(i, carry):
                slot = lax.rem(i, stages)

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(free.at[slot])

                step = first + i
                for h in range(wgs):
                    src = w_ref.at[pl.ds(step * rows, rows), pl.ds(n0 + h * WG_ROWS, WG_ROWS)]
                    plgpu.copy_gmem_to_smem(src, w_smem.at[slot, h], ready.at[slot])
                if int4:
                    plgpu.copy_gmem_to_smem(x_ref.at[:, :, pl.ds(step * rows, rows)], x_smem.at[slot],
                                            ready.at[slot])
                    plgpu.copy_gmem_to_smem(s_ref.at[step, pl.ds(n0, p.block_n)], s_smem.at[slot], ready.at[slot])
                    plgpu.copy_gmem_to_smem(z_ref.at[step, pl.ds(n0, p.block_n)], z_smem.at[slot], ready.at[slot])
                    plgpu.copy_gmem_to_smem(sums_ref.at[step], sums_smem.at[slot], ready.at[slot])
                else:
                    plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(step * rows, rows)], x_smem.at[slot], ready.at[slot])
                return carry

            lax.fori_loop(0, steps, issue, None)

    def entry(*refs):
        w_dtype = jnp.uint8 if int4 else jnp.int8
        smem = [_swizzled((stages, wgs, rows, WG_ROWS), w_dtype)]
        if int4:
            smem += [_swizzled((stages, 2, tokens, rows), jnp.bfloat16),
                     plgpu.SMEM((stages, p.block_n), jnp.float32),
                     plgpu.SMEM((stages, p.block_n), jnp.uint8),
                     plgpu.SMEM((stages, SUMS_WIDTH), jnp.float32),
                     _swizzled((wgs, 2, rows, WG_ROWS), jnp.bfloat16)]
        else:
            smem += [_swizzled((stages, tokens, rows), jnp.bfloat16),
                     _swizzled((wgs, rows, WG_ROWS), jnp.bfloat16)]
        smem.append(plgpu.SMEM((wgs, WG_ROWS, tokens), jnp.float32))
        ready = plgpu.Barrier(num_arrivals=copies, num_barriers=stages)
        free = plgpu.Barrier(num_arrivals=wgs, num_barriers=stages)
        pl.run_scoped(lambda *scoped: body(refs, scoped), tuple(smem), ready, free, collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((p.num_splits, p.n, tokens), jnp.float32),
        grid=(p.n // p.block_n, p.num_splits),
        grid_names=("n", "s"),
        num_threads=wgs + 1,
        thread_name="wg",
        interpret=compat.gpu_interpret_params() if interpret else False,
    )
