"""The fp4 (e2m1) weight-only kernel (pallas_kernels/fp4_matmul_kmajor.py): a model of its
register conversion against the e2m1 table; the kernel in Pallas' GPU interpret mode (CPU) against
its jnp reference on NVFP4 and MXFP4 weights; the K-major twin (jaxllm.kernel_weights) against the
FP4Weight it stands for; the dispatch; bad input; and the Mosaic GPU lowering at 8B shapes.

Under the interpreter the conversion is a jnp lookup and each wgmma a jnp dot: the TMA pipeline,
barriers, K splits, chunked activations and both ways of applying block scales are the kernel's own.
The prmt conversion itself runs only on a GPU (benchmarks/quant_matmul_kernels.py checks it there).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxllm import ops
from jaxllm.kernel_weights import KMajorFP4Weight, kernel_layout, to_kernel_layout
from jaxllm.ops.matmul import kernel_limits, quantized_kernels
from jaxllm.quantization import FP4_VALUES, FP4Weight, dequantize, quantize_fp4
from jaxllm.quantization import einsum as xla_einsum
from pallas_kernels.fp4_matmul_kmajor import (
    E4M3_NEGATIVE,
    E4M3_POSITIVE,
    FP4Config,
    e2m1_values,
    e2m1_word_to_e4m3,
    fp4_kmajor,
    w4a16_fp4_kmajor,
    w4a16_fp4_kmajor_reference,
)
from pallas_kernels.quant_matmul_kmajor import plan

pytestmark = pytest.mark.isolated_module(seconds=45)  # see conftest.py


def _close(got, want, tol=2e-2):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=tol)


def _not_close(a, b, tol=2e-2):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b).max() > tol * np.abs(b).max()


def _e4m3(byte_values):
    return np.asarray(byte_values, np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _same(a, b):  # equal values, and equal signs of zero
    return np.array_equal(a, b) and np.array_equal(np.signbit(a), np.signbit(b))


def test_conversion_model_gives_every_e2m1_value():
    """The tables hold e4m3 encodings of e2m1's values, and the prmt sequence maps each of eight
    nibbles (element e in bits 4e..4e+3, as int4 registers concatenate) to byte e of its output."""
    table = lambda words: _e4m3([(w >> 8 * i) & 0xFF for w in words for i in range(4)])
    assert _same(table(E4M3_POSITIVE), FP4_VALUES[:8]) and _same(table(E4M3_NEGATIVE), FP4_VALUES[8:])
    rng = np.random.default_rng(0)
    runs = [np.arange(8), np.arange(8, 16)] + [(np.arange(8) + s) % 16 for s in range(1, 16, 3)]
    runs += [rng.integers(0, 16, 8) for _ in range(64)]
    for codes in runs:
        word = sum(int(c) << 4 * e for e, c in enumerate(codes))
        lo, hi = e2m1_word_to_e4m3(word)
        got = table([lo, hi])
        assert _same(got, FP4_VALUES[codes]), (codes, got)
    # Negative control: the tables swapped (or nibbles read from the other end) give other values.
    reversed_word = sum(int(c) << 4 * (7 - e) for e, c in enumerate(np.arange(1, 9)))
    assert not _same(table(e2m1_word_to_e4m3(reversed_word)), FP4_VALUES[np.arange(1, 9)])


def test_int4_layout_holds_the_codes_bits():
    """fp4_kmajor keeps each code's four bits (sign in bit 3), transposed to [N, K]; e2m1_values
    reads them back."""
    codes = np.arange(32, dtype=np.uint8).reshape(16, 2) % 16  # [K=16, N=2]
    packed = jnp.asarray(codes[0::2] | (codes[1::2] << 4))
    q_t = fp4_kmajor(packed)
    assert q_t.dtype == jnp.int4 and q_t.shape == (2, 16)
    np.testing.assert_array_equal(np.asarray(q_t.astype(jnp.int8)) & 15, codes.T)
    assert _same(np.asarray(e2m1_values(q_t)), FP4_VALUES[codes.T])


def _weights(fmt, k, n, seed):
    w = jax.random.normal(jax.random.PRNGKey(seed), (k, n), jnp.float32) * 0.05
    return quantize_fp4(w, (0,), fmt)


CASES = [  # fmt, m, k, n, block scale dtype (None: the twin's 8-bit one), scale_at, block_n, stages, splits
    ("nvfp4", 1, 256, 128, None, "operand", 128, 2, 1),
    ("mxfp4", 5, 384, 256, None, "operand", 256, 2, 2),  # four compute warpgroups; three steps over two splits
    ("nvfp4", 16, 384, 128, jnp.float16, "products", 128, 1, 1),  # one stage refilled; 8 accumulators in flight
    ("mxfp4", 40, 256, 128, None, "products", 128, 2, 1),  # two accumulators in flight, four rounds
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt,m,k,n,scale_dtype,scale_at,block_n,stages,splits", CASES)
def test_kernel_matches_reference(fmt, m, k, n, scale_dtype, scale_at, block_n, stages, splits):
    qw = _weights(fmt, k, n, m)
    twin = kernel_layout(qw)
    assert isinstance(twin, KMajorFP4Weight)
    bs = twin.block_scale if scale_dtype is None else twin.block_scale.astype(scale_dtype)
    x = jax.random.normal(jax.random.PRNGKey(100 + m), (m, k), jnp.bfloat16)
    cfg = FP4Config(block_n=block_n, num_stages=stages, num_splits=splits, scale_at=scale_at)
    got = w4a16_fp4_kmajor(x, twin.q_t, bs, twin.channel_scale, config=cfg, interpret=True)
    want = w4a16_fp4_kmajor_reference(x, twin.q_t, bs, twin.channel_scale)
    assert got.dtype == x.dtype
    _close(got, want)
    dense = jnp.dot(x.astype(jnp.float32), dequantize(qw), precision="highest").astype(x.dtype)
    _close(want, dense, tol=1e-2)  # the reference over the twin is the FP4Weight's product
    # Negative controls: nibbles swapped within each byte; each block's scale on its neighbour.
    swapped = fp4_kmajor((qw.packed >> 4) | (qw.packed << 4))
    assert _not_close(w4a16_fp4_kmajor_reference(x, swapped, bs, twin.channel_scale), want)
    assert _not_close(w4a16_fp4_kmajor_reference(x, twin.q_t, jnp.roll(bs, 1, axis=0), twin.channel_scale), want)


def test_twins_stand_for_the_fp4_weights():
    """kernel_layout's fp4 twins dequantize to the FP4Weight's matrix and multiply like it through
    XLA; MXFP4 block scales below 2^-16 of their channel's largest become 0; shapes the kernel does
    not take stay FP4Weights."""
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 128), jnp.float32) * 0.05  # [heads, head_dim, d]
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 4, 64), jnp.bfloat16)
    for fmt, scale_dtype in (("nvfp4", jnp.float8_e4m3fn), ("mxfp4", jnp.float8_e5m2)):
        qw = quantize_fp4(w, (0, 1), fmt)
        twin = kernel_layout(qw)
        assert isinstance(twin, KMajorFP4Weight) and twin.shape == (4, 64, 128) and twin.fmt == fmt
        assert twin.q_t.shape == (128, 256) and twin.block_scale.shape == (16, 128)
        assert twin.block_scale.dtype == scale_dtype and twin.channel_scale.shape == (128,)
        np.testing.assert_allclose(np.asarray(dequantize(twin)), np.asarray(dequantize(qw)), rtol=1e-6, atol=0)
        _close(xla_einsum("bthk,hkd->btd", x, twin), xla_einsum("bthk,hkd->btd", x, qw), tol=1e-2)
    tiny = np.array(jax.random.normal(jax.random.PRNGKey(3), (256, 128)), np.float32)
    tiny[:32, 0] *= 2.0**-20  # one block of channel 0 far below the rest
    qw = quantize_fp4(jnp.asarray(tiny), (0,), "mxfp4")
    got, want = np.asarray(dequantize(kernel_layout(qw))), np.asarray(dequantize(qw))
    assert np.all(got[:32, 0] == 0) and np.any(want[:32, 0] != 0)
    np.testing.assert_allclose(got[32:], want[32:], rtol=1e-6, atol=0)
    for shape in ((256, 96), (160, 128)):  # N not a multiple of 128; K not a multiple of 128
        qw = quantize_fp4(jnp.ones(shape), (0,), "nvfp4")
        assert kernel_layout(qw) is qw
    params = {"embed": jnp.ones((8, 64)), "layers": [{"wo": quantize_fp4(w, (0, 1), "nvfp4")}]}
    assert isinstance(to_kernel_layout(params)["layers"][0]["wo"], KMajorFP4Weight)


@pytest.mark.timeout(300)
def test_dispatch_routes_fp4_twins_to_the_kernel(monkeypatch):
    """ops.einsum on an fp4 twin gives the XLA path's result through the kernel ("pallas" mode), and
    "auto" on one GPU sends products of up to 64 tokens to it."""
    from jaxllm.ops import matmul

    w = jax.random.normal(jax.random.PRNGKey(4), (256, 128), jnp.float32) * 0.05
    qw = quantize_fp4(w, (0,), "nvfp4")
    twin = kernel_layout(qw)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 256), jnp.bfloat16)
    assert kernel_limits("btd,dn->btn", x, twin) is None
    assert "FP4Weight in its stored layout" in kernel_limits("btd,dn->btn", x, qw)
    assert "65 tokens" in kernel_limits("md,dn->mn", jnp.ones((65, 256), jnp.bfloat16), twin)
    from pallas_kernels import fp4_matmul_kmajor

    ran = []
    kernel = fp4_matmul_kmajor.w4a16_fp4_kmajor
    monkeypatch.setattr(fp4_matmul_kmajor, "w4a16_fp4_kmajor", lambda *a, **kw: ran.append(kw) or kernel(*a, **kw))
    with quantized_kernels("pallas"):
        got = ops.einsum("btd,dn->btn", x, twin)
    assert ran == [dict(interpret=True)]
    _close(got, xla_einsum("btd,dn->btn", x, qw))
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr("jaxllm.kernel_weights.matmul_kernel", lambda x2, w, interpret: calls.append(type(w)) or
                        jnp.zeros((x2.shape[0], 128), x2.dtype))
    assert matmul._quantized_kernel("md,dn->mn", jnp.ones((64, 256), jnp.bfloat16), twin) is not None
    assert calls == [KMajorFP4Weight]


def test_kernel_lowers_for_the_gpu():
    """Both ways of scaling compile to Mosaic GPU at 8B layer shapes, without a GPU (the full grid of
    shapes: benchmarks/quant_matmul_kernels.py --sections lower)."""
    S = jax.ShapeDtypeStruct
    for m, k, n, dtype, scale_at in ((1, 4096, 14336, jnp.float8_e4m3fn, "operand"),
                                     (64, 14336, 4096, jnp.float8_e5m2, "products"),
                                     (16, 4096, 6144, jnp.float16, "operand")):
        f = lambda x, q, s, c: w4a16_fp4_kmajor(x, q, s, c, config=FP4Config(scale_at=scale_at))
        jax.jit(f).trace(S((m, k), jnp.bfloat16), S((n, k), jnp.int4), S((k // 16, n), dtype),
                         S((n,), jnp.float32)).lower(lowering_platforms=("cuda",))


def _call(x_shape=(1, 256), q=((128, 256), jnp.int4), s=((16, 128), jnp.float8_e4m3fn), c=(128,), x_dtype=jnp.bfloat16):
    return lambda: w4a16_fp4_kmajor(jnp.ones(x_shape, x_dtype), jnp.ones(*q), jnp.ones(*s), jnp.ones(c))


@pytest.mark.parametrize("call,match", [
    (_call(q=((128, 256), jnp.uint8)), "dtype uint8 must be a 2-D int4"),
    (_call(x_shape=(1, 128)), r"x of shape \(1, 128\) must be \[M, 256\]"),
    (_call(x_dtype=jnp.int32), "dtype int32"),
    (_call(x_shape=(1, 192), q=((128, 192), jnp.int4), s=((12, 128), jnp.float8_e4m3fn)), "K=192"),
    (_call(q=((96, 256), jnp.int4), s=((16, 96), jnp.float8_e4m3fn), c=(96,)), "N=96"),
    (_call(s=((8, 128), jnp.float8_e4m3fn)), r"block_scale of shape \(8, 128\)"),
    (_call(s=((16, 128), jnp.float32)), "dtype float32"),
    (_call(c=(64,)), r"channel_scale of shape \(64,\)"),
    (_call(x_shape=(65, 256)), "65 tokens"),
    (lambda: w4a16_fp4_kmajor(jnp.ones((1, 256), jnp.bfloat16), jnp.ones((128, 256), jnp.int4),
                              jnp.ones((16, 128), jnp.float16), jnp.ones(128), config=FP4Config(block_k=256)),
     "block_k=256"),
    (lambda: fp4_kmajor(jnp.ones((64, 128), jnp.int8)), "2-D uint8"),
    (lambda: FP4Config(scale_at="accumulator"), "scale_at='accumulator'"),
    (lambda: plan("fp4", 1, 4096, 4096, FP4Config(block_n=64)), "block_n of 128 or 256"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_fp4_weights_are_still_the_stored_layout_on_cpu():
    """On a CPU, "auto" runs no kernel, so LLM keeps FP4Weights (what checkpoints save)."""
    from jaxllm.llm import _in_kernel_layout

    params = {"layers": [{"w": quantize_fp4(jnp.ones((256, 128)), (0,), "nvfp4")}]}
    assert isinstance(_in_kernel_layout(params)["layers"][0]["w"], FP4Weight)
