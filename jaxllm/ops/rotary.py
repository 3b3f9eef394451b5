"""Rotary position embedding (RoPE), halves layout, as transformers computes it."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rotary_cos_sin(positions: Int[Array, "B T"], inv_freq: Float[Array, "D/2"], dtype) -> Float[Array, "B T 2 D/2"]:
    """cos and sin of each position's angles (position x inverse frequency), in `dtype`; both halves
    of a head share them."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-2).astype(dtype)


def rotate(x: Float[Array, "B T ... D"], cos_sin: Float[Array, "B T 2 D/2"]) -> Float[Array, "B T ... D"]:
    """x * cos + rotate_half(x) * sin, each product and sum in x's dtype."""
    half = x.shape[-1] // 2
    cos_sin = cos_sin.astype(x.dtype).reshape(cos_sin.shape[:3] + (1,) * (x.ndim - 3) + (half,))
    cos, sin = cos_sin[:, :, 0], cos_sin[:, :, 1]
    lo, hi = x[..., :half], x[..., half:]
    return jnp.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)
