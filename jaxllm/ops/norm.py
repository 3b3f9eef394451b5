"""The residual add and the next RMSNorm's factors: the Pallas kernel for a decode step's few rows
on a GPU, the jnp reference (which XLA fuses into two kernels) everywhere else."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

# Measured on an H200 (benchmarks/NOTES.md): at batch-1 decode one kernel instead of XLA's two.
ADD_NORM_KERNEL_MAX_ROWS = 8


def add_rms_norm(
    x: Float[Array, "... D"],
    delta: Float[Array, "... D"],
    weight: Float[Array, "D"],
    eps: float,
    backend: str = "auto",
) -> tuple[Float[Array, "... D"], Float[Array, "... D"], Float[Array, "..."]]:
    """(h, g * h, 1 / rms(h)) for h = x + delta and the norm weight g, so that RMSNorm(h) @ W =
    ((g * h) @ W) * (1 / rms(h)). `backend` "xla" never takes the kernel; "auto" and "pallas" take
    it on a GPU where it applies."""
    from pallas_kernels import add_rms_norm as kernel

    rows = x.reshape(-1, x.shape[-1])
    fn = kernel.add_rms_norm if kernel_applies(rows.shape, x.dtype, backend) else kernel.add_rms_norm_reference
    h, gh, inv_rms = fn(rows, delta.reshape(rows.shape), weight, eps=eps)
    return h.reshape(x.shape), gh.reshape(x.shape), inv_rms.reshape(x.shape[:-1])


def kernel_applies(shape: tuple[int, int], dtype, backend: str) -> bool:
    """Whether `add_rms_norm` runs the kernel for [rows, D] rows of `dtype`."""
    from pallas_kernels.add_rms_norm import LANES

    rows, d = shape
    return (backend != "xla" and jax.default_backend() == "gpu" and rows <= ADD_NORM_KERNEL_MAX_ROWS
            and jnp.dtype(dtype) == jnp.bfloat16 and d % LANES == 0 and d // LANES <= 256)
