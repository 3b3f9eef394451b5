"""Weight-only quantization: quantized weights are small pytrees swapped in for the dense ones.

- `QuantizedWeight` (int8): int8 values and one float32 scale per output channel (the weight's
  shape with its input axes of size 1), so `x @ W = (x @ Q) * scale`.
- `W8A8Weight` (fp8, smoothquant): int8 or fp8 (e4m3) weights with a scale per output channel,
  and activations quantized per token at run time (dynamic scales), so the product itself runs in
  8 bits; SmoothQuant's per-input-channel `input_scale` moves activation outliers into the weights.
- `FP4Weight` (mxfp4, nvfp4): 4-bit floats (e2m1) in blocks along the input dimension, MXFP4's
  32-element blocks with a power-of-two scale or NVFP4's 16-element blocks with an e4m3 scale and a
  per-tensor float32 scale. Storage only: Hopper has no fp4 tensor cores, so the weights are
  dequantized before the product: in registers by `pallas_kernels/fp4_matmul_kmajor.py` for decode
  shapes on one GPU (e2m1 -> e4m3 by table lookup, e4m3 -> float16 in hardware, float16 tensor-core
  products), through XLA elsewhere.
- `Int4Weight` (int4, AWQ, GPTQ): 4-bit values packed two to a byte along the input dimension, with an
  asymmetric scale and zero point per group of `group_size` inputs and output channel (AutoAWQ's
  scheme), and a per-input-channel `input_scale` (AWQ's activation-aware scale; ones for plain
  round-to-nearest): W ~ diag(1/input_scale) ((Q - zero) * scale).

`jaxllm.ops.einsum` multiplies by either, for every model, with no per-model code. Which axes of a
weight are inputs is model data (`INPUT_AXES` in the model module); they lead the weight's shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int8, UInt8

METHODS = ("int8", "int4", "awq", "gptq", "fp8", "smoothquant", "mxfp4", "nvfp4")
CALIBRATED = ("awq", "gptq", "smoothquant")  # need calibration data (`jaxllm quantize --calib`)
QMAX = {"int8": 127.0, "fp8": 448.0}  # largest code: int8, float8 e4m3
GROUP_SIZE = 128


class QuantizedWeight(NamedTuple):
    q: Int8[Array, "..."]
    scale: Float[Array, "..."]  # the weight's shape, input axes of size 1


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "scale", "zero", "input_scale"],
                   meta_fields=["shape", "group_size"])
@dataclasses.dataclass(frozen=True)
class Int4Weight:
    packed: UInt8[Array, "K/2 N"]  # input k = 2i in the low nibble, 2i + 1 in the high one
    scale: Float[Array, "K/g N"]
    zero: UInt8[Array, "K/g N"]
    input_scale: Float[Array, "K"]
    shape: tuple[int, ...]  # the dense weight's shape: its input axes flatten to K, the rest to N
    group_size: int


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "scale", "input_scale"],
                   meta_fields=["kind"])
@dataclasses.dataclass(frozen=True)
class W8A8Weight:
    q: Array  # int8 or float8_e4m3fn, the weight's shape
    scale: Float[Array, "..."]  # the weight's shape, input axes of size 1
    input_scale: Float[Array, "K"]  # SmoothQuant's s: W is stored as diag(s) W, x enters as x / s
    kind: str  # "int8" or "fp8"


def check_method(method: str | None, *, calibrated_ok: bool = False) -> None:
    if method is None:
        return
    if method not in METHODS:
        raise ValueError(f"quantization {method!r} not supported; choose one of {METHODS} or None")
    if method in CALIBRATED and not calibrated_ok:
        raise ValueError(f"quantization {method!r} needs calibration data: write a quantized checkpoint "
                         f"with `jaxllm quantize --method {method} --calib FILES --out DIR` and load DIR")


# -- int8 ------------------------------------------------------------------------------------


def quantize_int8(w: Float[Array, "..."], input_axes: tuple[int, ...]) -> QuantizedWeight:
    """Symmetric int8 with one scale per output channel: max |w| over the input axes maps to 127."""
    return _int8(w, tuple(input_axes))


@functools.partial(jax.jit, static_argnames=("input_axes",))  # one compile per weight shape, not per call
def _int8(w, input_axes):
    wf = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(wf), axis=input_axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8)
    return QuantizedWeight(q, scale)  # float32: a bf16 scale would bias whole channels


# -- 8-bit weights and activations ------------------------------------------------------------


def to_codes(x, kind: str):
    """8-bit codes of values already divided by their scale: int8 (rounded) or float8 e4m3."""
    if kind == "int8":
        return jnp.clip(jnp.round(x), -127, 127).astype(jnp.int8)
    return jnp.clip(x, -448.0, 448.0).astype(jnp.float8_e4m3fn)


def quantize_tokens(x: Float[Array, "M K"], kind: str) -> tuple[Array, Float[Array, "M"]]:
    """Dynamic per-token 8-bit codes of activations and their scales: max |x| of a row maps to the
    largest code."""
    if kind not in QMAX:
        raise ValueError(f"activation codes {kind!r} not supported; choose one of {tuple(QMAX)}")
    xf = x.astype(jnp.float32)
    sx = jnp.max(jnp.abs(xf), axis=-1) / QMAX[kind]
    sx = jnp.where(sx > 0, sx, 1.0)
    return to_codes(xf / sx[..., None], kind), sx


def quantize_w8a8(w: Float[Array, "..."], input_axes: tuple[int, ...], kind: str = "fp8",
                  input_scale: Float[Array, "K"] | None = None) -> W8A8Weight:
    """Per-output-channel 8-bit weights of diag(input_scale) W (input axes lead the shape)."""
    if kind not in QMAX:
        raise ValueError(f"W8A8 kind {kind!r} not supported; choose one of {tuple(QMAX)}")
    k, _ = _as_matrix_shape(w.shape, input_axes)
    s = jnp.ones((k,), jnp.float32) if input_scale is None else jnp.asarray(input_scale, jnp.float32)
    wf = w.astype(jnp.float32) * s.reshape(w.shape[:len(input_axes)] + (1,) * (w.ndim - len(input_axes)))
    scale = jnp.max(jnp.abs(wf), axis=input_axes, keepdims=True) / QMAX[kind]
    scale = jnp.where(scale > 0, scale, 1.0)
    return W8A8Weight(to_codes(wf / scale, kind), scale, s, kind)


def _explicit(subscripts: str, x_ndim: int) -> str:
    """The subscripts with a leading "..." spelled out in letters they do not use."""
    if "..." not in subscripts:
        return subscripts
    inputs, out = subscripts.split("->")
    x_sub, w_sub = inputs.split(",")
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in subscripts]
    lead = "".join(free[: x_ndim - (len(x_sub) - 3)])
    return f"{x_sub.replace('...', lead)},{w_sub}->{out.replace('...', lead)}"


def _w8a8_einsum(subscripts: str, x: Array, w: W8A8Weight) -> Array:
    x_sub, w_sub, out = _split(_explicit(subscripts, x.ndim))
    contracted = "".join(c for c in w_sub if c not in out)
    xf = x.astype(jnp.float32)
    xf = jnp.einsum(f"{contracted},{x_sub}->{x_sub}", 1.0 / w.input_scale.reshape(w.q.shape[:len(contracted)]), xf)
    axes = tuple(x_sub.index(c) for c in contracted)
    sx = jnp.max(jnp.abs(xf), axis=axes, keepdims=True) / QMAX[w.kind]  # per token
    sx = jnp.where(sx > 0, sx, 1.0)
    acc = jnp.int32 if w.kind == "int8" else jnp.float32
    y = jnp.einsum(f"{x_sub},{w_sub}->{out}", to_codes(xf / sx, w.kind), w.q, preferred_element_type=acc)
    x_kept = "".join(c for c in x_sub if c not in contracted)
    w_kept = "".join(c for c in w_sub if c not in contracted)
    sx = jnp.squeeze(sx, axis=axes)
    sw = jnp.squeeze(w.scale, axis=tuple(range(len(contracted))))
    y = jnp.einsum(f"{x_kept},{w_kept},{out}->{out}", sx, sw, y.astype(jnp.float32))
    return y.astype(x.dtype)


def _split(subscripts: str) -> tuple[str, str, str]:
    inputs, out = subscripts.split("->")
    x_sub, w_sub = inputs.split(",")
    return x_sub, w_sub, out


# -- fp4 storage ---------------------------------------------------------------------------------

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)  # e2m1 codes 0..15
FP4_BLOCK = {"mxfp4": 32, "nvfp4": 16}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "block_scale", "global_scale"],
                   meta_fields=["shape", "fmt"])
@dataclasses.dataclass(frozen=True)
class FP4Weight:
    packed: UInt8[Array, "K/2 N"]  # e2m1 codes, input k = 2i in the low nibble
    block_scale: Float[Array, "K/B N"]  # a power of two (mxfp4) or an e4m3 value (nvfp4), as float32
    global_scale: Float[Array, ""]  # nvfp4's per-tensor scale; 1 for mxfp4
    shape: tuple[int, ...]
    fmt: str  # "mxfp4" or "nvfp4"


def _e2m1_codes(x):
    """Nearest e2m1 code of each value (already divided by its block scale, so |x| <= 6)."""
    table = jnp.asarray(FP4_VALUES[:8])
    mag = jnp.argmin(jnp.abs(jnp.abs(x)[..., None] - table), axis=-1)
    return (mag + 8 * (x < 0)).astype(jnp.uint8)


def quantize_fp4(w: Float[Array, "..."], input_axes: tuple[int, ...], fmt: str = "nvfp4") -> FP4Weight:
    """Blocks of FP4_BLOCK[fmt] inputs per output channel, scaled so the block's largest magnitude
    lands at or below e2m1's 6 (MX: the shared exponent of the OCP spec; NV: amax/6 in e4m3)."""
    k, n = _as_matrix_shape(w.shape, input_axes)
    block = FP4_BLOCK[fmt]
    if k % block:
        raise ValueError(f"{fmt} needs the input dimension {k} of a weight of shape {tuple(w.shape)} to be a "
                         f"multiple of its block of {block}")
    w2 = w.astype(jnp.float32).reshape(k // block, block, n)
    amax = jnp.max(jnp.abs(w2), axis=1)
    if fmt == "mxfp4":
        glob = jnp.float32(1.0)
        scale = jnp.exp2(jnp.floor(jnp.log2(jnp.maximum(amax, 2.0**-126))) - 2)
    else:
        glob = jnp.maximum(jnp.max(amax), 1e-30) / (6.0 * 448.0)
        scale = (amax / 6.0 / glob).astype(jnp.float8_e4m3fn).astype(jnp.float32) * glob
        scale = jnp.where(scale > 0, scale, glob)
    codes = _e2m1_codes(jnp.clip(w2 / scale[:, None], -6.0, 6.0)).reshape(k, n)
    return FP4Weight(pack_nibbles(codes), scale / glob, jnp.asarray(glob, jnp.float32), tuple(w.shape), fmt)


def dequantize_fp4(w: FP4Weight, dtype=jnp.float32) -> Array:
    values = jnp.asarray(FP4_VALUES)[unpack_nibbles(w.packed)]
    block = FP4_BLOCK[w.fmt]
    w2 = values * jnp.repeat(w.block_scale, block, axis=0) * w.global_scale
    return w2.reshape(w.shape).astype(dtype)


# -- int4 ------------------------------------------------------------------------------------


def _as_matrix_shape(shape: tuple[int, ...], input_axes: tuple[int, ...]) -> tuple[int, int]:
    if tuple(input_axes) != tuple(range(len(input_axes))):
        raise ValueError(f"input axes {input_axes} must lead the weight's shape {shape} for int4")
    k = math.prod(shape[: len(input_axes)])
    return k, math.prod(shape) // k


@functools.partial(jax.jit, static_argnames=("group_size",))
def int4_groups(w2: Float[Array, "K N"], group_size: int):
    """Asymmetric 4-bit codes, scales and zero points per (group of inputs, output channel)."""
    k, n = w2.shape
    g = w2.reshape(k // group_size, group_size, n)
    lo, hi = g.min(axis=1), g.max(axis=1)
    scale = jnp.maximum(hi - lo, 1e-5) / 15.0
    zero = jnp.clip(jnp.round(-lo / scale), 0, 15)
    q = jnp.clip(jnp.round(g / scale[:, None]) + zero[:, None], 0, 15).reshape(k, n).astype(jnp.uint8)
    return q, scale, zero.astype(jnp.uint8)


def pack_nibbles(q: UInt8[Array, "K N"]) -> UInt8[Array, "K/2 N"]:
    """Two 4-bit codes a byte along K: row 2i in the low nibble, 2i + 1 in the high one."""
    return q[0::2] | (q[1::2] << 4)


def unpack_nibbles(packed: UInt8[Array, "K/2 N"]) -> UInt8[Array, "K N"]:
    """The inverse of `pack_nibbles`."""
    k2, n = packed.shape
    return jnp.stack([packed & 15, packed >> 4], axis=1).reshape(2 * k2, n)


def quantize_int4(w: Float[Array, "..."], input_axes: tuple[int, ...], group_size: int = GROUP_SIZE,
                  input_scale: Float[Array, "K"] | None = None) -> Int4Weight:
    """Round-to-nearest int4 in groups of `group_size` inputs; with `input_scale` s (AWQ), the
    quantized matrix is diag(s) W, and the product divides the inputs' share back out."""
    k, n = _as_matrix_shape(w.shape, input_axes)
    if k % group_size or group_size % 2:
        raise ValueError(f"group size {group_size} must be even and divide the input dimension {k} "
                         f"of a weight of shape {tuple(w.shape)}")
    s = jnp.ones((k,), jnp.float32) if input_scale is None else jnp.asarray(input_scale, jnp.float32)
    w2 = w.astype(jnp.float32).reshape(k, n) * s[:, None]
    q, scale, zero = int4_groups(w2, group_size)
    return Int4Weight(pack_nibbles(q), scale, zero, s, tuple(w.shape), group_size)


def dequantize_int4(w: Int4Weight, dtype=jnp.float32) -> Array:
    from pallas_kernels.quant_matmul_kmajor import dequantize_int4 as dequantize_arrays  # the kernels' reference

    return dequantize_arrays(w.packed, w.scale, w.zero, w.input_scale).reshape(w.shape).astype(dtype)


def dequantize(w, dtype=jnp.float32) -> Array:
    """The dense weight a quantized one stands for."""
    from jaxllm import kernel_weights

    if isinstance(w, kernel_weights.KMAJOR_TYPES):
        return kernel_weights.dequantize(w, dtype)
    if isinstance(w, Int4Weight):
        return dequantize_int4(w, dtype)
    if isinstance(w, FP4Weight):
        return dequantize_fp4(w, dtype)
    if isinstance(w, W8A8Weight):
        k_axes = next(i for i in range(w.q.ndim + 1) if math.prod(w.q.shape[:i]) == w.input_scale.size)
        s = w.input_scale.reshape(w.q.shape[:k_axes] + (1,) * (w.q.ndim - k_axes))
        return (w.q.astype(jnp.float32) * w.scale / s).astype(dtype)
    return (w.q.astype(jnp.float32) * w.scale.astype(jnp.float32)).astype(dtype)


# -- applying it to a model's params -----------------------------------------------------------


def quantize_params(params: dict, input_axes: Mapping[str, tuple[int, ...]], method: str = "int8", *,
                    group_size: int = GROUP_SIZE, input_scales: Mapping | None = None) -> dict:
    """The params with each weight named in `input_axes` quantized. Layers may be a list of
    per-layer dicts or one stacked dict (arrays with a leading layer axis; int8 only). For "awq",
    `input_scales[(layer, name)]` (layer None for top-level weights) are the calibrated scales."""
    check_method(method, calibrated_ok=input_scales is not None)
    if method is None:
        return params

    def one(w, axes, key):
        scale = None if input_scales is None else input_scales.get(key)
        if method == "int8":
            return quantize_int8(w, axes)
        if method in ("fp8", "smoothquant"):
            return quantize_w8a8(w, axes, "fp8" if method == "fp8" else "int8", scale)
        if method in FP4_BLOCK:
            return quantize_fp4(w, axes, method)
        return quantize_int4(w, axes, group_size, scale)

    def convert(tree: dict, offset: int, layer) -> dict:
        return {name: (one(w, tuple(a + offset for a in input_axes[name]), (layer, name))
                       if name in input_axes and isinstance(w, (jax.Array, np.ndarray)) else w)
                for name, w in tree.items()}

    out = convert({k: v for k, v in params.items() if k != "layers"}, 0, None)
    layers = params["layers"]
    if isinstance(layers, list):
        out["layers"] = [convert(layer, 0, i) for i, layer in enumerate(layers)]
    elif method == "int8":
        out["layers"] = convert(layers, 1, None)
    else:
        raise ValueError(f"{method} quantizes unrolled layers only (LLM(..., layers='unrolled'))")
    return out


def einsum(subscripts: str, x: Array, w) -> Array:
    """`x` contracted with a quantized weight, in x's dtype."""
    from jaxllm import kernel_weights

    if isinstance(w, kernel_weights.KMAJOR_TYPES):
        return kernel_weights.xla_einsum(subscripts, x, w)
    if isinstance(w, Int4Weight):
        return jnp.einsum(subscripts, x, dequantize_int4(w, x.dtype))
    if isinstance(w, W8A8Weight):
        return _w8a8_einsum(subscripts, x, w)
    if isinstance(w, FP4Weight):
        return jnp.einsum(subscripts, x, dequantize_fp4(w, x.dtype))
    inputs, out = subscripts.split("->")
    _, w_sub = inputs.split(",")
    y = jnp.einsum(subscripts, x, w.q.astype(x.dtype)).astype(jnp.float32)
    kept = "".join(c for c in w_sub if c in out)
    squeeze = tuple(i for i, c in enumerate(w_sub) if c not in out)
    scale = jnp.squeeze(w.scale, axis=squeeze).astype(jnp.float32)
    out_sub = out.replace("...", "")
    lead = "..." if "..." in out else ""
    return jnp.einsum(f"{kept},{lead}{out_sub}->{lead}{out_sub}", scale, y).astype(x.dtype)


def is_quantized(w) -> bool:
    from jaxllm.kernel_weights import KMAJOR_TYPES

    return isinstance(w, (QuantizedWeight, Int4Weight, W8A8Weight, FP4Weight, *KMAJOR_TYPES))
