"""fp8 x fp8 matmul with scales (W8A8) for prefill shapes: a Mosaic GPU kernel for Hopper.

`(x_q @ w_t.T) * x_scale[:, None] * w_scale[None, :]` for float8 e4m3 codes: activations [M, K] with
one scale per token, weights given transposed, [N, K] (wgmma takes 8-bit operands K-major only),
with one scale per output channel. Tensor cores multiply the codes with float32 accumulation; the
scales multiply the bf16 product afterwards, in XLA, where they fuse into the product's consumer.

A block owns a [2 * block_m, block_n] output tile at a time, one compute warpgroup per block_m rows;
a memory warpgroup streams the K tiles of both operands into shared memory by TMA, `num_stages`
deep. Blocks are persistent (one per SM by default) and walk the output tiles with M fastest, so the
blocks running at once share the weights' column tiles in L2; the memory warpgroup loads the next
tile's operands while the compute warpgroups write the last tile out.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from pallas_kernels import compat
from pallas_kernels.smem import swizzled

FP8 = jnp.dtype(jnp.float8_e4m3fn)
COMPUTE_WGS = 2
SMEM_LIMIT = 227 * 1024  # per block on the H100 / H200


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """Tile sizes: each of the two compute warpgroups owns block_m x block_n outputs."""

    block_m: int = 64  # 64 or 128
    block_n: int = 256  # 64 to 256, a multiple of 64
    block_k: int = 128  # a multiple of 128 (wgmma reads 8-bit rows of 128-byte swizzles)
    num_stages: int = 3
    num_blocks: int | None = None  # persistent blocks; None: one per SM

    def __post_init__(self):
        if self.block_m not in (64, 128):
            raise ValueError(f"block_m={self.block_m} must be 64 or 128")
        if self.block_n not in (64, 128, 192, 256):
            raise ValueError(f"block_n={self.block_n} must be 64, 128, 192 or 256")
        if self.block_k not in (128, 256):
            raise ValueError(f"block_k={self.block_k} must be 128 or 256")
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages} must be at least 2")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be at least 1")

    @property
    def rows(self) -> int:
        """Output rows per block tile."""
        return COMPUTE_WGS * self.block_m

    def smem_bytes(self) -> int:
        stage = (self.rows + self.block_n) * self.block_k
        return self.num_stages * stage + self.rows * self.block_n * 2


def fp8_matmul_reference(
    x_q: Float[Array, "M K"],
    w_t: Float[Array, "N K"],
    x_scale: Float[Array, "M"],
    w_scale: Float[Array, "N"],
    *,
    out_dtype=jnp.bfloat16,
    config: FP8Config | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """(x_q @ w_t.T) * x_scale[:, None] * w_scale[None, :] in float32, returned in out_dtype."""
    del config, interpret
    y = jnp.dot(x_q.astype(jnp.float32), w_t.astype(jnp.float32).T, precision=lax.Precision.HIGHEST)
    return (y * x_scale.astype(jnp.float32)[:, None] * w_scale.astype(jnp.float32)[None, :]).astype(out_dtype)


def limits(m: int, k: int, n: int, config: FP8Config | None = None) -> str | None:
    """Why the kernel cannot take an [m, k] x [k, n] product, or None when it can."""
    config = config or FP8Config()
    if k % config.block_k:
        return f"K={k} must be a multiple of block_k={config.block_k}"
    if n % config.block_n:
        return f"N={n} must be a multiple of block_n={config.block_n}"
    if config.smem_bytes() > SMEM_LIMIT:
        return f"{config} needs {config.smem_bytes()} bytes of shared memory, over {SMEM_LIMIT}"
    return None


def check_shapes(x_q, w_t, x_scale, w_scale, config: FP8Config) -> None:
    """ValueError naming what the kernel does not take."""
    for name, a in (("x_q", x_q), ("w_t", w_t)):
        if a.ndim != 2 or a.dtype != FP8:
            raise ValueError(f"{name} of shape {tuple(a.shape)} and dtype {a.dtype} must be a 2-D float8_e4m3fn matrix")
    (m, k), (n, k2) = x_q.shape, w_t.shape
    if k != k2:
        raise ValueError(f"x_q [M, K] = {tuple(x_q.shape)} and w_t [N, K] = {tuple(w_t.shape)} differ in K")
    if x_scale.shape != (m,) or w_scale.shape != (n,):
        raise ValueError(f"x_scale {tuple(x_scale.shape)} and w_scale {tuple(w_scale.shape)} must be ({m},) and ({n},)")
    if (why := limits(m, k, n, config)) is not None:
        raise ValueError(why)


def fp8_matmul(
    x_q: Float[Array, "M K"],
    w_t: Float[Array, "N K"],
    x_scale: Float[Array, "M"],
    w_scale: Float[Array, "N"],
    *,
    out_dtype=jnp.bfloat16,
    config: FP8Config | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """The Mosaic GPU kernel; same contract as `fp8_matmul_reference` (M is padded to the tile)."""
    config = config or FP8Config()
    check_shapes(x_q, w_t, x_scale, w_scale, config)
    m = x_q.shape[0]
    rows = -(-m // config.rows) * config.rows
    blocks = config.num_blocks or compat.num_sms()
    y = _build(rows, w_t.shape[0], w_t.shape[1], config, blocks, interpret)(jnp.pad(x_q, ((0, rows - m), (0, 0))), w_t)
    scaled = y[:m].astype(jnp.float32) * x_scale.astype(jnp.float32)[:, None] * w_scale.astype(jnp.float32)[None, :]
    return scaled.astype(out_dtype)


@functools.lru_cache(maxsize=None)
def _build(m: int, n: int, k: int, c: FP8Config, blocks: int, interpret: bool):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m_tiles, n_tiles, steps = m // c.rows, n // c.block_n, k // c.block_k
    tiles, stages = m_tiles * n_tiles, c.num_stages
    blocks = min(blocks, tiles)

    def body(x_ref, w_ref, out_ref, a_smem, b_smem, o_smem, ready, free):
        block, wg = lax.axis_index("b"), lax.axis_index("wg")
        my_tiles = (tiles - block + blocks - 1) // blocks  # tiles block, block + blocks, ...
        total = my_tiles * steps

        def tile_of(j):
            t = block + j * blocks
            return lax.rem(t, m_tiles), lax.div(t, m_tiles)  # M fastest: concurrent blocks share W tiles

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            def release(g):
                @pl.when(g + stages < total)  # the memory warpgroup waits for this slot again
                def _():
                    plgpu.barrier_arrive(free.at[lax.rem(g, stages)])

            def products_interpret(j):
                def step(s, acc):
                    g = j * steps + s
                    slot = lax.rem(g, stages)
                    plgpu.barrier_wait(ready.at[slot])
                    a = a_smem.at[slot, wg][...].astype(jnp.float32)
                    b = b_smem.at[slot][...].astype(jnp.float32)
                    acc = acc + jnp.dot(a, b.T, preferred_element_type=jnp.float32)
                    release(g)
                    return acc

                return lax.fori_loop(0, steps, step, jnp.zeros((c.block_m, c.block_n), jnp.float32))

            def products(j):
                def scope(acc_ref):
                    def step(s, carry):
                        g = j * steps + s
                        slot = lax.rem(g, stages)
                        plgpu.barrier_wait(ready.at[slot])
                        plgpu.wgmma(acc_ref, a_smem.at[slot, wg], plgpu.transpose_ref(b_smem.at[slot], (1, 0)))
                        plgpu.wgmma_wait(1)  # the step before is done: its slot can refill

                        @pl.when(s > 0)
                        def _():
                            release(g - 1)

                        return carry

                    lax.fori_loop(0, steps, step, None)
                    plgpu.wgmma_wait(0)
                    release(j * steps + steps - 1)
                    return acc_ref[...]

                return pl.run_scoped(scope, plgpu.ACC((c.block_m, c.block_n), jnp.float32))

            def one_tile(j, carry):
                mi, ni = tile_of(j)
                acc = products_interpret(j) if interpret else products(j)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's store has read o_smem
                o_smem.at[wg][...] = acc.astype(out_ref.dtype)
                plgpu.commit_smem()
                rows = pl.ds(mi * c.rows + wg * c.block_m, c.block_m)
                plgpu.copy_smem_to_gmem(o_smem.at[wg], out_ref.at[rows, pl.ds(ni * c.block_n, c.block_n)])
                return carry

            lax.fori_loop(0, my_tiles, one_tile, None)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            def issue(g, carry):
                slot = lax.rem(g, stages)

                @pl.when(g >= stages)
                def _():
                    plgpu.barrier_wait(free.at[slot])

                mi, ni = tile_of(lax.div(g, steps))
                ks = pl.ds(lax.rem(g, steps) * c.block_k, c.block_k)
                for h in range(COMPUTE_WGS):
                    rows = pl.ds(mi * c.rows + h * c.block_m, c.block_m)
                    plgpu.copy_gmem_to_smem(x_ref.at[rows, ks], a_smem.at[slot, h], ready.at[slot])
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(ni * c.block_n, c.block_n), ks], b_smem.at[slot], ready.at[slot])
                return carry

            lax.fori_loop(0, total, issue, None)

    def entry(x_ref, w_ref, out_ref):
        scoped = (swizzled((stages, COMPUTE_WGS, c.block_m, c.block_k), FP8),
                  swizzled((stages, c.block_n, c.block_k), FP8),
                  swizzled((COMPUTE_WGS, c.block_m, c.block_n), jnp.bfloat16),
                  plgpu.Barrier(num_arrivals=COMPUTE_WGS + 1, num_barriers=stages),
                  plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages))
        pl.run_scoped(lambda *refs: body(x_ref, w_ref, out_ref, *refs), *scoped, collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
        grid=(blocks,),
        grid_names=("b",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=None if interpret else compat.lane_compiler_params(),
        interpret=compat.gpu_interpret_params() if interpret else False,
    )
