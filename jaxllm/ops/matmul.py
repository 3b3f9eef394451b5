"""Matrix products against weights: dense arrays, or quantized pytrees (jaxllm.quantization)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax.numpy as jnp
from jaxtyping import Array

# Set only while calibrating (an eager forward): called with every product's inputs.
_observer: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("matmul_observer", default=None)


@contextlib.contextmanager
def observe_inputs(fn: Callable[[str, Array, Array], None]) -> Iterator[None]:
    """Within the block, `fn(subscripts, x, w)` sees each product's activation and weight."""
    token = _observer.set(fn)
    try:
        yield
    finally:
        _observer.reset(token)


def einsum(subscripts: str, x: Array, w) -> Array:
    """`x` contracted with the weight `w` (an array or a quantized weight), in the activation's dtype."""
    from jaxllm.quantization import einsum as quantized_einsum, is_quantized

    observer = _observer.get()
    if observer is not None:
        observer(subscripts, x, w)
    if is_quantized(w):
        return quantized_einsum(subscripts, x, w)
    return jnp.einsum(subscripts, x, w.astype(x.dtype))
