"""The residual add and the next RMSNorm's factors, in one kernel for a decode step's few rows.

For rows x and delta and a norm weight g: h = x + delta (in x's dtype, as transformers adds the
residual), g * h (in x's dtype) and 1 / rms(h) = rsqrt(mean(h^2) + eps) in float32, so that
RMSNorm(h) @ W = ((g * h) @ W) / rms(h) (how `models.llama` applies the norm after the product).
XLA runs the add and the statistics as two kernels (the add's result has a second reader, the next
residual add, so it is not fused into the reduction); at batch-1 decode each is ~1.5 us, 64 pairs a
step for Llama-3-8B. Here one block per row copies the row's three vectors into shared memory (TMA,
as [D/256, 256] tiles), computes in registers and copies h and g * h back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from pallas_kernels import compat

LANES = 256  # a row travels as [D / LANES, LANES] (a TMA box holds at most 256 elements a dimension)
MAX_ROWS = 64
STAT_WIDTH = 128  # 1 / rms(h) is stored as a row of this many equal values (TMA moves whole rows)


def add_rms_norm_reference(
    x: Float[Array, "R D"],
    delta: Float[Array, "R D"],
    weight: Float[Array, "D"],
    *,
    eps: float,
    interpret: bool = False,
) -> tuple[Float[Array, "R D"], Float[Array, "R D"], Float[Array, "R"]]:
    """(h, g * h, 1 / rms(h)) with h = x + delta, in jnp."""
    del interpret
    _check(x, delta, weight)
    h = x + delta.astype(x.dtype)
    h32 = h.astype(jnp.float32)
    inv_rms = lax.rsqrt(jnp.mean(h32 * h32, axis=-1) + eps)
    return h, weight.astype(x.dtype) * h, inv_rms


def add_rms_norm(
    x: Float[Array, "R D"],
    delta: Float[Array, "R D"],
    weight: Float[Array, "D"],
    *,
    eps: float,
    interpret: bool = False,
) -> tuple[Float[Array, "R D"], Float[Array, "R D"], Float[Array, "R"]]:
    """The Mosaic GPU kernel; same contract as `add_rms_norm_reference` (the sum of squares adds in
    another order, so 1 / rms(h) may differ from it in the last bits)."""
    _check(x, delta, weight)
    rows, d = x.shape
    if rows > MAX_ROWS:
        raise ValueError(f"{rows} rows: the kernel takes at most {MAX_ROWS} (decode steps); use the reference")
    if d % LANES or d // LANES > 256:
        raise ValueError(f"hidden size {d} must be a multiple of {LANES} and at most {256 * LANES}")
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"x of dtype {x.dtype}: the kernel takes bfloat16 or float16 rows")
    tile = (d // LANES, LANES)
    h, hg, inv = _build(rows, tile, jnp.dtype(x.dtype), float(eps), interpret)(
        x.reshape(rows, *tile), delta.astype(x.dtype).reshape(rows, *tile), weight.astype(x.dtype).reshape(tile))
    return h.reshape(rows, d), hg.reshape(rows, d), inv[:, 0]


def _check(x, delta, weight) -> None:
    if x.ndim != 2 or delta.shape != x.shape:
        raise ValueError(f"x {tuple(x.shape)} and delta {tuple(delta.shape)} must both be [rows, hidden]")
    if weight.shape != (x.shape[1],):
        raise ValueError(f"weight of shape {tuple(weight.shape)} must be ({x.shape[1]},)")


@functools.lru_cache(maxsize=None)
def _build(rows: int, tile: tuple[int, int], dtype, eps: float, interpret: bool):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    d = tile[0] * tile[1]

    def body(x_ref, delta_ref, w_ref, h_ref, hg_ref, inv_ref, x_smem, delta_smem, w_smem, h_smem, hg_smem,
             inv_smem, ready):
        r = lax.axis_index("r")
        plgpu.copy_gmem_to_smem(x_ref.at[r], x_smem, ready)
        plgpu.copy_gmem_to_smem(delta_ref.at[r], delta_smem, ready)
        plgpu.copy_gmem_to_smem(w_ref, w_smem, ready)
        plgpu.barrier_wait(ready)
        h = (x_smem[...].astype(jnp.float32) + delta_smem[...].astype(jnp.float32)).astype(dtype)
        h32 = h.astype(jnp.float32)
        inv = lax.rsqrt(jnp.sum(h32 * h32) * (1.0 / d) + eps)
        h_smem[...] = h
        hg_smem[...] = (w_smem[...].astype(jnp.float32) * h32).astype(dtype)
        inv_smem[...] = jnp.broadcast_to(inv, (STAT_WIDTH,))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(h_smem, h_ref.at[r])
        plgpu.copy_smem_to_gmem(hg_smem, hg_ref.at[r])
        plgpu.copy_smem_to_gmem(inv_smem, inv_ref.at[r])
        plgpu.wait_smem_to_gmem(0)

    def entry(x_ref, delta_ref, w_ref, h_ref, hg_ref, inv_ref):
        scoped = ([plgpu.SMEM(tile, dtype) for _ in range(5)] + [plgpu.SMEM((STAT_WIDTH,), jnp.float32)]
                  + [plgpu.Barrier(num_arrivals=3)])
        pl.run_scoped(lambda *s: body(x_ref, delta_ref, w_ref, h_ref, hg_ref, inv_ref, *s), *scoped)

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((rows, *tile), dtype), jax.ShapeDtypeStruct((rows, *tile), dtype),
                  jax.ShapeDtypeStruct((rows, STAT_WIDTH), jnp.float32)),
        grid=(rows,),
        grid_names=("r",),
        compiler_params=None if interpret else compat.lane_compiler_params(),
        interpret=compat.gpu_interpret_params() if interpret else False,
    )
