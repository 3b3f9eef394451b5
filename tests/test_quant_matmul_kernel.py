"""The Mosaic GPU w8a16 / w4a16 matmul kernels against their jnp references, in Pallas' GPU
interpret mode (CPU): random weights, codes, scales and zero points at tiny shapes, several token
counts, K and N, group sizes, stage counts and K splits; and the dispatch in `jaxllm.ops.einsum`.

The interpreter's wgmma takes neither transposed nor register operands, so under it the products
are jnp dots on the shared-memory tiles; the TMA pipeline, barriers, K splits, the bit-level int4
dequantization and the per-group scale and zero-point fold are the kernel's own. The GPU run
(benchmarks/quant_matmul_kernels.py) checks the wgmma path at full size.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import ops
from jaxllm.ops.matmul import as_matrix_product, kernel_limits, quantized_kernels
from jaxllm.quantization import einsum as xla_einsum
from jaxllm.quantization import quantize_int4, quantize_int8
from pallas_kernels.quant_matmul import (
    QuantMatmulConfig,
    choose_splits,
    dequantize_int4,
    plan,
    w4a16_matmul,
    w4a16_matmul_reference,
    w8a16_matmul,
    w8a16_matmul_reference,
)

pytestmark = pytest.mark.isolated_module  # see conftest.py


def _close(got, want, tol=2e-2):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=tol)


def _not_close(a, b, tol=2e-2):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b).max() > tol * np.abs(b).max()


def _int8_inputs(seed, m, k, n):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, (n,)), jnp.float32)
    return x, w, scale


def _int4_inputs(seed, m, k, n, group, awq):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    packed = jnp.asarray(rng.integers(0, 256, (k // 2, n)), jnp.uint8)
    scale = jnp.asarray(rng.uniform(1e-2, 1e-1, (k // group, n)), jnp.float32)
    zero = jnp.asarray(rng.integers(0, 16, (k // group, n)), jnp.uint8)
    input_scale = jnp.asarray(rng.uniform(0.5, 2.0, (k,)), jnp.float32) if awq else None
    return x, packed, scale, zero, input_scale


INT8_CASES = [  # m, k, n, block_n, stages, splits
    (1, 256, 128, None, 2, 1),  # two compute warpgroups, two steps
    (5, 384, 64, 64, 3, 2),  # three steps over two splits (2 + 1)
    (33, 128, 192, 64, 2, 1),  # three output blocks; 33 tokens pad to 40
    (64, 256, 128, 128, 1, 2),  # the most tokens; one stage
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("m,k,n,block_n,stages,splits", INT8_CASES)
def test_w8a16_kernel_matches_reference(m, k, n, block_n, stages, splits):
    x, w, scale = _int8_inputs(m + k + n, m, k, n)
    cfg = QuantMatmulConfig(block_n=block_n, block_k=128 if k % 128 == 0 else 64, num_stages=stages,
                            num_splits=splits)
    got = w8a16_matmul(x, w, scale, config=cfg, interpret=True)
    want = w8a16_matmul_reference(x, w, scale)
    assert got.dtype == x.dtype
    _close(got, want)
    # Negative controls: another channel's scales, or a weight with one K tile dropped.
    assert _not_close(w8a16_matmul_reference(x, w, jnp.roll(scale, 1)), want)
    assert _not_close(w8a16_matmul_reference(x, w.at[:64].set(0), scale), want)


INT4_CASES = [  # m, k, n, group, awq, stages, splits
    (1, 256, 128, 128, False, 2, 1),
    (7, 512, 128, 128, True, 3, 2),  # AWQ input scales; four groups over two splits
    (24, 512, 256, 256, True, 2, 1),  # groups of 256; two output blocks
    (64, 384, 128, 128, False, 1, 3),  # the most tokens; one stage; a split per group
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("m,k,n,group,awq,stages,splits", INT4_CASES)
def test_w4a16_kernel_matches_reference(m, k, n, group, awq, stages, splits):
    x, packed, scale, zero, input_scale = _int4_inputs(m + k + group, m, k, n, group, awq)
    cfg = QuantMatmulConfig(num_stages=stages, num_splits=splits)
    got = w4a16_matmul(x, packed, scale, zero, input_scale, config=cfg, interpret=True)
    want = w4a16_matmul_reference(x, packed, scale, zero, input_scale)
    assert got.dtype == x.dtype
    _close(got, want)
    # Negative controls: nibbles swapped within each byte, zero points off by one.
    swapped = (packed >> 4) | (packed << 4)
    assert _not_close(w4a16_matmul_reference(x, swapped, scale, zero, input_scale), want)
    assert _not_close(w4a16_matmul_reference(x, packed, scale, (zero + 1) % 16, input_scale), want)


def test_int4_dequantization_recovers_the_weight_within_half_a_step():
    """The reference's dequantization (which jaxllm.quantization's also uses) inverts quantize_int4:
    each entry within half a quantization step (scale / 2, divided by its input scale)."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
    s = jnp.asarray(rng.uniform(0.5, 2.0, (256,)), jnp.float32)
    q = quantize_int4(w, (0,), 128, s)
    got = np.asarray(dequantize_int4(q.packed, q.scale, q.zero, q.input_scale))
    step = np.repeat(np.asarray(q.scale), 128, axis=0) / np.asarray(s)[:, None]
    assert np.all(np.abs(got - np.asarray(w)) <= step / 2 + 1e-6)
    assert not np.all(np.abs(got[::-1] - np.asarray(w)) <= step / 2 + 1e-6)  # a wrong order fails


@pytest.mark.timeout(300)
def test_dispatch_routes_int8_and_int4_products_to_the_kernels():
    """ops.einsum on quantized weights gives the XLA path's result through the kernels, for the
    model's einsum patterns (several input and output axes)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 64)), jnp.bfloat16)  # [b, t, heads, head_dim]
    w = jnp.asarray(rng.standard_normal((4, 64, 128)) * 0.05, jnp.float32)  # [heads, head_dim, d]
    for qw in (quantize_int8(w, (0, 1)), quantize_int4(w, (0, 1), 128)):
        subscripts = "bthk,hkd->btd"
        assert kernel_limits(subscripts, x, qw) is None
        with quantized_kernels("pallas"):
            got = ops.einsum(subscripts, x, qw)
        want = xla_einsum(subscripts, x, qw)
        assert got.shape == want.shape == (2, 3, 128)
        _close(got, want)


def test_dispatch_leaves_other_products_to_xla():
    x = jnp.ones((2, 64), jnp.bfloat16)
    w8 = quantize_int8(jnp.ones((128, 64), jnp.float32), (1,))
    assert "not x [..., K] @ W [K, N]" in kernel_limits("...d,vd->...v", x, w8)  # tied embeddings
    assert "float32 activations" in kernel_limits("md,dn->mn", x.astype(jnp.float32),
                                                  quantize_int8(jnp.ones((64, 128)), (0,)))
    big = jnp.ones((65, 64), jnp.bfloat16)
    assert "65 tokens" in kernel_limits("md,dn->mn", big, quantize_int8(jnp.ones((64, 128)), (0,)))
    w4 = quantize_int4(jnp.ones((128, 128), jnp.float32), (0,), 64)
    assert "group size 64" in kernel_limits("md,dn->mn", jnp.ones((2, 128), jnp.bfloat16), w4)
    assert as_matrix_product("bthgk,hgkd->btd", (2, 1, 8, 4, 128), (8, 4, 128, 4096)) == (2, 4096, 4096, (2, 1, 4096))
    assert as_matrix_product("...d,dv->...v", (3, 1, 64), (64, 100)) == (3, 64, 100, (3, 1, 100))
    with pytest.raises(ValueError, match="'gpu'"), quantized_kernels("gpu"):
        pass


def test_auto_mode_keeps_multi_token_int8_on_xla(monkeypatch):
    """On one GPU, "auto" sends int8 products of one token to the kernel, more tokens to XLA."""
    import jax

    from jaxllm.ops import matmul

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    w = quantize_int8(jnp.asarray(np.random.default_rng(5).standard_normal((64, 128)), jnp.float32), (0,))
    x = jnp.ones((2, 64), jnp.bfloat16)
    assert matmul.kernel_limits("md,dn->mn", x, w) is None  # the kernel could take it ...
    assert matmul._quantized_kernel("md,dn->mn", x, w) is None  # ... but XLA's fusion is as fast


def test_plan_defaults_and_splits():
    p = plan("int8", 1, 4096, 14336, None)
    assert (p.block_n, p.rows, p.tokens, p.steps) == (128, 128, 8, 32)
    assert p.smem_bytes() <= 227 * 1024 and p.num_stages >= 2
    q = plan("int4", 64, 14336, 4096, None, 128)
    assert (q.block_n, q.rows, q.tokens, q.steps) == (128, 64, 64, 112)
    assert q.smem_bytes() <= 227 * 1024 and q.num_splits > 1  # 32 output blocks alone fill a quarter
    assert choose_splits(224, 32, 264) == 1  # most multiprocessors have two blocks already
    assert choose_splits(112, 32, 264) == 2
    assert choose_splits(32, 112, 264) == 8  # 256 blocks: two a multiprocessor
    assert choose_splits(32, 112, 132) == 4  # one a multiprocessor (too much shared memory for two)
    assert choose_splits(8, 2, 264) == 1  # never fewer than MIN_STEPS_PER_SPLIT steps a split


@pytest.mark.parametrize("call,match", [
    (lambda: w8a16_matmul(jnp.ones((2, 64), jnp.bfloat16), jnp.ones((64, 64), jnp.int16), jnp.ones(64)), "int8"),
    (lambda: w8a16_matmul(jnp.ones((2, 32), jnp.bfloat16), jnp.ones((64, 64), jnp.int8), jnp.ones(64)), r"\[M, 64\]"),
    (lambda: w8a16_matmul(jnp.ones((2, 64), jnp.bfloat16), jnp.ones((64, 64), jnp.int8), jnp.ones(32)), "one value"),
    (lambda: w8a16_matmul(jnp.ones((2, 64), jnp.bfloat16), jnp.ones((64, 96), jnp.int8), jnp.ones(96)), "N=96"),
    (lambda: w8a16_matmul(jnp.ones((65, 64), jnp.bfloat16), jnp.ones((64, 64), jnp.int8), jnp.ones(64)), "65 tokens"),
    (lambda: w4a16_matmul(jnp.ones((1, 256), jnp.bfloat16), jnp.ones((128, 128), jnp.uint8),
                          jnp.ones((4, 128)), jnp.ones((4, 128), jnp.uint8)), "group size 64"),
    (lambda: w4a16_matmul(jnp.ones((1, 256), jnp.bfloat16), jnp.ones((128, 128), jnp.uint8),
                          jnp.ones((2, 128)), jnp.ones((1, 128), jnp.uint8)), "zero"),
    (lambda: QuantMatmulConfig(block_n=96), "block_n=96"),
    (lambda: plan("int8", 64, 4096, 4096, QuantMatmulConfig(num_stages=8)), "num_stages=8"),
    (lambda: QuantMatmulConfig(num_stages=0), "num_stages=0"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
