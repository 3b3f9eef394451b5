"""Top-k along the last axis for small k: the same result as `jax.lax.top_k` by k argmax passes.

XLA's GPU TopK kernel is slow for a few rows: in a Medusa step of the bundled model (3 heads' rows
of 8,192 logits, k = 10) it took 93.5 us on an H200, a fifth of the step
(benchmarks/results_profile_speculative_h200.json); an argmax pass over such rows is one small
reduction kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

ARGMAX_PASSES_MAX_K = 16  # above this, `jax.lax.top_k`


def top_k(x: Float[Array, "... V"], k: int) -> tuple[Float[Array, "... k"], Int[Array, "... k"]]:
    """(values, indices) of the k largest entries of each row, largest first, ties to the lower
    index: what `jax.lax.top_k` returns."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= x.shape[-1]:
        raise ValueError(f"k={k!r} must be an integer in [1, {x.shape[-1]}] (the last axis' size)")
    if k > ARGMAX_PASSES_MAX_K:
        return jax.lax.top_k(x, k)
    # Taken entries become -inf; -inf inputs become the lowest finite value, so that an entry not
    # yet taken always beats a taken one.
    key = jnp.maximum(x.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    column = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    indices = []
    for _ in range(k):
        best = jnp.argmax(key, axis=-1).astype(jnp.int32)
        indices.append(best)
        key = jnp.where(column == best[..., None], -jnp.inf, key)
    indices = jnp.stack(indices, axis=-1)
    return jnp.take_along_axis(x, indices, axis=-1), indices
