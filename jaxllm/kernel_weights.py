"""Quantized weights re-laid for the K-major Mosaic GPU kernels (pallas_kernels/quant_matmul_kmajor.py,
pallas_kernels/fp4_matmul_kmajor.py, pallas_kernels/fp8_matmul.py) and for XLA's 8-bit gemms.

The kernels read each output feature's codes along K, so the codes are stored transposed, [N, K],
once at load. `to_kernel_layout` swaps each int8 (QuantizedWeight), int4 (Int4Weight) and fp4
(FP4Weight) leaf of a model's params for its K-major twin where the kernels take the weight's shape,
and every W8A8 leaf (fp8, SmoothQuant) whose input axes lead; the twins still multiply through XLA
for the shapes the kernels do not take or where XLA is faster (prefill).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8, UInt8


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_t", "scale"], meta_fields=["shape"])
@dataclasses.dataclass(frozen=True)
class KMajorInt8Weight:
    q_t: Int8[Array, "N K"]
    scale: Float[Array, "N"]
    shape: tuple[int, ...]  # the dense weight's shape: its leading input axes flatten to K, the rest to N


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_t", "scale", "zero", "input_scale"],
                   meta_fields=["shape"])
@dataclasses.dataclass(frozen=True)
class KMajorInt4Weight:
    q_t: Array  # int4 [N, K]: the stored code minus 8
    scale: Float[Array, "G N"]
    zero: UInt8[Array, "G N"]
    input_scale: Float[Array, "K"]
    shape: tuple[int, ...]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_t", "scale", "input_scale"],
                   meta_fields=["shape", "kind"])
@dataclasses.dataclass(frozen=True)
class KMajorW8A8Weight:
    q_t: Array  # int8 or float8_e4m3fn [N, K]
    scale: Float[Array, "N"]
    input_scale: Float[Array, "K"] | None  # SmoothQuant's s: x enters as x / s; None: all ones (fp8)
    shape: tuple[int, ...]
    kind: str  # "int8" or "fp8"


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_t", "block_scale", "channel_scale"],
                   meta_fields=["shape", "fmt"])
@dataclasses.dataclass(frozen=True)
class KMajorFP4Weight:
    """An FP4Weight for pallas_kernels/fp4_matmul_kmajor.py: W[k, n] = e2m1(q_t[n, k]) *
    block_scale[k // 16, n] * channel_scale[n] (see `fp4_twin`)."""

    q_t: Array  # int4 [N, K]: each e2m1 code's four bits
    block_scale: Array  # [K/16, N]: float8_e4m3fn (nvfp4) or float8_e5m2 (mxfp4)
    channel_scale: Float[Array, "N"]
    shape: tuple[int, ...]
    fmt: str  # "nvfp4" or "mxfp4"


KMAJOR_TYPES = (KMajorInt8Weight, KMajorInt4Weight, KMajorW8A8Weight, KMajorFP4Weight)
MX_MIN_RELATIVE_SCALE = 2.0**-16  # float8_e5m2's smallest power of two


def _int8_k(w) -> int | None:
    """K of an int8 weight whose input axes lead (their scale dims are 1), else None."""
    ones = next((i for i, d in enumerate(w.scale.shape) if d != 1), w.scale.ndim)
    return math.prod(w.q.shape[:ones]) if 0 < ones < w.q.ndim else None


def _kernels_take(kind: str, k: int, n: int) -> bool:
    from pallas_kernels.quant_matmul_kmajor import plan

    try:
        plan(kind, 1, k, n)
    except ValueError:  # a shape the kernels do not take
        return False
    return True


def fp4_twin(w) -> KMajorFP4Weight:
    """An FP4Weight's K-major twin, its block scales in 8 bits. NVFP4: the block scales are e4m3
    values (exact in float8_e4m3fn), the channel scale the per-tensor one. MXFP4 (power-of-two
    scales a block of 32): each scale serves both its 16-input halves, stored relative to the
    channel's largest (the channel scale) as float8_e5m2, exact down to 2^-16; a block scale below
    2^-16 of its channel's largest becomes 0 (its weights, at most 6 * 2^-17 of that scale, drop
    out). Everything else is exact: for ordinary weights `dequantize` of the twin equals
    `dequantize_fp4` of the weight."""
    from jaxllm.quantization import FP4_BLOCK
    from pallas_kernels.fp4_matmul_kmajor import BLOCK, fp4_kmajor

    n = w.packed.shape[1]
    scale = w.block_scale.astype(jnp.float32)
    glob = jnp.asarray(w.global_scale, jnp.float32)
    if w.fmt == "nvfp4":
        block, channel = scale.astype(jnp.float8_e4m3fn), jnp.broadcast_to(glob, (n,))
    else:
        top = jnp.max(scale, axis=0)
        rel = scale / top
        rel = jnp.where(rel >= MX_MIN_RELATIVE_SCALE, rel, 0.0).astype(jnp.float8_e5m2)
        block, channel = jnp.repeat(rel, FP4_BLOCK[w.fmt] // BLOCK, axis=0), top * glob
    return KMajorFP4Weight(fp4_kmajor(w.packed), block, channel, tuple(w.shape), w.fmt)


def _unless_ones(s: Float[Array, "K"]) -> Array | None:
    """None for an all-ones input scale (fp8, uncalibrated W8A8), known at load: no leaf to pass to
    every call and no division per token."""
    if isinstance(s, jax.core.Tracer) or not bool(jnp.all(s == 1.0)):
        return s
    return None


def _scaled_input(x2: Float[Array, "M K"], w: KMajorW8A8Weight) -> Float[Array, "M K"]:
    """x2 / input_scale in float32 (SmoothQuant's x / s)."""
    x = x2.astype(jnp.float32)
    return x if w.input_scale is None else x / w.input_scale[None, :]


def kernel_order(a: Array, axis: int, kind: str, inverse: bool = False) -> Array:
    """The inputs of `a` along `axis` in (or, with `inverse`, back from) the order the kernels store
    `kind` codes in."""
    from pallas_kernels.quant_matmul_kmajor import kernel_order

    return kernel_order(a, axis, kind, inverse)


def kernel_layout(w):
    """The K-major twin of an int8 / int4 / fp4 weight the kernels can take, or of any W8A8 weight
    whose input axes lead (XLA's 8-bit gemms also want both operands K-major); else the weight
    unchanged."""
    from jaxllm.quantization import FP4Weight, Int4Weight, QuantizedWeight, W8A8Weight
    from pallas_kernels.quant_matmul_kmajor import INT4_GROUP, int4_kmajor, int8_kmajor

    if isinstance(w, W8A8Weight) and (k := _int8_k(w)) is not None:
        n = w.q.size // k
        return KMajorW8A8Weight(kernel_order(w.q.reshape(k, n), 0, w.kind).T, w.scale.reshape(n).astype(jnp.float32),
                                _unless_ones(w.input_scale.reshape(k).astype(jnp.float32)), tuple(w.q.shape), w.kind)
    k = _int8_k(w) if isinstance(w, QuantizedWeight) else None
    if k is not None and _kernels_take("int8", k, n := w.q.size // k):
        return KMajorInt8Weight(int8_kmajor(w.q.reshape(k, n)), w.scale.reshape(n).astype(jnp.float32),
                                tuple(w.q.shape))
    if (isinstance(w, Int4Weight) and w.group_size == INT4_GROUP
            and _kernels_take("int4", 2 * w.packed.shape[0], w.packed.shape[1])):
        return KMajorInt4Weight(int4_kmajor(w.packed), w.scale, w.zero, w.input_scale, tuple(w.shape))
    if isinstance(w, FP4Weight) and _kernels_take("fp4", 2 * w.packed.shape[0], w.packed.shape[1]):
        return fp4_twin(w)
    return w


def to_kernel_layout(params: dict) -> dict:
    """The params with every int8 / int4 / fp4 weight the kernels take, and every W8A8 weight, K-major."""
    from jaxllm.quantization import FP4Weight, Int4Weight, QuantizedWeight, W8A8Weight

    leaf = lambda x: isinstance(x, (QuantizedWeight, Int4Weight, W8A8Weight, FP4Weight))
    return jax.tree.map(kernel_layout, params, is_leaf=leaf)


def dequantize(w, dtype=jnp.float32) -> Array:
    """The dense weight a K-major weight stands for."""
    from pallas_kernels.fp4_matmul_kmajor import dequantize_fp4_kmajor
    from pallas_kernels.quant_matmul_kmajor import dequantize_int4_kmajor

    if isinstance(w, KMajorFP4Weight):
        return dequantize_fp4_kmajor(w.q_t, w.block_scale, w.channel_scale).reshape(w.shape).astype(dtype)
    if isinstance(w, KMajorInt8Weight):
        dense = kernel_order(w.q_t, 1, "int8", inverse=True).T.astype(jnp.float32) * w.scale[None, :]
        return dense.reshape(w.shape).astype(dtype)
    if isinstance(w, KMajorW8A8Weight):
        dense = kernel_order(w.q_t, 1, w.kind, inverse=True).T.astype(jnp.float32) * w.scale[None, :]
        if w.input_scale is not None:
            dense = dense / w.input_scale[:, None]
        return dense.reshape(w.shape).astype(dtype)
    return dequantize_int4_kmajor(w.q_t, w.scale, w.zero, w.input_scale).reshape(w.shape).astype(dtype)


def xla_einsum(subscripts: str, x: Array, w) -> Array:
    """The product through XLA: int8 codes multiplied transposed (no copy), W8A8 as an 8-bit gemm
    of per-token activation codes, int4 and fp4 dequantized first."""
    from jaxllm.ops.matmul import as_matrix_product

    dims = as_matrix_product(subscripts, tuple(x.shape), w.shape)
    if dims is not None and isinstance(w, KMajorInt8Weight):
        m, k, n, out_shape = dims
        x2 = kernel_order(x.reshape(m, k), 1, "int8")  # in the codes' input order
        y = jnp.dot(x2, w.q_t.T.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * w.scale[None, :]).astype(x.dtype).reshape(out_shape)
    if dims is not None and isinstance(w, KMajorW8A8Weight):
        m, k, n, out_shape = dims
        return w8a8_matmul(x.reshape(m, k), w).reshape(out_shape)
    if dims is not None and isinstance(w, KMajorInt4Weight):
        from pallas_kernels.quant_matmul_kmajor import dequantize_int4_stored

        m, k, n, out_shape = dims
        dense = dequantize_int4_stored(w.q_t, w.scale, w.zero, w.input_scale).astype(x.dtype)
        return jnp.dot(kernel_order(x.reshape(m, k), 1, "int4"), dense).reshape(out_shape)  # x in the codes' order
    return jnp.einsum(subscripts, x, dequantize(w, x.dtype))


def _token_codes(x2: Float[Array, "M K"], w: KMajorW8A8Weight):
    """Per-token codes and scales of x2 / input_scale (SmoothQuant's s; ones for fp8), the codes'
    inputs in the weight codes' order."""
    from jaxllm.quantization import quantize_tokens

    codes, sx = quantize_tokens(_scaled_input(x2, w), w.kind)
    return kernel_order(codes, 1, w.kind), sx


def w8a8_matmul(x2: Float[Array, "M K"], w: KMajorW8A8Weight) -> Float[Array, "M N"]:
    """x2 @ W with x2 quantized per token, through XLA's 8-bit gemm (cuBLASLt on the GPU, both
    operands K-major)."""
    codes, sx = _token_codes(x2, w)
    if w.kind == "int8":
        acc = jnp.int32
    else:  # a 16-bit product rounds no worse than the activations themselves, and halves its bytes
        acc = x2.dtype if x2.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    y = jnp.dot(codes, w.q_t.T, preferred_element_type=acc)
    return (y.astype(jnp.float32) * sx[:, None] * w.scale[None, :]).astype(x2.dtype)


def matmul_kernel(x2: Float[Array, "M K"], w, *, interpret: bool) -> Float[Array, "M N"]:
    """x2 @ W through the Pallas kernel of w's kind: the weight-only K-major kernels up to
    `quant_matmul_kmajor.MAX_TOKENS` tokens (W8A8 weights too: the activations stay unquantized),
    the fp8 x fp8 kernel above."""
    from pallas_kernels.fp4_matmul_kmajor import w4a16_fp4_kmajor
    from pallas_kernels.fp8_matmul import fp8_matmul
    from pallas_kernels.quant_matmul_kmajor import MAX_TOKENS, w4a16_kmajor, w8a16_kmajor

    if isinstance(w, KMajorFP4Weight):
        return w4a16_fp4_kmajor(x2, w.q_t, w.block_scale, w.channel_scale, interpret=interpret)
    if isinstance(w, KMajorInt8Weight):
        return w8a16_kmajor(x2, w.q_t, w.scale, interpret=interpret)
    if isinstance(w, KMajorW8A8Weight):
        if x2.shape[0] > MAX_TOKENS:
            codes, sx = _token_codes(x2, w)
            return fp8_matmul(codes, w.q_t, sx, w.scale, out_dtype=x2.dtype, interpret=interpret)
        x_in = _scaled_input(x2, w).astype(x2.dtype)
        return w8a16_kmajor(x_in, w.q_t, w.scale, interpret=interpret)
    return w4a16_kmajor(x2, w.q_t, w.scale, w.zero, w.input_scale, interpret=interpret)
