"""Weight-only quantized matmuls for decode shapes over K-major weights: the codes feed wgmma from
registers.

`x @ W` for W given transposed, [N, K] with K contiguous: bf16 (`bf16_kmajor`: wgmma reads the
weight tile straight from shared memory, no conversion), int8 or float8 e4m3 with one scale per
output channel (e4m3 codes become float16 in registers, the only conversion Hopper has for them, so
that kernel takes float16 activations), or signed 4-bit codes (the stored code minus 8) with a scale and zero point per group of 128 inputs.
The kernels compute out^T = W^T x^T ("swap AB"): 64 output features fill wgmma's M side and the
tokens, padded to a multiple of 8, its N, so a decode step's few tokens waste no tensor-core rows. A
block owns `block_n` output features (one compute warpgroup per 64) and a range of K; a memory
warpgroup streams the code tiles and the matching activation tiles into shared memory by TMA,
`num_stages` deep; K is split across blocks when the output blocks alone do not fill the GPU, and a
small XLA epilogue sums the splits, applies int8's channel scales and transposes back to [M, N].
A compute warpgroup loads its [64, block_k] tile of codes (128 inputs unless configured) into
registers, converts them to bf16 there and multiplies with them as wgmma's register operand, with no
bf16 copy written back to shared memory and no fence before each product (the removed N-major
kernels did both). K-major codes are what make that load possible: wgmma's register operand holds
runs of K. int8 and int4 codes are loaded a 32-bit word a thread at a time (Mosaic GPU's "upcast"
layouts: 4 int8 or 8 int4) and used as they lie: the inputs are stored in the order (`kernel_order`,
set once at load) that makes each thread's words hold the inputs wgmma wants from it. Measured on the
H200 (BENCHMARKS.md, eighteenth session): against loading one or two codes at a time in the operand's
own layout, 11-13 % less time a product for int4 and 2-8 % for int8 at batch 1; shuffling the
codes into place after an upcast load instead (the eighth session) was as fast for int8 and 13-15 %
slower for int4. fp8 codes keep the byte-pair load: their twins also feed the fp8 x fp8 kernel.

int8's channel scale multiplies the output. int4's zero point comes off the codes in registers, within
the conversion (`_int4_operand`, since the nineteenth session: 3.1 % more decode tokens/s): the
magic-number conversion's subtraction takes 128 + z instead of a constant, and c - z, an integer of at
most 15 in size, is exact in bf16. The group scale multiplies each group's float32 partial
product: sum_k (c - z) s x = s * sum_k (c - z) x. (Until the sixteenth session the kernel multiplied
c - 8 and added (8 - z) times each group's activation sum, which XLA computed before every product:
three fusions, 0.3 ms of a batch-1 8B decode step.)
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
from pallas_kernels.smem import bits, swizzled

WG_ROWS = 64  # output features per compute warpgroup: wgmma's M
MAX_TOKENS = 64
SMEM_PER_SM = 228 * 1024
SMEM_BUDGET = 110 * 1024  # per block for the default stage count (two blocks an SM)
MIN_STEPS_PER_SPLIT = 4
# The most tiles in flight a block by default, per kind (else 8). int4's steps are short of bytes and
# long in registers: fewer stages leave room for more blocks an SM, whose chains interleave
# (benchmarks patch this to compare; BENCHMARKS.md, nineteenth session).
MAX_STAGES = {"int4": 4}
INT4_GROUP = 128  # the int4 kernel steps one group of inputs at a time
# Kinds whose codes a thread loads a 32-bit word at a time (Mosaic GPU's WGMMA_UPCAST layouts) and
# feeds to wgmma as they lie, which the codes' stored input order makes right (`kernel_order`). The
# others load one or two codes at a time in the WGMMA layout (benchmarks patch this to compare).
UPCAST_KINDS = frozenset({"int8", "int4"})
# Whether upcast-loaded int4 codes are converted by our own three instructions a pair with the zero
# point folded in (`_int4_operand`), which needs its own stored order, or by Mosaic GPU's conversion
# followed by a subtraction (benchmarks patch this to compare).
INT4_FOLDED = True
CODE_DTYPES = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn), "int4": jnp.dtype(jnp.int4),
               "bf16": jnp.dtype(jnp.bfloat16), "fp4": jnp.dtype(jnp.int4)}  # fp4: e2m1 codes held in int4
EIGHT_BIT_KINDS = {CODE_DTYPES["int8"]: "int8", CODE_DTYPES["fp8"]: "fp8"}  # w8a16_kmajor's code dtypes
F16_MAX = 65504.0


@dataclasses.dataclass(frozen=True)
class KMajorConfig:
    """Tuning knobs; None picks a default from the shapes (see `plan`)."""

    block_n: int | None = None  # output features per block: 64, 128 or 256 (a compute warpgroup per 64)
    block_k: int | None = None  # int8 only: inputs per pipeline step, 128 or 256 (int4 steps one group)
    num_stages: int | None = None  # tiles in flight per block
    num_splits: int | None = None  # blocks sharing one output block's K range

    def __post_init__(self):
        if self.block_n is not None and self.block_n not in (64, 128, 256):
            raise ValueError(f"block_n={self.block_n} must be 64, 128 or 256")
        if self.block_k is not None and self.block_k not in (128, 256):
            raise ValueError(f"block_k={self.block_k} must be 128 or 256")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be at least 1")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be at least 1")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static shape of one kernel launch."""

    kind: str  # "int8", "fp8" (e4m3 codes, one scale per channel, as int8), "int4", "bf16" (no codes)
    # or "fp4" (e2m1 codes, a scale per 16 inputs: pallas_kernels/fp4_matmul_kmajor.py)
    k: int
    n: int
    tokens: int  # padded token count (wgmma's N)
    block_n: int
    block_k: int  # inputs per step
    num_stages: int
    num_splits: int
    upcast_load: bool = False  # kind in UPCAST_KINDS when planned
    int4_folded: bool = False  # int4 and INT4_FOLDED when planned

    @property
    def operand_dtype(self):
        """What the codes become in registers, and the activations' dtype: Hopper converts e4m3 to
        float16 only (w8a16_kmajor saturates activations beyond float16's range, 65504)."""
        return jnp.dtype(jnp.float16 if self.kind in ("fp8", "fp4") else jnp.bfloat16)

    @property
    def steps(self) -> int:
        return self.k // self.block_k

    @property
    def compute_wgs(self) -> int:
        return self.block_n // WG_ROWS

    @property
    def per_split(self) -> int:
        return -(-self.steps // self.num_splits)

    def stage_bytes(self) -> int:
        codes = self.block_n * self.block_k * bits(CODE_DTYPES[self.kind]) // 8
        extra = self.block_n * 5 if self.kind == "int4" else 0  # float32 scales, uint8 zero points
        if self.kind == "fp4":  # block scales, counted as float16 (8-bit ones take half)
            extra = 2 * self.block_n * self.block_k // 16
        return codes + self.tokens * self.block_k * 2 + extra

    def fixed_bytes(self) -> int:
        return self.block_n * self.tokens * 4  # the output tile

    def smem_bytes(self) -> int:
        return self.num_stages * self.stage_bytes() + self.fixed_bytes()


def plan(kind: str, m: int, k: int, n: int, config: KMajorConfig | None = None) -> Plan:
    """Block sizes, stages and splits for an [m, k] x [k, n] product; ValueError if they do not fit."""
    config = config or KMajorConfig()
    if not 1 <= m <= MAX_TOKENS:
        raise ValueError(f"{m} tokens: the kernel takes 1 to {MAX_TOKENS} (decode shapes); use XLA above")
    block_n = config.block_n or (128 if n % 128 == 0 else 64)
    if n % block_n:
        raise ValueError(f"N={n} output features must be a multiple of block_n={block_n}")
    if kind in ("int4", "fp4"):
        if block_n < 128:  # a TMA copy moves at least 128 bytes here: the block's zero points or scales
            raise ValueError(f"the {kind} kernel takes block_n of 128 or 256 (got {block_n}), so N={n} must be a "
                             f"multiple of 128")
        if config.block_k not in (None, INT4_GROUP):
            what = "one group of" if kind == "int4" else "a step of"
            raise ValueError(f"the {kind} kernel steps {what} {INT4_GROUP} inputs, not block_k={config.block_k}")
        block_k = INT4_GROUP
    else:
        block_k = config.block_k or 128
    if k % block_k:
        raise ValueError(f"K={k} must be a multiple of {block_k} for the {kind} kernel")
    base = Plan(kind, k, n, -(-m // 8) * 8, block_n, block_k, 1, 1, kind in UPCAST_KINDS,
                kind == "int4" and kind in UPCAST_KINDS and INT4_FOLDED)
    most_stages = MAX_STAGES.get(kind, 8)
    stages = config.num_stages or max(2, min(most_stages, (SMEM_BUDGET - base.fixed_bytes()) // base.stage_bytes()))
    smem = dataclasses.replace(base, num_stages=stages).smem_bytes()
    if smem > SMEM_PER_SM - 1024:
        raise ValueError(f"num_stages={stages} needs {smem} bytes of shared memory a block; at most "
                         f"{SMEM_PER_SM - 1024} fit")
    per_sm = 2 if 2 * (smem + 1024) <= SMEM_PER_SM else 1
    blocks = n // block_n
    most = max(1, base.steps // MIN_STEPS_PER_SPLIT)
    splits = config.num_splits or max(1, min(most, per_sm * compat.num_sms() // blocks))
    return dataclasses.replace(base, num_stages=stages, num_splits=min(splits, base.steps))


# -- weight layouts --------------------------------------------------------------------------


def int8_kmajor(q: Int8[Array, "K N"]) -> Int8[Array, "N K"]:
    """An int8 [K, N] weight's codes in the kernel's layout: [N, K], inputs in `kernel_order`."""
    if q.ndim != 2 or q.dtype != jnp.int8:
        raise ValueError(f"q of shape {tuple(q.shape)} and dtype {q.dtype} must be a 2-D int8 [K, N] matrix")
    return kernel_order(q, 0, "int8").T


def kernel_order(a: Array, axis: int, kind: str, inverse: bool = False) -> Array:
    """`a` with its inputs along `axis` in the order the `kind` kernel stores codes in (or, with
    `inverse`, back from it); the identity for kinds not in UPCAST_KINDS.

    Lane q of each four holds inputs 8p + 2q + e (p = 0, 1, ..., e = 0, 1) of wgmma's register
    operand, its pair p, while the upcast load gives it whole 32-bit words: 4-bit inputs 8q..8q+7 of
    every 32, 8-bit inputs 8b + 4a..8b + 4a + 3 of every 16 (q = 2a + b). So int4 stores input
    8p + 2q + e at 8q + 4e + p (`_int4_operand` takes pair p from nibbles p and p + 4; with
    INT4_FOLDED off, Mosaic GPU's conversion takes it from nibbles 2p and 2p + 1: 8q + 2p + e), and
    int8 swaps b and p (8b + 4a + 2p + e <-> 8p + 4a + 2b + e). Lengths not a multiple of those 32 or
    16 (weights no kernel takes) stay as they are."""
    if kind not in CODE_DTYPES:
        raise ValueError(f"kind {kind!r}: choose one of {sorted(CODE_DTYPES)}")
    if kind not in UPCAST_KINDS or a.shape[axis] % (32 if kind == "int4" else 16):
        return a
    a = jnp.moveaxis(a, axis, -1)
    rows = _reordered_rows(a.reshape(-1, a.shape[-1]), kind, inverse, INT4_FOLDED)
    return jnp.moveaxis(rows.reshape(a.shape), -1, axis)


def _reordered_rows(a, kind: str, inverse: bool, int4_folded: bool):
    """`kernel_order` of a 2-D array's rows, by reshapes (a gather's constant indices cannot enter a
    kernel, and XLA ran a gather slower: a 2048-token prefill 1.18x (int8) and 1.37x (int4) longer);
    `int4_folded`: the order of INT4_FOLDED's conversion."""
    m, k = a.shape
    if kind == "int4" and int4_folded:  # [p, q, e] <-> [q, e, p]
        if inverse:
            return a.reshape(m, k // 32, 4, 2, 4).transpose(0, 1, 4, 2, 3).reshape(m, k)
        return a.reshape(m, k // 32, 4, 4, 2).transpose(0, 1, 3, 4, 2).reshape(m, k)
    if kind == "int4":  # the other orders are their own inverses
        return a.reshape(m, k // 32, 4, 4, 2).swapaxes(2, 3).reshape(m, k)
    return a.reshape(m, k // 16, 2, 2, 2, 2).swapaxes(2, 4).reshape(m, k)


def int4_kmajor(packed: UInt8[Array, "K/2 N"]) -> Array:
    """Int4Weight's packed unsigned codes (input 2i in the low nibble) as signed int4 [N, K]: code - 8,
    inputs in `kernel_order`."""
    if packed.ndim != 2 or packed.dtype != jnp.uint8:
        raise ValueError(f"packed of shape {tuple(packed.shape)} and dtype {packed.dtype} must be a 2-D uint8 "
                         f"[K/2, N] matrix (two codes a byte)")
    k2, n = packed.shape
    codes = jnp.stack([packed & 15, packed >> 4], axis=1).reshape(2 * k2, n).astype(jnp.int8)
    return (kernel_order(codes, 0, "int4") - 8).astype(jnp.int4).T


# -- references ------------------------------------------------------------------------------


def dequantize_int4(packed: UInt8[Array, "K/2 N"], scale: Float[Array, "G N"], zero: UInt8[Array, "G N"],
                    input_scale: Float[Array, "K"] | None = None) -> Float[Array, "K N"]:
    """The float32 matrix an Int4Weight's stored arrays stand for: diag(1/input_scale) ((q - zero) * scale)."""
    k2, n = packed.shape
    q = jnp.stack([packed & 15, packed >> 4], axis=1).reshape(2 * k2, n).astype(jnp.float32)
    group = 2 * k2 // scale.shape[0]
    repeat = lambda a: jnp.repeat(a.astype(jnp.float32), group, axis=0)
    w = (q - repeat(zero)) * repeat(scale)
    return w if input_scale is None else w / input_scale.astype(jnp.float32)[:, None]


def dequantize_int4_kmajor(q_t: Array, scale: Float[Array, "G N"], zero: UInt8[Array, "G N"],
                           input_scale: Float[Array, "K"] | None = None) -> Float[Array, "K N"]:
    """The float32 [K, N] matrix K-major int4 codes stand for:
    W[k, n] = (c[n, k] + 8 - zero[g, n]) * scale[g, n] / input_scale[k], g the group of k, c the
    codes q_t back in input order (`kernel_order`)."""
    return kernel_order(dequantize_int4_stored(q_t, scale, zero, input_scale), 0, "int4", inverse=True)


def dequantize_int4_stored(q_t: Array, scale: Float[Array, "G N"], zero: UInt8[Array, "G N"],
                           input_scale: Float[Array, "K"] | None = None) -> Float[Array, "K N"]:
    """`dequantize_int4_kmajor` with its rows left in `kernel_order`. XLA's product takes the
    activations in that order instead (on the H200 a 2048-token int4 prefill took 58.3 ms before the
    reordering, 66.7 ms with the activations reordered, 170-171 ms with the weight's codes or rows)."""
    n, k = q_t.shape
    group = k // scale.shape[0]
    repeat = lambda a: jnp.repeat(a.astype(jnp.float32), group, axis=0)  # groups span whole blocks of 32
    w = (q_t.astype(jnp.float32).T + 8.0 - repeat(zero)) * repeat(scale)
    if input_scale is None:
        return w
    return w / kernel_order(input_scale.astype(jnp.float32), 0, "int4")[:, None]


def w8a16_kmajor_reference(
    x: Float[Array, "M K"],
    w_t: Array,  # int8 or float8_e4m3fn [N, K]
    scale: Float[Array, "N"],
    *,
    config: KMajorConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """x @ (w_t.T * scale) in float32, returned in x's dtype."""
    del config, interpret
    w_t = kernel_order(w_t, 1, EIGHT_BIT_KINDS[jnp.dtype(w_t.dtype)], inverse=True)
    y = jnp.dot(x.astype(jnp.float32), w_t.astype(jnp.float32).T, precision=lax.Precision.HIGHEST)
    return (y * jnp.reshape(scale, (1, -1)).astype(jnp.float32)).astype(x.dtype)


def bf16_kmajor_reference(
    x: Float[Array, "M K"],
    w_t: Float[Array, "N K"],
    *,
    config: KMajorConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """x @ w_t.T in float32, returned in x's dtype."""
    del config, interpret
    return jnp.dot(x.astype(jnp.float32), w_t.astype(jnp.float32).T, precision=lax.Precision.HIGHEST).astype(x.dtype)


def w4a16_kmajor_reference(
    x: Float[Array, "M K"],
    q_t: Array,
    scale: Float[Array, "G N"],
    zero: UInt8[Array, "G N"],
    input_scale: Float[Array, "K"] | None = None,
    *,
    config: KMajorConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """x @ dequantize_int4_kmajor(...) in float32, returned in x's dtype."""
    del config, interpret
    w = dequantize_int4_kmajor(q_t, scale, zero, input_scale)
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


def w8a16_kmajor(
    x: Float[Array, "M K"],
    w_t: Array,  # int8 or float8_e4m3fn [N, K]
    scale: Float[Array, "N"],
    *,
    config: KMajorConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """The Mosaic GPU kernel (activations in bf16, float16 for e4m3 codes); same contract as
    `w8a16_kmajor_reference`."""
    if w_t.ndim != 2 or w_t.dtype not in EIGHT_BIT_KINDS:
        raise ValueError(f"w_t of shape {tuple(w_t.shape)} and dtype {w_t.dtype} must be a 2-D int8 or "
                         f"float8_e4m3fn [N, K] matrix")
    n, k = w_t.shape
    m = _check_x(x, k)
    if math.prod(scale.shape) != n:
        raise ValueError(f"scale of shape {tuple(scale.shape)} must hold one value per output channel ({n})")
    p = plan(EIGHT_BIT_KINDS[w_t.dtype], m, k, n, config)
    out_dtype = x.dtype
    if p.operand_dtype == jnp.float16:  # saturate rather than overflow to inf
        x = jnp.clip(x.astype(jnp.float32), -F16_MAX, F16_MAX)
    partial = _build(p, interpret)(_pad_tokens(x.astype(p.operand_dtype), p.tokens), w_t)
    y = jnp.sum(partial, axis=0) * jnp.reshape(scale, (n, 1)).astype(jnp.float32)
    return y.T[:m].astype(out_dtype)


def bf16_kmajor(
    x: Float[Array, "M K"],
    w_t: Float[Array, "N K"],
    *,
    config: KMajorConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """The Mosaic GPU kernel over a bf16 weight stored [N, K] (activations in bf16); same contract as
    `bf16_kmajor_reference`."""
    if w_t.ndim != 2 or w_t.dtype != jnp.bfloat16:
        raise ValueError(f"w_t of shape {tuple(w_t.shape)} and dtype {w_t.dtype} must be a 2-D bfloat16 [N, K] matrix")
    n, k = w_t.shape
    m = _check_x(x, k)
    p = plan("bf16", m, k, n, config)
    partial = _build(p, interpret)(_pad_tokens(x.astype(jnp.bfloat16), p.tokens), w_t)
    return jnp.sum(partial, axis=0).T[:m].astype(x.dtype)


def w4a16_kmajor(
    x: Float[Array, "M K"],
    q_t: Array,
    scale: Float[Array, "G N"],
    zero: UInt8[Array, "G N"],
    input_scale: Float[Array, "K"] | None = None,
    *,
    config: KMajorConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """The Mosaic GPU kernel (activations in bf16); same contract as `w4a16_kmajor_reference`."""
    if q_t.ndim != 2 or q_t.dtype != jnp.int4:
        raise ValueError(f"q_t of shape {tuple(q_t.shape)} and dtype {q_t.dtype} must be a 2-D int4 [N, K] matrix")
    n, k = q_t.shape
    m = _check_x(x, k)
    if scale.shape != (k // INT4_GROUP, n) or zero.shape != scale.shape:
        raise ValueError(f"scale {tuple(scale.shape)} and zero {tuple(zero.shape)} must both be "
                         f"[{k // INT4_GROUP}, {n}]: the kernel takes groups of {INT4_GROUP} inputs")
    if input_scale is not None and input_scale.shape != (k,):
        raise ValueError(f"input_scale of shape {tuple(input_scale.shape)} must be ({k},)")
    p = plan("int4", m, k, n, config)
    xf = x.astype(jnp.float32)
    if input_scale is not None:
        xf = xf / input_scale.astype(jnp.float32)
    xb = _pad_tokens(xf, p.tokens).astype(jnp.bfloat16)
    partial = _build(p, interpret)(xb, q_t, scale.astype(jnp.float32), zero.astype(jnp.uint8))
    return jnp.sum(partial, axis=0).T[:m].astype(x.dtype)


def _upcast_layout(kind: str):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.Layout.WGMMA_UPCAST_4X if kind == "int4" else plgpu.Layout.WGMMA_UPCAST_2X


def _as_wgmma_operand(w, layout):
    """bf16 [64, K] held in an upcast layout, relabelled as the WGMMA layout with no data moved: a
    thread's j-th pair of a column group becomes the operand's pair j of that group (see
    `kernel_order`)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import numpy as np
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils

    @plgpu.inline_mgpu(arg_types=(layout,),
                       return_type=plgpu.ShapeDtypeStruct(w.shape, w.dtype, layout=plgpu.Layout.WGMMA))
    def relabel(ctx, arr):
        del ctx
        shape = fa.WGMMA_LAYOUT.registers_shape(arr.shape)
        regs = np.empty(shape, dtype=object)
        pairs = arr.layout.vector_length // 2
        for idx, reg in np.ndenumerate(arr.registers):  # idx[1]: the column group, idx[4]: the 8-row half
            assert all(i == 0 for d, i in enumerate(idx) if d not in (1, 4)), idx
            for j in range(pairs):
                at = [0] * len(shape)
                at[1], at[4] = pairs * idx[1] + j, idx[4]
                regs[tuple(at)] = utils.vector_slice(reg, slice(2 * j, 2 * j + 2))
        assert all(r is not None for r in regs.flat)
        return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return relabel(w)


def _int4_operand(codes, zero):
    """Signed int4 codes [64, 128] (c - 8) in the UPCAST_4X layout, and their rows' zero points z
    (uint8, one a row), as wgmma's bf16 register operand c - z. Per pair of values: a shift (the
    pair lies in nibbles p and p + 4 of a word, see `kernel_order`), a lop3 that masks the two
    nibbles, flips their sign bits and sets bf16's exponent of 128 (128 + c, exact), and one
    subtraction of 128 + z, also exact: three instructions, where Mosaic GPU's conversion and a
    separate zero-point subtraction take four and a quarter."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import numpy as np
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA_UPCAST_4X, plgpu.Layout.WGMMA.reduce(1)),
                       return_type=plgpu.ShapeDtypeStruct(codes.shape, jnp.bfloat16, layout=plgpu.Layout.WGMMA))
    def convert(ctx, arr, zeros):
        del ctx
        i8, i32 = ir.IntegerType.get_signless(8), ir.IntegerType.get_signless(32)
        pair = ir.VectorType.get((2,), ir.BF16Type.get())
        const = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v))
        offsets = {}  # per 8-row half: (128 + z) twice, as bf16x2 bits
        for idx, reg in np.ndenumerate(zeros.registers):  # idx[2]: the 8-row half
            z = arith.extui(i32, utils.bitcast(reg, i8))
            offsets[idx[2]] = arith.addi(arith.muli(z, const(0x00010001)), const(0x43004300))
        shape = fa.WGMMA_LAYOUT.registers_shape(arr.shape)
        regs = np.empty(shape, dtype=object)
        for idx, reg in np.ndenumerate(arr.registers):  # idx[1]: the column group, idx[4]: the 8-row half
            assert all(i == 0 for d, i in enumerate(idx) if d not in (1, 4)), idx
            word = utils.bitcast(reg, i32)
            for p_ in range(4):
                nibbles = word if p_ == 0 else arith.shrui(word, const(4 * p_))
                value = llvm.inline_asm(
                    i32, [nibbles, offsets[idx[4]]],
                    "{ .reg .b32 s; lop3.b32 s, $1, 0x000F000F, 0x43084308, 0x6a; sub.bf16x2 $0, s, $2; }",
                    "=r,r,r")
                at = [0] * len(shape)
                at[1], at[4] = 4 * idx[1] + p_, idx[4]
                regs[tuple(at)] = utils.bitcast(value, pair)
        assert all(r is not None for r in regs.flat)
        return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return convert(codes, zero)


@functools.lru_cache(maxsize=None)
def _build(p: Plan, interpret: bool):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    int4 = p.kind == "int4"
    wgs, bk, tokens, stages = p.compute_wgs, p.block_k, p.tokens, p.num_stages
    copies = wgs + (3 if int4 else 1)  # TMA copies landing on a stage's barrier

    def layout(x, kind):
        return x if interpret else plgpu.layout_cast(x, kind)

    def weight_operand(ref):
        """wgmma's weight operand: the [64, block_k] codes as bf16 in its register-operand layout,
        or a bf16 weight's tile left in shared memory, which wgmma reads as it is."""
        if interpret:
            w = ref[...].astype(p.operand_dtype)
            return _reordered_rows(w, p.kind, True, p.int4_folded) if p.upcast_load else w
        if p.kind == "bf16":
            return ref
        with jax.named_scope("load"):  # scopes name the events of a Mosaic GPU profile
            raw = compat.mgpu_load(ref, layout=_upcast_layout(p.kind) if p.upcast_load else plgpu.Layout.WGMMA)
        with jax.named_scope("convert"):
            w = raw.astype(p.operand_dtype)
            return _as_wgmma_operand(w, _upcast_layout(p.kind)) if p.upcast_load else w

    def int4_operand(ref, zero):
        """The int4 tile as wgmma's operand [64, 128]: c - z, z the rows' zero points."""
        if p.int4_folded and not interpret:
            with jax.named_scope("load"):
                raw = compat.mgpu_load(ref, layout=plgpu.Layout.WGMMA_UPCAST_4X)
            with jax.named_scope("convert"):
                return _int4_operand(raw, zero)
        offset = (zero.astype(jnp.float32) - 8.0).astype(p.operand_dtype)  # stored: c - 8
        if interpret:
            return weight_operand(ref) - offset[:, None]
        return weight_operand(ref) - lax.broadcast_in_dim(offset, (WG_ROWS, p.block_k), [0])

    def product(a, x_ref):
        """a [64, block_k] @ x_ref[...]^T, in float32."""
        if interpret:
            return jnp.dot(a, x_ref[...].T, preferred_element_type=jnp.float32)

        def scope(acc_ref):
            with jax.named_scope("wgmma"):
                plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(x_ref, (1, 0)))
                return acc_ref[...]

        return pl.run_scoped(scope, plgpu.ACC((WG_ROWS, tokens), jnp.float32))

    def body(refs, scoped):
        if int4:
            x_ref, w_ref, s_ref, z_ref, out_ref = refs
            (w_smem, x_smem, s_smem, z_smem, o_smem), ready, free = scoped
        else:
            x_ref, w_ref, out_ref = refs
            (w_smem, x_smem, o_smem), ready, free = scoped
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
                if int4:  # the group's scale multiplies its partial product
                    rows = pl.ds(wg * WG_ROWS, WG_ROWS)
                    zero = layout(z_smem.at[slot, rows][...], plgpu.Layout.WGMMA.reduce(1))
                    prod = product(int4_operand(w_smem.at[slot, wg], zero), x_smem.at[slot])
                    scale = layout(s_smem.at[slot, rows][...], plgpu.Layout.WGMMA.reduce(1))
                    prod = lax.broadcast_in_dim(scale, (WG_ROWS, tokens), [0]) * prod
                else:
                    prod = product(weight_operand(w_smem.at[slot, wg]), x_smem.at[slot])

                @pl.when(i + stages < steps)  # the memory warpgroup waits for this slot again
                def _():
                    plgpu.barrier_arrive(free.at[slot])

                return acc + prod

            zeros = layout(jnp.zeros((WG_ROWS, tokens), jnp.float32), plgpu.Layout.WGMMA)
            acc = lax.fori_loop(0, steps, step_fn, zeros)
            with jax.named_scope("epilogue"):
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
                ks = pl.ds(step * bk, bk)
                for h in range(wgs):
                    src = w_ref.at[pl.ds(n0 + h * WG_ROWS, WG_ROWS), ks]
                    plgpu.copy_gmem_to_smem(src, w_smem.at[slot, h], ready.at[slot])
                plgpu.copy_gmem_to_smem(x_ref.at[:, ks], x_smem.at[slot], ready.at[slot])
                if int4:
                    plgpu.copy_gmem_to_smem(s_ref.at[step, pl.ds(n0, p.block_n)], s_smem.at[slot], ready.at[slot])
                    plgpu.copy_gmem_to_smem(z_ref.at[step, pl.ds(n0, p.block_n)], z_smem.at[slot], ready.at[slot])
                return carry

            lax.fori_loop(0, steps, issue, None)

    def entry(*refs):
        smem = [swizzled((stages, wgs, WG_ROWS, bk), CODE_DTYPES[p.kind]),
                swizzled((stages, tokens, bk), p.operand_dtype)]
        if int4:
            smem += [plgpu.SMEM((stages, p.block_n), jnp.float32),
                     plgpu.SMEM((stages, p.block_n), jnp.uint8)]
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
        compiler_params=None if interpret else compat.lane_compiler_params(),
        interpret=compat.gpu_interpret_params() if interpret else False,
    )
