"""Matrix products against weights: dense arrays, or quantized pytrees (jaxllm.quantization).

On a single GPU, `LLM` stores int8, int4, fp4 (mxfp4, nvfp4) and W8A8 (fp8, SmoothQuant) weights in
the K-major kernels' layout (`jaxllm.kernel_weights.to_kernel_layout`); their products of one token
(int8), up to 16 (W8A8, weight-only there) or up to 64 tokens (int4) run in
`pallas_kernels.quant_matmul_kmajor` (batch-1 8B decode on the H200: int8 1.28x, int4 1.36x and fp8
1.40x bf16's tokens/s, BENCHMARKS.md), fp4's up to 64 tokens in `pallas_kernels.fp4_matmul_kmajor`
(nvfp4: 274 tokens/s, 1.15x bf16; its kernel 3.0-3.7x XLA's dequantize-then-multiply).
From two tokens on, XLA's int8 gemm fusion is as fast or faster on some shapes, and at prefill XLA's
fp8 gemm beats our fp8 x fp8 kernel (`pallas_kernels.fp8_matmul`, run only in "pallas" mode), so
those products, weights in their stored layout, and everything else run through XLA
(`jaxllm.quantization.einsum`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jaxtyping import Array

# Set only while calibrating (an eager forward): called with every product's inputs.
_observer: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("matmul_observer", default=None)
KERNEL_MODES = ("auto", "xla", "pallas")
INT8_KERNEL_MAX_TOKENS = 1  # "auto" routes int8 products of at most this many tokens to the kernel
# ... and W8A8 products (weight-only there); more tokens go to XLA's 8-bit gemms, faster than the
# fp8 x fp8 kernel at prefill shapes (BENCHMARKS.md)
W8A8_KERNEL_MAX_TOKENS = 16
_kernel_mode: contextvars.ContextVar[str] = contextvars.ContextVar("quantized_kernels", default="auto")


@contextlib.contextmanager
def observe_inputs(fn: Callable[[str, Array, Array], None]) -> Iterator[None]:
    """Within the block, `fn(subscripts, x, w)` sees each product's activation and weight."""
    token = _observer.set(fn)
    try:
        yield
    finally:
        _observer.reset(token)


def observing() -> bool:
    """Whether an `observe_inputs` block is active (a calibration forward)."""
    return _observer.get() is not None


@contextlib.contextmanager
def quantized_kernels(mode: str) -> Iterator[None]:
    """Within the block (while tracing), quantized products use the Pallas kernels on one GPU where
    they apply and were measured faster ("auto", the default), never ("xla"), or wherever they
    apply ("pallas"; on a CPU in Pallas' interpret mode: slow, for tests). They apply to weights in
    the kernels' K-major layout (`jaxllm.kernel_weights`)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"quantized kernel mode {mode!r} not supported; choose one of {KERNEL_MODES}")
    token = _kernel_mode.set(mode)
    try:
        yield
    finally:
        _kernel_mode.reset(token)


def kernels_by_default() -> bool:
    """Whether "auto" runs the quantized kernels here: on a single GPU."""
    return jax.default_backend() == "gpu" and jax.device_count() == 1


def einsum(subscripts: str, x: Array, w) -> Array:
    """`x` contracted with the weight `w` (an array or a quantized weight), in the activation's dtype."""
    from jaxllm.quantization import einsum as quantized_einsum
    from jaxllm.quantization import is_quantized

    observer = _observer.get()
    if observer is not None:
        observer(subscripts, x, w)
    if is_quantized(w):
        out = _quantized_kernel(subscripts, x, w)
        return quantized_einsum(subscripts, x, w) if out is None else out
    return jnp.einsum(subscripts, x, w.astype(x.dtype))


def as_matrix_product(subscripts: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...]):
    """(M, K, N, output shape) when the einsum is x [..., K] @ W [K, N] with the contracted axes
    trailing x and leading the weight, in the same order (how models lay out weights); else None."""
    inputs, out = subscripts.replace(" ", "").split("->")
    x_sub, w_sub = inputs.split(",")
    if "..." in w_sub:
        return None
    if "..." in x_sub:
        if not out.startswith("...") or x_sub.count("...") != 1:
            return None
        free = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in subscripts)
        lead = free[: len(x_shape) - (len(x_sub) - 3)]
        x_sub, out = x_sub.replace("...", lead), out.replace("...", lead)
    if len(x_sub) != len(x_shape) or len(w_sub) != len(w_shape):
        return None
    contracted = "".join(c for c in w_sub if c not in out)
    c = len(contracted)
    if not c or w_sub[:c] != contracted or x_sub[-c:] != contracted or out != x_sub[:-c] + w_sub[c:]:
        return None
    if tuple(x_shape[-c:]) != tuple(w_shape[:c]):
        return None
    m, k = math.prod(x_shape[:-c]), math.prod(w_shape[:c])
    return m, k, math.prod(w_shape[c:]), tuple(x_shape[:-c]) + tuple(w_shape[c:])


def kernel_limits(subscripts: str, x, w) -> str | None:
    """Why the quantized-matmul kernels cannot take this product, or None when they can."""
    from jaxllm.kernel_weights import KMAJOR_TYPES, KMajorFP4Weight, KMajorInt4Weight, KMajorW8A8Weight
    from jaxllm.quantization import FP4Weight, Int4Weight, QuantizedWeight, W8A8Weight
    from pallas_kernels import fp8_matmul
    from pallas_kernels.quant_matmul_kmajor import MAX_TOKENS, plan

    if isinstance(w, (QuantizedWeight, Int4Weight, W8A8Weight, FP4Weight)):
        return (f"{type(w).__name__} in its stored layout (jaxllm.kernel_weights.to_kernel_layout "
                "re-lays int8, int4, fp4 and W8A8 weights for the kernels)")
    if not isinstance(w, KMAJOR_TYPES):
        return f"{type(w).__name__} weights (the kernels take int8, int4, fp4, fp8 and SmoothQuant's W8A8)"
    if x.dtype != jnp.bfloat16:
        return f"{x.dtype} activations (the kernels take bfloat16)"
    dims = as_matrix_product(subscripts, tuple(x.shape), w.shape)
    if dims is None:
        return f"{subscripts!r} is not x [..., K] @ W [K, N] with K leading the weight"
    m, k, n, _ = dims
    if isinstance(w, KMajorW8A8Weight):
        if m > MAX_TOKENS and w.kind != "fp8":
            return f"{m} tokens of {w.kind} W8A8 (above {MAX_TOKENS} tokens the kernel takes fp8 only)"
        if m > MAX_TOKENS:
            return fp8_matmul.limits(m, k, n)
        kind = w.kind
    else:
        kind = "int4" if isinstance(w, KMajorInt4Weight) else "fp4" if isinstance(w, KMajorFP4Weight) else "int8"
    try:
        plan(kind, m, k, n)
    except ValueError as err:
        return str(err)
    return None


def _quantized_kernel(subscripts: str, x, w):
    """The product through a Pallas kernel, or None where the XLA path should run it."""
    mode = _kernel_mode.get()
    if mode == "xla" or (mode == "auto" and not kernels_by_default()):
        return None
    if kernel_limits(subscripts, x, w) is not None:
        return None
    from jaxllm import kernel_weights

    m, k, n, out_shape = as_matrix_product(subscripts, tuple(x.shape), w.shape)
    if mode == "auto" and isinstance(w, kernel_weights.KMajorInt8Weight) and m > INT8_KERNEL_MAX_TOKENS:
        return None
    if mode == "auto" and isinstance(w, kernel_weights.KMajorW8A8Weight) and m > W8A8_KERNEL_MAX_TOKENS:
        return None
    y = kernel_weights.matmul_kernel(x.reshape(m, k), w, interpret=jax.default_backend() != "gpu")
    return y.reshape(out_shape)
