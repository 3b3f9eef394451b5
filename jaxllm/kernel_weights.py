"""Quantized weights re-laid for the K-major Mosaic GPU kernels (pallas_kernels/quant_matmul_kmajor.py).

The kernels read each output feature's codes along K, so the codes are stored transposed, [N, K],
once at load. `to_kernel_layout` swaps each int8 (QuantizedWeight) and int4 (Int4Weight) leaf of a
model's params for its K-major twin where the kernels take the weight's shape; the twins still
multiply through XLA for the shapes the kernels do not take (prefill, several devices).
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


KMAJOR_TYPES = (KMajorInt8Weight, KMajorInt4Weight)


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


def kernel_layout(w):
    """The K-major twin of an int8 / int4 weight the kernels can take, else the weight unchanged."""
    from jaxllm.quantization import Int4Weight, QuantizedWeight
    from pallas_kernels.quant_matmul_kmajor import INT4_GROUP, int4_kmajor, int8_kmajor

    k = _int8_k(w) if isinstance(w, QuantizedWeight) else None
    if k is not None and _kernels_take("int8", k, n := w.q.size // k):
        return KMajorInt8Weight(int8_kmajor(w.q.reshape(k, n)), w.scale.reshape(n).astype(jnp.float32),
                                tuple(w.q.shape))
    if (isinstance(w, Int4Weight) and w.group_size == INT4_GROUP
            and _kernels_take("int4", 2 * w.packed.shape[0], w.packed.shape[1])):
        return KMajorInt4Weight(int4_kmajor(w.packed), w.scale, w.zero, w.input_scale, tuple(w.shape))
    return w


def to_kernel_layout(params: dict) -> dict:
    """The params with every int8 / int4 weight the kernels take in their layout."""
    from jaxllm.quantization import Int4Weight, QuantizedWeight

    leaf = lambda x: isinstance(x, (QuantizedWeight, Int4Weight))
    return jax.tree.map(kernel_layout, params, is_leaf=leaf)


def dequantize(w, dtype=jnp.float32) -> Array:
    """The dense weight a K-major weight stands for."""
    from pallas_kernels.quant_matmul_kmajor import dequantize_int4_kmajor

    if isinstance(w, KMajorInt8Weight):
        return (w.q_t.T.astype(jnp.float32) * w.scale[None, :]).reshape(w.shape).astype(dtype)
    return dequantize_int4_kmajor(w.q_t, w.scale, w.zero, w.input_scale).reshape(w.shape).astype(dtype)


def xla_einsum(subscripts: str, x: Array, w) -> Array:
    """The product through XLA: int8 codes multiplied transposed (no copy), int4 dequantized first."""
    from jaxllm.ops.matmul import as_matrix_product

    if isinstance(w, KMajorInt8Weight):
        dims = as_matrix_product(subscripts, tuple(x.shape), w.shape)
        if dims is not None:
            m, k, n, out_shape = dims
            y = jnp.dot(x.reshape(m, k), w.q_t.T.astype(x.dtype), preferred_element_type=jnp.float32)
            return (y * w.scale[None, :]).astype(x.dtype).reshape(out_shape)
    return jnp.einsum(subscripts, x, dequantize(w, x.dtype))


def matmul_kernel(x2: Float[Array, "M K"], w, *, interpret: bool) -> Float[Array, "M N"]:
    """x2 @ W through the K-major kernel of w's kind."""
    from pallas_kernels.quant_matmul_kmajor import w4a16_kmajor, w8a16_kmajor

    if isinstance(w, KMajorInt8Weight):
        return w8a16_kmajor(x2, w.q_t, w.scale, interpret=interpret)
    return w4a16_kmajor(x2, w.q_t, w.scale, w.zero, w.input_scale, interpret=interpret)
