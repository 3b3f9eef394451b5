"""Weight-only fp4 (e2m1) matmul for decode shapes over K-major codes: NVFP4 / MXFP4 weights
dequantized in registers, a scale per block of 16 inputs.

`x @ W` with W[k, n] = e2m1(q_t[n, k]) * block_scale[k // 16, n] * channel_scale[n], the codes given
transposed as int4 [N, K] holding each e2m1 code's four bits (sign in bit 3). The kernel is
quant_matmul_kmajor's int4 one with another conversion: "swap AB" (64 output features are wgmma's M,
the tokens, padded to a multiple of 8, its N), a memory warpgroup streaming code, block-scale and
activation tiles by TMA, K split across blocks with an XLA epilogue that sums the splits and applies
the channel scales. A compute warpgroup loads its [64, 128] codes in wgmma's register-operand layout
and converts them in registers: e2m1 to e4m3 by a byte-permute table lookup (`prmt`, two tables of
four bytes a word: magnitudes, and the same with the sign bit set), e4m3 to float16 in hardware (the
only e4m3 conversion Hopper has, so the activations enter as float16, saturated at 65504).

Block scales apply per 16 inputs, so a step of 128 inputs is eight wgmmas of K = 16, against
activations XLA re-lays as [K/16, tokens, 16] so each chunk of a step is its own shared-memory tile
(32-byte rows). Two ways to apply the scales (`FP4Config.scale_at`):
- "operand" (default): each 16-column chunk of the float16 codes is multiplied by its block scale
  (one per row) before its wgmma, and the eight wgmmas accumulate into one accumulator. Exact for
  the scales `jaxllm.kernel_weights.fp4_twin` makes: an e2m1 value (2 significant bits) times an
  e4m3 or power-of-two scale (at most 4) fits float16's 11, within its range (|e2m1| <= 6, NVFP4's
  scales <= 448, MXFP4's relative to the channel's largest so <= 1 and >= 2^-16). Arbitrary float16
  scales round there (to float16's 11 bits), and must stay below 65504 / 6.
- "products": each chunk's product goes to its own float32 accumulator and is scaled after the
  wgmma (acc += scale_j * P_j), `accumulators_in_flight` of them issued together. More registers
  and a multiply-add per accumulator element and chunk, which "operand" replaces with a float16
  multiply per weight element; measured on the H200 it was slower at 8 of 9 decode points
  (BENCHMARKS.md), so "operand" is the default.

Block scales may be float16 or 8-bit (float8_e4m3fn for NVFP4's e4m3 scales, float8_e5m2 for
MXFP4's powers of two): 8-bit ones add 1/8 of the codes' bytes, float16 ones 1/4, to a kernel bound
by the bytes it reads. `jaxllm.kernel_weights.fp4_twin` stores them in 8 bits.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, UInt8

from pallas_kernels import compat
from pallas_kernels.quant_matmul_kmajor import F16_MAX, WG_ROWS, KMajorConfig, Plan, _check_x, _pad_tokens, plan
from pallas_kernels.smem import swizzled

BLOCK = 16  # inputs per block scale
STEP = 128  # inputs per pipeline step: 8 blocks
CHUNKS = STEP // BLOCK
SCALE_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
SCALE_AT = ("operand", "products")
# The e4m3 bytes of e2m1's magnitudes [0, 0.5, 1, 1.5, 2, 3, 4, 6] (byte i of the pair of words is
# magnitude i), then of their negatives (0x80 set): prmt's two source words, low byte first.
E4M3_POSITIVE = (0x3C383000, 0x4C484440)
E4M3_NEGATIVE = (0xBCB8B080, 0xCCC8C4C0)


@dataclasses.dataclass(frozen=True)
class FP4Config(KMajorConfig):
    """KMajorConfig's knobs (block_k must stay 128) and where the block scales apply."""

    scale_at: str = "operand"  # "operand" or "products" (see the module docstring)

    def __post_init__(self):
        super().__post_init__()
        if self.scale_at not in SCALE_AT:
            raise ValueError(f"scale_at={self.scale_at!r} must be one of {SCALE_AT}")


# -- weight layout ---------------------------------------------------------------------------


def fp4_kmajor(packed: UInt8[Array, "K/2 N"]) -> Array:
    """FP4Weight's packed e2m1 codes (input 2i in the low nibble) as int4 [N, K] holding each code's
    four bits: code c as c if c < 8 else c - 16."""
    if packed.ndim != 2 or packed.dtype != jnp.uint8:
        raise ValueError(f"packed of shape {tuple(packed.shape)} and dtype {packed.dtype} must be a 2-D uint8 "
                         f"[K/2, N] matrix (two e2m1 codes a byte)")
    k2, n = packed.shape
    codes = jnp.stack([packed & 15, packed >> 4], axis=1).reshape(2 * k2, n).astype(jnp.int8)
    return jnp.where(codes < 8, codes, codes - 16).astype(jnp.int4).T


def e2m1_values(q_t: Array) -> Float[Array, "..."]:
    """The float32 values of int4-held e2m1 codes: sign, 2-bit exponent e and 1-bit mantissa m make
    m / 2 if e == 0, else 2^(e-1) (1 + m / 2). Integer arithmetic, not a table: a kernel may not
    capture one (interpret mode runs this in the kernel)."""
    c = q_t.astype(jnp.int32) & 15
    e, m = (c >> 1) & 3, c & 1
    twice = jnp.where(e == 0, m, (2 + m) << jnp.maximum(e - 1, 0))
    return jnp.where(c >= 8, -0.5, 0.5) * twice.astype(jnp.float32)


# -- the register conversion, as a model and as PTX ---------------------------------------------


def prmt(a: int, b: int, selector: int) -> int:
    """PTX `prmt.b32 d, a, b, selector` (default mode) on Python ints: byte i of d is byte
    selector[4i+2:4i] of the eight bytes {b, a} (a's are 0-3), or that byte's sign bit replicated
    when selector bit 4i+3 is set."""
    pool = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nibble = (selector >> 4 * i) & 0xF
        byte = pool[nibble & 7]
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def e2m1_word_to_e4m3(word: int) -> tuple[int, int]:
    """Eight e2m1 codes (nibble i of a 32-bit word is element i) as eight e4m3 bytes in two words
    (byte i of the pair is element i): the kernel's conversion, step by step."""
    index = word & 0x77777777  # the magnitude's table position; bit 3 clear selects plain bytes
    sign = (word >> 1) & 0x44444444  # the sign moved to bit 2 of each nibble: picks the negative word
    out = []
    for part in range(2):  # elements 0-3, then 4-7: prmt reads the low four selector nibbles
        idx, sgn = index >> 16 * part, sign >> 16 * part
        positive = prmt(*E4M3_POSITIVE, idx)
        negative = prmt(*E4M3_NEGATIVE, idx)
        out.append(prmt(positive, negative, sgn | 0x3210))
    return out[0], out[1]


def _e2m1_to_e4m3_registers(codes):
    """A Mosaic GPU FragmentedArray of int4-held e2m1 codes as float8_e4m3fn, register by register."""
    import jax.experimental.mosaic.gpu as mgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector
    from jax.experimental.mosaic.gpu import utils

    i32, i8 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(8)
    f8 = ir.Float8E4M3FNType.get()
    regs = codes.registers
    [width] = ir.VectorType(regs.flat[0].type).shape  # codes a register holds (2 in the WGMMA layout)
    group = 8 // width  # registers per 32-bit word
    if 8 % width or regs.size % group:
        raise NotImplementedError(f"{regs.size} registers of {width} codes do not fill 32-bit words")
    const = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v - (1 << 32) if v >= 1 << 31 else v))
    asm = f"""{{
    .reg .b32 pos, neg;
    prmt.b32 pos, {E4M3_POSITIVE[0]}, {E4M3_POSITIVE[1]}, $1;
    prmt.b32 neg, {E4M3_NEGATIVE[0]}, {E4M3_NEGATIVE[1]}, $1;
    prmt.b32 $0, pos, neg, $2;
    }}"""
    out = np.empty_like(regs)
    flat = list(np.ndindex(regs.shape))
    for g in range(0, len(flat), group):
        idxs = flat[g:g + group]
        word = utils.bitcast(utils.vector_concat([regs[i] for i in idxs]), i32)  # element e in bits 4e..4e+3
        index = arith.andi(word, const(0x77777777))
        sign = arith.andi(arith.shrui(word, const(1)), const(0x44444444))
        words = []
        for part in range(2):
            idx = index if part == 0 else arith.shrui(index, const(16))
            sel = arith.ori(sign if part == 0 else arith.shrui(sign, const(16)), const(0x3210))
            words.append(llvm.inline_asm(i32, [idx, sel], asm, "=r,r,r"))
        pair = utils.vector_concat([vector.broadcast(ir.VectorType.get((1,), i32), w) for w in words])
        as_bytes = utils.bitcast(pair, ir.VectorType.get((8,), i8))  # byte e is element e
        for j, i in enumerate(idxs):
            piece = utils.vector_slice(as_bytes, slice(j * width, (j + 1) * width))
            out[i] = utils.bitcast(piece, ir.VectorType.get((width,), f8))
    return mgpu.FragmentedArray(_registers=out, _layout=codes.layout, _is_signed=None)


def _e2m1_to_f16(codes, shape):
    """[64, block_k] int4-held e2m1 codes in the WGMMA layout as float16, in registers."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                       return_type=plgpu.ShapeDtypeStruct(shape, jnp.float8_e4m3fn, layout=plgpu.Layout.WGMMA))
    def convert(_, c):
        return _e2m1_to_e4m3_registers(c)

    return convert(codes).astype(jnp.float16)


# -- reference -------------------------------------------------------------------------------


def dequantize_fp4_kmajor(q_t: Array, block_scale: Float[Array, "K/16 N"],
                          channel_scale: Float[Array, "N"]) -> Float[Array, "K N"]:
    """The float32 [K, N] matrix: W[k, n] = e2m1(q_t[n, k]) * block_scale[k // 16, n] * channel_scale[n]."""
    scale = jnp.repeat(block_scale.astype(jnp.float32), BLOCK, axis=0)
    return e2m1_values(q_t).T * scale * jnp.reshape(channel_scale, (1, -1)).astype(jnp.float32)


def w4a16_fp4_kmajor_reference(
    x: Float[Array, "M K"],
    q_t: Array,
    block_scale: Float[Array, "K/16 N"],
    channel_scale: Float[Array, "N"],
    *,
    config: KMajorConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """x @ dequantize_fp4_kmajor(...) in float32, returned in x's dtype."""
    del config, interpret
    w = dequantize_fp4_kmajor(q_t, block_scale, channel_scale)
    return jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST).astype(x.dtype)


# -- kernel ----------------------------------------------------------------------------------


def _check(x, q_t, block_scale, channel_scale) -> tuple[int, int, int]:
    """(M, K, N), or a ValueError naming the first input the kernel cannot take."""
    if q_t.ndim != 2 or q_t.dtype != jnp.int4:
        raise ValueError(f"q_t of shape {tuple(q_t.shape)} and dtype {q_t.dtype} must be a 2-D int4 [N, K] matrix")
    n, k = q_t.shape
    m = _check_x(x, k)
    if k % STEP:
        raise ValueError(f"K={k} must be a multiple of {STEP} for the fp4 kernel")
    if block_scale.shape != (k // BLOCK, n) or block_scale.dtype not in SCALE_DTYPES:
        raise ValueError(f"block_scale of shape {tuple(block_scale.shape)} and dtype {block_scale.dtype} must be "
                         f"[{k // BLOCK}, {n}] (one scale per {BLOCK} inputs) of float16, float8_e4m3fn or "
                         f"float8_e5m2")
    if channel_scale.shape != (n,):
        raise ValueError(f"channel_scale of shape {tuple(channel_scale.shape)} must be ({n},)")
    return m, k, n


def w4a16_fp4_kmajor(
    x: Float[Array, "M K"],
    q_t: Array,
    block_scale: Float[Array, "K/16 N"],
    channel_scale: Float[Array, "N"],
    *,
    config: KMajorConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """The Mosaic GPU kernel (activations as float16, saturated at 65504); same contract as
    `w4a16_fp4_kmajor_reference`."""
    m, k, n = _check(x, q_t, block_scale, channel_scale)
    p = plan("fp4", m, k, n, config)
    scale_at = config.scale_at if isinstance(config, FP4Config) else "operand"
    xh = jnp.clip(x.astype(jnp.float32), -F16_MAX, F16_MAX).astype(jnp.float16)
    xh = _pad_tokens(xh, p.tokens)
    chunks = xh.reshape(p.tokens, k // BLOCK, BLOCK).transpose(1, 0, 2)  # [K/16, tokens, 16]: a tile per chunk
    partial = _build(p, jnp.dtype(block_scale.dtype), scale_at, interpret)(chunks, q_t, block_scale)
    y = jnp.sum(partial, axis=0) * channel_scale.astype(jnp.float32)[:, None]
    return y.T[:m].astype(x.dtype)


def accumulators_in_flight(tokens: int) -> int:
    """How many chunk products "products" issues before reading them: a power of two (dividing the
    8 chunks) whose [64, tokens] float32 accumulators take at most 64 registers a thread."""
    return min(CHUNKS, 1 << (128 // tokens).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def _build(p: Plan, scale_dtype, scale_at: str, interpret: bool):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    wgs, tokens, stages = p.compute_wgs, p.tokens, p.num_stages
    shape = (WG_ROWS, tokens)
    f16 = jnp.float16

    def layout(v, kind):
        return v if interpret else plgpu.layout_cast(v, kind)

    def weights(ref):
        """The [64, 128] codes as float16 e2m1 values, in wgmma's register-operand layout."""
        if interpret:
            return e2m1_values(ref[...]).astype(f16)
        with jax.named_scope("load"):
            raw = compat.mgpu_load(ref, layout=plgpu.Layout.WGMMA)
        with jax.named_scope("convert"):
            return _e2m1_to_f16(raw, (WG_ROWS, STEP))

    def row_scale(s_ref, j, wg):
        """Block scale j of the warpgroup's 64 rows as float16, one per row."""
        s = layout(s_ref.at[j, pl.ds(wg * WG_ROWS, WG_ROWS)][...], plgpu.Layout.WGMMA.reduce(1))
        return s.astype(f16)

    def by_row(v, cols):
        return lax.broadcast_in_dim(v, (WG_ROWS, cols), [0])

    def chunk(a, j):
        return a[:, j * BLOCK:(j + 1) * BLOCK]

    def products(pairs):
        """[a_j @ x_j^T for (a_j, x_j) in pairs], each in float32, the wgmmas issued together."""
        if interpret:
            return [jnp.dot(a, x[...].T, preferred_element_type=jnp.float32) for a, x in pairs]

        def scope(*accs):
            with jax.named_scope("wgmma"):
                for acc, (a, x) in zip(accs, pairs):
                    plgpu.wgmma(acc, a, plgpu.transpose_ref(x, (1, 0)))
            return [acc[...] for acc in accs]

        return pl.run_scoped(scope, *[plgpu.ACC(shape, jnp.float32) for _ in pairs])

    def summed_product(pairs):
        """sum_j a_j @ x_j^T in float32: the wgmmas accumulate in one accumulator."""
        if interpret:
            return sum(jnp.dot(a, x[...].T, preferred_element_type=jnp.float32) for a, x in pairs)

        def scope(acc):
            with jax.named_scope("wgmma"):
                for a, x in pairs:
                    plgpu.wgmma(acc, a, plgpu.transpose_ref(x, (1, 0)))
            return acc[...]

        return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))

    def step_product(w_ref, x_ref, s_ref, wg):
        """This step's [64, tokens] float32 product, block scales applied."""
        a = weights(w_ref)
        if scale_at == "operand":
            return summed_product([(chunk(a, j) * by_row(row_scale(s_ref, j, wg), BLOCK), x_ref.at[j])
                                   for j in range(CHUNKS)])
        total = None
        group = accumulators_in_flight(tokens)
        for j0 in range(0, CHUNKS, group):
            parts = products([(chunk(a, j), x_ref.at[j]) for j in range(j0, j0 + group)])
            for j, part in zip(range(j0, j0 + group), parts):
                scaled = by_row(row_scale(s_ref, j, wg).astype(jnp.float32), tokens) * part
                total = scaled if total is None else total + scaled
        return total

    def body(refs, scoped):
        x_ref, w_ref, s_ref, out_ref = refs
        (w_smem, x_smem, s_smem, o_smem), ready, free = scoped
        nb, sp, wg = lax.axis_index("n"), lax.axis_index("s"), lax.axis_index("wg")
        first = sp * p.per_split
        steps = jnp.clip(p.steps - first, 0, p.per_split)
        n0 = nb * p.block_n

        @pl.when(wg < wgs)
        def _compute():
            def step_fn(i, acc):
                slot = lax.rem(i, stages)
                with jax.named_scope("wait_ready"):
                    plgpu.barrier_wait(ready.at[slot])
                prod = step_product(w_smem.at[slot, wg], x_smem.at[slot], s_smem.at[slot], wg)

                @pl.when(i + stages < steps)  # the memory warpgroup waits for this slot again
                def _():
                    plgpu.barrier_arrive(free.at[slot])

                return acc + prod

            zeros = layout(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
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
                    src = w_ref.at[pl.ds(n0 + h * WG_ROWS, WG_ROWS), pl.ds(step * STEP, STEP)]
                    plgpu.copy_gmem_to_smem(src, w_smem.at[slot, h], ready.at[slot])
                chunks = pl.ds(step * CHUNKS, CHUNKS)
                plgpu.copy_gmem_to_smem(x_ref.at[chunks], x_smem.at[slot], ready.at[slot])
                plgpu.copy_gmem_to_smem(s_ref.at[chunks, pl.ds(n0, p.block_n)], s_smem.at[slot], ready.at[slot])
                return carry

            lax.fori_loop(0, steps, issue, None)

    def entry(*refs):
        smem = [swizzled((stages, wgs, WG_ROWS, STEP), jnp.int4),
                swizzled((stages, CHUNKS, tokens, BLOCK), f16),  # 32-byte rows: one chunk's 16 inputs
                plgpu.SMEM((stages, CHUNKS, p.block_n), scale_dtype),
                plgpu.SMEM((wgs, WG_ROWS, tokens), jnp.float32)]
        ready = plgpu.Barrier(num_arrivals=wgs + 2, num_barriers=stages)
        free = plgpu.Barrier(num_arrivals=wgs, num_barriers=stages)
        pl.run_scoped(lambda *scoped: body(refs, scoped), tuple(smem), ready, free, collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((p.num_splits, p.n, tokens), jnp.float32),
        grid=(p.n // p.block_n, p.num_splits),
        grid_names=("n", "s"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=None if interpret else compat.lane_compiler_params(),
        interpret=compat.gpu_interpret_params() if interpret else False,
    )
