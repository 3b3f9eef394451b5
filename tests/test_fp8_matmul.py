"""fp8 (e4m3) weights on the kernels: the fp8 x fp8 Mosaic GPU kernel against its jnp reference in
Pallas' GPU interpret mode (CPU), fp8 codes in the weight-only K-major kernel, the W8A8 K-major twin
(jaxllm.kernel_weights) against the stored-layout weight, and the dispatch through `ops.einsum`.

Under the interpreter wgmma is a jnp dot of the codes; the TMA pipeline, barriers, the persistent
walk over output tiles and the padding of M are the kernel's own. benchmarks/fp8_matmul.py checks the
wgmma path at full size on the GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import ops
from jaxllm.kernel_weights import KMajorW8A8Weight, kernel_layout, to_kernel_layout, w8a8_matmul
from jaxllm.ops.matmul import kernel_limits, quantized_kernels
from jaxllm.quantization import dequantize, quantize_tokens, quantize_w8a8
from jaxllm.quantization import einsum as xla_einsum
from pallas_kernels.fp8_matmul import FP8Config, fp8_matmul, fp8_matmul_reference, limits
from pallas_kernels.quant_matmul_kmajor import w8a16_kmajor, w8a16_kmajor_reference

pytestmark = pytest.mark.isolated_module(seconds=30)  # see conftest.py: fp8 compilations run apart


def _codes(rng, shape, spread=3.0):
    return jnp.asarray(rng.standard_normal(shape) * spread, jnp.float32).astype(jnp.float8_e4m3fn)


def _close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=0)


FP8_CASES = [  # m, k, n, config
    (100, 384, 192, FP8Config(64, 64, 128, 2, num_blocks=3)),  # M padded to 128; 6 tiles over 3 blocks; slots wrap
    (64, 256, 256, FP8Config(64, 128, 128, 3, num_blocks=1)),  # M padded to 128; one block walks both N tiles
    (200, 256, 256, FP8Config(128, 64, 256, 2, num_blocks=2)),  # 128-row warpgroups, K steps of 256
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("m, k, n, config", FP8_CASES)
def test_fp8_kernel_matches_reference(m, k, n, config):
    rng = np.random.default_rng(m + k + n)
    x_q, w_t = _codes(rng, (m, k)), _codes(rng, (n, k))
    sx = jnp.asarray(rng.uniform(0.5, 2.0, m), jnp.float32)
    sw = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    got = fp8_matmul(x_q, w_t, sx, sw, config=config, interpret=True)
    want = fp8_matmul_reference(x_q, w_t, sx, sw)
    assert got.dtype == jnp.bfloat16 and got.shape == (m, n)
    _close(got, want, 2 ** -7)  # two bf16 roundings (the product, then its scaled value)
    # Negative control: the weight's rows in another order.
    assert np.abs(np.float32(fp8_matmul_reference(x_q, w_t[::-1], sx, sw)) - np.float32(got)).max() > 0.1


@pytest.mark.timeout(300)
def test_fp8_codes_in_the_weight_only_kernel():
    """fp8 codes in the K-major weight-only kernel: converted to float16 in registers, times the
    channel scales, against the float32 reference; float16's range saturates."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((5, 384)), jnp.bfloat16)
    w_t = _codes(rng, (128, 384), 60.0)
    scale = jnp.asarray(rng.uniform(1e-3, 2e-3, 128), jnp.float32)
    got = w8a16_kmajor(x, w_t, scale, interpret=True)
    _close(got, w8a16_kmajor_reference(x, w_t, scale), 2e-2)
    # Activations beyond float16's range saturate at 65504 instead of turning the row to inf / nan.
    big = x.at[2, 7].set(1e5)
    got = w8a16_kmajor(big, w_t, scale, interpret=True)
    _close(got, w8a16_kmajor_reference(big.at[2, 7].set(65504.0), w_t, scale), 2e-2)


def test_w8a8_twins_stand_for_the_same_weights():
    """kernel_layout's W8A8 twins (fp8, and SmoothQuant's int8 with input scales) dequantize to the
    stored weight and multiply like it through XLA."""
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((4, 64, 128)) * 0.05, jnp.float32)  # [heads, head_dim, d]
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 64)), jnp.float32)
    s = jnp.asarray(rng.uniform(0.5, 2.0, (4, 64)), jnp.float32)
    for qw in (quantize_w8a8(w, (0, 1), "fp8"), quantize_w8a8(w, (0, 1), "int8", s)):
        twin = kernel_layout(qw)
        assert isinstance(twin, KMajorW8A8Weight) and twin.kind == qw.kind and twin.q_t.shape == (128, 256)
        assert (twin.input_scale is None) == (qw.kind == "fp8")  # all ones: dropped at load
        np.testing.assert_allclose(np.asarray(dequantize(twin)), np.asarray(dequantize(qw)), rtol=1e-6)
        got, want = xla_einsum("bthk,hkd->btd", x, twin), xla_einsum("bthk,hkd->btd", x, qw)
        assert got.shape == want.shape == (2, 3, 128)
        _close(got, want, 1e-5)  # same codes, same scales: only the summation order differs
        _close(got, jnp.einsum("bthk,hkd->btd", x, w), 0.1)  # and near the dense product
    dense = jnp.ones((64, 128))
    assert kernel_layout(dense) is dense
    params = {"layers": [{"wo": quantize_w8a8(w, (0, 1), "fp8")}]}
    assert isinstance(to_kernel_layout(params)["layers"][0]["wo"], KMajorW8A8Weight)


def test_per_token_codes_use_the_whole_range():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 32)) * [[1.0], [10.0], [0.1], [0.0]], jnp.float32)
    codes, sx = quantize_tokens(x, "fp8")
    c = np.asarray(codes.astype(jnp.float32))
    np.testing.assert_allclose(np.abs(c[:3]).max(axis=1), 448.0)
    assert np.all(c[3] == 0) and float(sx[3]) == 1.0
    np.testing.assert_allclose(c[:3] * np.asarray(sx[:3, None]), np.asarray(x[:3]), rtol=2 ** -3)
    with pytest.raises(ValueError, match="'int4' not supported; choose one of"):
        quantize_tokens(x, "int4")


@pytest.mark.timeout(300)
def test_dispatch_routes_w8a8_twins(monkeypatch):
    """"pallas" mode: fp8 twins go to the weight-only kernel up to 64 tokens (activations stay
    unquantized) and to the fp8 x fp8 kernel above (XLA's W8A8 product up to rounding); "auto" on one GPU sends up to 16 tokens to the
    kernels and leaves prefill to XLA's fp8 gemm."""
    from jaxllm.ops import matmul

    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((256, 256)) * 0.05, jnp.float32)
    twin = kernel_layout(quantize_w8a8(w, (0,), "fp8"))
    weight_only = lambda x: jnp.dot(x.astype(jnp.float32), dequantize(twin), precision="highest")
    for m, want, tol in ((3, weight_only, 2e-2), (80, lambda x: w8a8_matmul(x, twin), 2 ** -6)):
        x = jnp.asarray(rng.standard_normal((m, 256)), jnp.bfloat16)
        assert kernel_limits("md,dn->mn", x, twin) is None
        with quantized_kernels("pallas"):
            got = ops.einsum("md,dn->mn", x, twin)
        _close(got, want(x), tol)
    stored = quantize_w8a8(w, (0,), "int8", input_scale=rng.uniform(0.5, 2.0, 256))
    smooth = kernel_layout(stored)
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.bfloat16)
    with quantized_kernels("pallas"):  # SmoothQuant's codes, stored in the int8 kernel's input order
        got = ops.einsum("md,dn->mn", x, smooth)
    _close(got, jnp.dot(x.astype(jnp.float32), dequantize(stored), precision="highest"), 2e-2)
    _close(got, w8a8_matmul(x, smooth), 5e-2)  # XLA's product of quantized tokens, in the same order
    assert "int8 W8A8" in kernel_limits("md,dn->mn", jnp.ones((80, 256), jnp.bfloat16), smooth)
    assert "block_n=256" in kernel_limits("md,dn->mn", jnp.ones((80, 256), jnp.bfloat16),
                                          kernel_layout(quantize_w8a8(jnp.ones((256, 128)), (0,), "fp8")))
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr("jaxllm.kernel_weights.matmul_kernel", lambda x2, w, interpret: calls.append(x2.shape[0]) or
                        jnp.zeros((x2.shape[0], 256), x2.dtype))
    for m in (1, 16, 17, 80):
        matmul._quantized_kernel("md,dn->mn", jnp.ones((m, 256), jnp.bfloat16), twin)
    assert calls == [1, 16]


@pytest.mark.parametrize("call,match", [
    (lambda: fp8_matmul(jnp.ones((8, 128), jnp.bfloat16), jnp.ones((256, 128), jnp.float8_e4m3fn),
                        jnp.ones(8), jnp.ones(256)), "x_q .* float8_e4m3fn"),
    (lambda: fp8_matmul(jnp.ones((8, 128), jnp.float8_e4m3fn), jnp.ones((256, 256), jnp.float8_e4m3fn),
                        jnp.ones(8), jnp.ones(256)), "differ in K"),
    (lambda: fp8_matmul(jnp.ones((8, 128), jnp.float8_e4m3fn), jnp.ones((256, 128), jnp.float8_e4m3fn),
                        jnp.ones(4), jnp.ones(256)), "x_scale"),
    (lambda: fp8_matmul(jnp.ones((8, 128), jnp.float8_e4m3fn), jnp.ones((192, 128), jnp.float8_e4m3fn),
                        jnp.ones(8), jnp.ones(192)), "N=192 .* block_n=256"),
    (lambda: fp8_matmul(jnp.ones((8, 64), jnp.float8_e4m3fn), jnp.ones((256, 64), jnp.float8_e4m3fn),
                        jnp.ones(8), jnp.ones(256)), "K=64"),
    (lambda: FP8Config(block_m=32), "block_m=32"),
    (lambda: FP8Config(block_n=96), "block_n=96"),
    (lambda: FP8Config(num_stages=1), "num_stages=1"),
    (lambda: w8a16_kmajor(jnp.ones((2, 128), jnp.bfloat16), jnp.ones((64, 128), jnp.float8_e5m2), jnp.ones(64)),
     "int8 or float8_e4m3fn"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_shared_memory_limit():
    assert limits(2048, 4096, 14336) is None  # the default tiles fit
    assert "shared memory" in limits(2048, 4096, 14336, FP8Config(128, 256, 128, 3))
