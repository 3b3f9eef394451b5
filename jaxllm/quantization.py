"""Weight-only quantization: quantized weights are small pytrees swapped in for the dense ones.

A `QuantizedWeight` holds int8 values and one scale per output channel (the weight's shape with its
input axes of size 1), so `x @ W = (x @ Q) * scale` exactly; `jaxllm.ops.einsum` does that product
for every model, with no per-model code. Which axes of a weight are inputs is model data
(`models.registry.ModelSpec.input_axes`).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8

METHODS = ("int8",)  # weight-only, symmetric, per output channel


class QuantizedWeight(NamedTuple):
    q: Int8[Array, "..."]
    scale: Float[Array, "..."]  # the weight's shape, input axes of size 1


def check_method(method: str | None) -> None:
    if method is not None and method not in METHODS:
        raise ValueError(f"quantization {method!r} not supported; choose one of {METHODS} or None")


def quantize_int8(w: Float[Array, "..."], input_axes: tuple[int, ...]) -> QuantizedWeight:
    """Symmetric int8 with one scale per output channel: max |w| over the input axes maps to 127."""

    @jax.jit
    def run(w):
        wf = w.astype(jnp.float32)
        scale = jnp.max(jnp.abs(wf), axis=input_axes, keepdims=True) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        q = jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8)
        return QuantizedWeight(q, scale)  # float32: a bf16 scale would bias whole channels

    return run(w)


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> Array:
    return (w.q.astype(jnp.float32) * w.scale.astype(jnp.float32)).astype(dtype)


def quantize_params(params: dict, input_axes: Mapping[str, tuple[int, ...]], method: str = "int8") -> dict:
    """The params with each weight named in `input_axes` quantized; layers may be a list of
    per-layer dicts or one stacked dict (whose arrays carry a leading layer axis)."""
    check_method(method)
    if method is None:
        return params

    def convert(tree: dict, offset: int) -> dict:
        return {name: (quantize_int8(w, tuple(a + offset for a in input_axes[name]))
                       if name in input_axes and not isinstance(w, QuantizedWeight) else w)
                for name, w in tree.items()}

    out = convert({k: v for k, v in params.items() if k != "layers"}, 0)
    layers = params["layers"]
    out["layers"] = [convert(layer, 0) for layer in layers] if isinstance(layers, list) else convert(layers, 1)
    return out


def einsum(subscripts: str, x: Array, w: QuantizedWeight) -> Array:
    """`x` contracted with a quantized weight: the int8 values in x's dtype, then the scales."""
    inputs, out = subscripts.split("->")
    _, w_sub = inputs.split(",")
    y = jnp.einsum(subscripts, x, w.q.astype(x.dtype)).astype(jnp.float32)
    kept = "".join(c for c in w_sub if c in out)
    squeeze = tuple(i for i, c in enumerate(w_sub) if c not in out)
    scale = jnp.squeeze(w.scale, axis=squeeze).astype(jnp.float32)
    out_sub = out.replace("...", "")
    lead = "..." if "..." in out else ""
    return jnp.einsum(f"{kept},{lead}{out_sub}->{lead}{out_sub}", scale, y).astype(x.dtype)
