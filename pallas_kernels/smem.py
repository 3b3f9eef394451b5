"""Shared-memory tiles in the layout TMA writes and wgmma reads, for the matmul kernels."""

from __future__ import annotations

import jax.numpy as jnp


def bits(dtype) -> int:
    """Bits per element, 4 for the 4-bit integer types."""
    return 4 if jnp.dtype(dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else 8 * jnp.dtype(dtype).itemsize


def swizzled(shape, dtype, swizzle: int | None = None):
    """A shared-memory tile in 8-row tiles whose rows (up to 128 bytes of the last axis, or
    `swizzle` bytes) are swizzled."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b = bits(dtype)
    swizzle = swizzle or min(128, shape[-1] * b // 8)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle * 8 // b)),
                                                plgpu.SwizzleTransform(swizzle)))
