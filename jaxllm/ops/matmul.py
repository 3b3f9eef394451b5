"""Matrix products against weights; the place where quantized weights will plug in."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array


def einsum(subscripts: str, x: Array, w) -> Array:
    """`x` contracted with the weight `w` (an array or a QuantizedWeight), in the activation's dtype."""
    from jaxllm.quantization import QuantizedWeight, einsum as quantized_einsum

    if isinstance(w, QuantizedWeight):
        return quantized_einsum(subscripts, x, w)
    return jnp.einsum(subscripts, x, w.astype(x.dtype))
