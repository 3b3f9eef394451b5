"""KV-cache quantization: int8 or fp8 (e4m3) values with one float32 scale per token and head."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")
_STORAGE = {"int8": jnp.int8, "fp8_e4m3": jnp.float8_e4m3fn}
_MAX = {"int8": 127.0, "fp8_e4m3": 448.0}  # largest finite value of each storage type


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} not supported; choose one of {KV_CACHE_DTYPES}")


def storage_dtype(kv_cache_dtype: str, model_dtype) -> jnp.dtype:
    """The dtype KV pages are stored in ("auto": the model's)."""
    check_kv_cache_dtype(kv_cache_dtype)
    return jnp.dtype(_STORAGE.get(kv_cache_dtype, model_dtype))


def quantize(x: Float[Array, "... D"], kv_cache_dtype: str) -> tuple[Array, Float[Array, "..."]]:
    """Symmetric per-vector quantization: x ~= q * scale, with max|x| mapped to the type's max."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / _MAX[kv_cache_dtype]
    scale = jnp.where(scale > 0, scale, 1.0)
    scaled = x32 / scale[..., None]
    if kv_cache_dtype == "int8":
        scaled = jnp.round(scaled)
    return scaled.astype(_STORAGE[kv_cache_dtype]), scale


def dequantize(q: Array, scale: Float[Array, "..."], dtype) -> Float[Array, "... D"]:
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)
