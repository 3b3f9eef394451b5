"""Matrix products against weights; the place where quantized weights will plug in."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array


def einsum(subscripts: str, x: Array, w: Array) -> Array:
    """`x` contracted with the weight `w`, in the activation's dtype."""
    return jnp.einsum(subscripts, x, w.astype(x.dtype))
