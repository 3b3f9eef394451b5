"""The K-major w8a16 / w4a16 Mosaic GPU kernels against their jnp references in Pallas' GPU
interpret mode (CPU): random codes, scales and zero points at tiny shapes, several token counts, K
and N, stage counts and K splits; the K-major weight twins (jaxllm.kernel_weights) against the
weights they stand for; and the dispatch through `jaxllm.ops.einsum`.

Under the interpreter the register-operand wgmma is a jnp dot of the converted codes; the TMA
pipeline, barriers, K splits, signed int4 codes and the per-group scale and zero-point fold are the
kernel's own. benchmarks/quant_matmul_kernels.py checks the wgmma path at full size on the GPU.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import ops
from jaxllm.kernel_weights import KMajorInt4Weight, KMajorInt8Weight, kernel_layout, to_kernel_layout
from jaxllm.ops.matmul import as_matrix_product, kernel_limits, quantized_kernels
from jaxllm.quantization import dequantize, quantize_int4, quantize_int8, quantize_w8a8
from jaxllm.quantization import einsum as xla_einsum
from pallas_kernels.quant_matmul_kmajor import (
    KMajorConfig,
    bf16_kmajor,
    bf16_kmajor_reference,
    dequantize_int4,
    int4_kmajor,
    int8_kmajor,
    kernel_order,
    plan,
    w4a16_kmajor,
    w4a16_kmajor_reference,
    w8a16_kmajor,
    w8a16_kmajor_reference,
)

pytestmark = pytest.mark.isolated_module(seconds=60)  # see conftest.py


def _close(got, want, tol=2e-2):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=tol)


def _not_close(a, b, tol=2e-2):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b).max() > tol * np.abs(b).max()


def w4a16_stored_reference(x, packed, scale, zero, input_scale):
    """x @ the weight Int4Weight's stored arrays stand for, in float32 (returned in x's dtype)."""
    w = dequantize_int4(packed, scale, zero, input_scale)
    return jnp.dot(x.astype(jnp.float32), w, precision="highest").astype(x.dtype)


INT8_CASES = [  # m, k, n, block_n, block_k, stages, splits
    (1, 256, 128, None, 128, 2, 1),  # two compute warpgroups, two steps
    (5, 384, 64, 64, 128, 2, 2),  # three steps over two splits (2 + 1)
    (9, 512, 256, 256, 256, 1, 1),  # four compute warpgroups; one stage refilled
    (64, 512, 128, 128, 128, 2, 1),  # the most tokens; a slot refilled twice
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("m,k,n,block_n,block_k,stages,splits", INT8_CASES)
def test_w8a16_kmajor_matches_reference(m, k, n, block_n, block_k, stages, splits):
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, (n,)), jnp.float32)
    cfg = KMajorConfig(block_n=block_n, block_k=block_k, num_stages=stages, num_splits=splits)
    got = w8a16_kmajor(x, int8_kmajor(w), scale, config=cfg, interpret=True)
    want = w8a16_kmajor_reference(x, int8_kmajor(w), scale)
    assert got.dtype == x.dtype
    _close(got, want)
    _close(want, (x.astype(jnp.float32) @ (w.astype(jnp.float32) * scale)).astype(jnp.bfloat16))
    # Negative controls: the codes not transposed (read as [N, K] in the wrong order), a K tile dropped.
    assert _not_close(w8a16_kmajor_reference(x, w.reshape(n, k), scale), want)
    assert _not_close(w8a16_kmajor_reference(x, int8_kmajor(w.at[:128].set(0)), scale), want)


BF16_CASES = [  # m, k, n, block_n, stages, splits
    (1, 256, 128, None, 2, 1),  # two compute warpgroups, two steps
    (5, 384, 64, 64, 2, 2),  # three steps over two splits (2 + 1)
    (16, 512, 256, 256, 1, 1),  # four compute warpgroups; one stage refilled
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("m,k,n,block_n,stages,splits", BF16_CASES)
def test_bf16_kmajor_matches_reference(m, k, n, block_n, stages, splits):
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.bfloat16)
    cfg = KMajorConfig(block_n=block_n, num_stages=stages, num_splits=splits)
    got = bf16_kmajor(x, w.T, config=cfg, interpret=True)
    want = bf16_kmajor_reference(x, w.T)
    assert got.dtype == x.dtype
    _close(got, want)
    _close(want, (x.astype(jnp.float32) @ w.astype(jnp.float32)).astype(jnp.bfloat16))
    # Negative controls: the weight read untransposed, a K tile dropped.
    assert _not_close(bf16_kmajor_reference(x, w.reshape(n, k)), want)
    assert _not_close(bf16_kmajor_reference(x, w.at[:128].set(0).T), want)


def test_kernels_lower_for_the_gpu():
    """The wgmma paths (bf16: the weight tile read from shared memory; int8 and int4: upcast loads
    relabelled as wgmma's register operand) lower to Mosaic GPU at the 8B layer shapes, without a GPU."""
    S = jax.ShapeDtypeStruct
    lower = lambda f, *args: jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    for m, k, n in ((1, 4096, 6144), (16, 4096, 4096), (1, 14336, 4096)):
        lower(bf16_kmajor, S((m, k), jnp.bfloat16), S((n, k), jnp.bfloat16))
        lower(w8a16_kmajor, S((m, k), jnp.bfloat16), S((n, k), jnp.int8), S((n,), jnp.float32))
        g = S((k // 128, n), jnp.float32)
        lower(w4a16_kmajor, S((m, k), jnp.bfloat16), S((n, k), jnp.int4), g, S(g.shape, jnp.uint8))


INT4_CASES = [  # m, k, n, awq, block_n, stages, splits
    (1, 256, 128, False, 128, 2, 1),
    (7, 512, 256, True, 256, 3, 2),  # AWQ input scales; four compute warpgroups; two splits
    (24, 384, 128, True, 128, 1, 3),  # one stage; a split per group
    (64, 512, 128, False, 128, 2, 1),  # the most tokens; slots refilled
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("m,k,n,awq,block_n,stages,splits", INT4_CASES)
def test_w4a16_kmajor_matches_reference(m, k, n, awq, block_n, stages, splits):
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    packed = jnp.asarray(rng.integers(0, 256, (k // 2, n)), jnp.uint8)
    scale = jnp.asarray(rng.uniform(1e-2, 1e-1, (k // 128, n)), jnp.float32)
    zero = jnp.asarray(rng.integers(0, 16, (k // 128, n)), jnp.uint8)
    input_scale = jnp.asarray(rng.uniform(0.5, 2.0, (k,)), jnp.float32) if awq else None
    cfg = KMajorConfig(block_n=block_n, num_stages=stages, num_splits=splits)
    q_t = int4_kmajor(packed)
    got = w4a16_kmajor(x, q_t, scale, zero, input_scale, config=cfg, interpret=True)
    want = w4a16_stored_reference(x, packed, scale, zero, input_scale)  # over the stored layout
    assert got.dtype == x.dtype and q_t.dtype == jnp.int4 and q_t.shape == (n, k)
    _close(got, want)
    _close(w4a16_kmajor_reference(x, q_t, scale, zero, input_scale), want, tol=1e-2)
    # Negative controls: nibbles swapped within each byte, zero points off by one.
    swapped = int4_kmajor((packed >> 4) | (packed << 4))
    assert _not_close(w4a16_kmajor_reference(x, swapped, scale, zero, input_scale), want)
    assert _not_close(w4a16_kmajor_reference(x, q_t, scale, (zero + 1) % 16, input_scale), want)


@pytest.mark.timeout(300)
def test_w4a16_kmajor_result_does_not_depend_on_the_pipeline_depth():
    """One to four tiles in flight, slots reused or not: bitwise the same output (the kernel's
    arithmetic is fixed by the steps and splits; only the overlap changes)."""
    rng = np.random.default_rng(5)
    k, n, m = 512, 128, 3
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    packed = jnp.asarray(rng.integers(0, 256, (k // 2, n)), jnp.uint8)
    scale = jnp.asarray(rng.uniform(1e-2, 1e-1, (k // 128, n)), jnp.float32)
    zero = jnp.asarray(rng.integers(0, 16, (k // 128, n)), jnp.uint8)
    q_t = int4_kmajor(packed)
    run = lambda stages: np.asarray(w4a16_kmajor(x, q_t, scale, zero, config=KMajorConfig(
        num_stages=stages, num_splits=1), interpret=True).astype(jnp.float32))
    first = run(4)  # four steps, no slot reused
    _close(jnp.asarray(first), w4a16_stored_reference(x, packed, scale, zero, None))
    for stages in (1, 3):
        np.testing.assert_array_equal(run(stages), first)


def test_int4_dequantization_recovers_the_weight_within_half_a_step():
    """The stored layout's dequantization (jaxllm.quantization's too) inverts quantize_int4: each entry
    within half a quantization step (scale / 2, divided by its input scale)."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
    s = jnp.asarray(rng.uniform(0.5, 2.0, (256,)), jnp.float32)
    q = quantize_int4(w, (0,), 128, s)
    got = np.asarray(dequantize_int4(q.packed, q.scale, q.zero, q.input_scale))
    step = np.repeat(np.asarray(q.scale), 128, axis=0) / np.asarray(s)[:, None]
    assert np.all(np.abs(got - np.asarray(w)) <= step / 2 + 1e-6)
    assert not np.all(np.abs(got[::-1] - np.asarray(w)) <= step / 2 + 1e-6)  # a wrong order fails


def test_dispatch_leaves_other_products_to_xla():
    x = jnp.ones((2, 256), jnp.bfloat16)
    assert "stored layout" in kernel_limits("md,dn->mn", x, quantize_int8(jnp.ones((256, 128)), (0,)))
    twin = kernel_layout(quantize_int8(jnp.ones((256, 128)), (0,)))
    assert "not x [..., K] @ W [K, N]" in kernel_limits("...n,dn->...d", jnp.ones((2, 128), jnp.bfloat16), twin)
    assert "float32 activations" in kernel_limits("md,dn->mn", x.astype(jnp.float32), twin)
    assert "W8A8Weight" in kernel_limits("md,dn->mn", x, quantize_w8a8(jnp.ones((256, 128)), (0,)))
    assert as_matrix_product("bthgk,hgkd->btd", (2, 1, 8, 4, 128), (8, 4, 128, 4096)) == (2, 4096, 4096, (2, 1, 4096))
    assert as_matrix_product("...d,dv->...v", (3, 1, 64), (64, 100)) == (3, 64, 100, (3, 1, 100))
    with pytest.raises(ValueError, match="'gpu'"), quantized_kernels("gpu"):
        pass


def test_twins_stand_for_the_same_weights():
    """kernel_layout's twins dequantize to exactly the original quantized weight, multiply like it
    through XLA, and weights the kernels cannot take stay as they were."""
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.standard_normal((4, 64, 128)) * 0.05, jnp.float32)  # [heads, head_dim, d]
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 64)), jnp.bfloat16)
    awq = jnp.asarray(rng.uniform(0.5, 2.0, (256,)), jnp.float32)  # input scales, in the inputs' order
    for qw, kind in ((quantize_int8(w, (0, 1)), KMajorInt8Weight), (quantize_int4(w, (0, 1), 128), KMajorInt4Weight),
                     (quantize_int4(w, (0, 1), 128, input_scale=awq), KMajorInt4Weight)):
        twin = kernel_layout(qw)
        assert isinstance(twin, kind) and twin.shape == (4, 64, 128) and twin.q_t.shape == (128, 256)
        np.testing.assert_array_equal(np.asarray(dequantize(twin)), np.asarray(dequantize(qw)))
        got, want = xla_einsum("bthk,hkd->btd", x, twin), xla_einsum("bthk,hkd->btd", x, qw)
        assert got.shape == want.shape == (2, 3, 128)
        _close(got, want, tol=1e-2)
    untouched = [quantize_int8(jnp.ones((64, 96)), (0,)),  # N not a multiple of 64
                 quantize_int4(jnp.ones((128, 128)), (0,), 64),  # groups of 64
                 quantize_int8(jnp.ones((2, 64, 128)), (1,))]  # stacked layers: K not leading
    for qw in untouched:
        assert kernel_layout(qw) is qw
    params = {"embed": jnp.ones((8, 64)), "layers": [{"wo": quantize_int8(w, (0, 1))}]}
    converted = to_kernel_layout(params)
    assert isinstance(converted["layers"][0]["wo"], KMajorInt8Weight) and converted["embed"] is params["embed"]


def test_kernel_order_puts_each_lanes_operand_inputs_in_its_words():
    """Within 32 inputs (int4) or 16 (int8), stored position 8q + 4e + p (int4) or 8b + 4a + 2p + e
    (int8) holds input 8p + 2q + e or 8p + 4a + 2b + e: the inputs wgmma's register operand takes from
    lane q = 2a + b, in the words the upcast load gives that lane (int4's pair p in nibbles p and
    p + 4, where the folded conversion takes them). `inverse` undoes it; fp8 codes and lengths no
    kernel takes keep their order."""
    stored4 = np.asarray(kernel_order(jnp.arange(64), 0, "int4"))
    stored8 = np.asarray(kernel_order(jnp.arange(32), 0, "int8"))
    for block in range(2):
        for p_, q_, e in itertools.product(range(4), range(4), range(2)):
            assert stored4[32 * block + 8 * q_ + 4 * e + p_] == 32 * block + 8 * p_ + 2 * q_ + e
        for a, b, p_, e in itertools.product(range(2), repeat=4):
            assert stored8[16 * block + 8 * b + 4 * a + 2 * p_ + e] == 16 * block + 8 * p_ + 4 * a + 2 * b + e
    x = jnp.asarray(np.random.default_rng(8).standard_normal((3, 256)), jnp.float32)
    for kind in ("int4", "int8"):
        assert not np.array_equal(kernel_order(x, 1, kind), x)
        np.testing.assert_array_equal(kernel_order(kernel_order(x, 1, kind), 1, kind, inverse=True), x)
        np.testing.assert_array_equal(kernel_order(kernel_order(x, 1, kind, inverse=True), 1, kind), x)
        np.testing.assert_array_equal(kernel_order(x.T, 0, kind), kernel_order(x, 1, kind).T)
    assert not np.array_equal(kernel_order(x, 1, "int4", inverse=True), kernel_order(x, 1, "int4"))
    np.testing.assert_array_equal(kernel_order(x, 1, "fp8"), x)
    np.testing.assert_array_equal(kernel_order(x[:, :24], 1, "int8"), x[:, :24])
    with pytest.raises(ValueError, match="kind 'int9': choose one of"):
        kernel_order(x, 1, "int9")


@pytest.mark.timeout(300)
def test_dispatch_routes_twins_to_the_kmajor_kernels(monkeypatch):
    """ops.einsum on K-major twins gives the XLA path's result through the kernels ("pallas" mode),
    and "auto" on one GPU sends one-token int8 and up to 64-token int4 products to them."""
    from jaxllm.ops import matmul

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((256, 128)) * 0.05, jnp.float32)
    for qw in (quantize_int8(w, (0,)), quantize_int4(w, (0,), 128)):
        twin = kernel_layout(qw)
        assert kernel_limits("btd,dn->btn", x, twin) is None
        with quantized_kernels("pallas"):
            got = ops.einsum("btd,dn->btn", x, twin)
        _close(got, xla_einsum("btd,dn->btn", x, qw))
    big = jnp.ones((65, 256), jnp.bfloat16)
    assert "65 tokens" in kernel_limits("md,dn->mn", big, kernel_layout(quantize_int8(w, (0,))))

    from jaxllm.llm import _in_kernel_layout

    params = {"layers": [{"w": quantize_int8(w, (0,))}]}
    assert _in_kernel_layout(params) is params  # on a CPU "auto" runs no kernel: the stored layout stays
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert isinstance(_in_kernel_layout(params)["layers"][0]["w"], KMajorInt8Weight)  # one GPU: re-laid
    monkeypatch.setattr("jaxllm.kernel_weights.matmul_kernel", lambda x2, w, interpret: calls.append(type(w)) or
                        jnp.zeros((x2.shape[0], 128), x2.dtype))
    int8, int4 = kernel_layout(quantize_int8(w, (0,))), kernel_layout(quantize_int4(w, (0,), 128))
    assert matmul._quantized_kernel("md,dn->mn", jnp.ones((1, 256), jnp.bfloat16), int8) is not None
    assert matmul._quantized_kernel("md,dn->mn", jnp.ones((2, 256), jnp.bfloat16), int8) is None  # XLA's fusion
    assert matmul._quantized_kernel("md,dn->mn", jnp.ones((16, 256), jnp.bfloat16), int4) is not None
    assert calls == [KMajorInt8Weight, KMajorInt4Weight]


def test_plan_defaults():
    p = plan("int8", 1, 4096, 14336)
    assert (p.block_n, p.block_k, p.tokens, p.steps) == (128, 128, 8, 32)
    assert p.smem_bytes() <= 227 * 1024 and p.num_stages >= 2 and p.num_splits == 2
    q = plan("int4", 64, 14336, 4096)
    assert (q.block_n, q.block_k, q.tokens, q.steps) == (128, 128, 64, 112)
    assert q.smem_bytes() <= 227 * 1024 and q.num_splits > 1
    assert plan("int4", 1, 4096, 28672).num_stages == 4  # MAX_STAGES; int8 takes what its budget fits:
    assert plan("int8", 1, 4096, 28672).num_stages == 5


@pytest.mark.parametrize("call,match", [
    (lambda: w8a16_kmajor(jnp.ones((2, 128), jnp.bfloat16), jnp.ones((64, 128), jnp.int16), jnp.ones(64)), "int8"),
    (lambda: w8a16_kmajor(jnp.ones((2, 64), jnp.bfloat16), jnp.ones((64, 128), jnp.int8), jnp.ones(64)), r"\[M, 128\]"),
    (lambda: w8a16_kmajor(jnp.ones((2, 128), jnp.bfloat16), jnp.ones((64, 128), jnp.int8), jnp.ones(32)), "one value"),
    (lambda: w8a16_kmajor(jnp.ones((2, 128), jnp.bfloat16), jnp.ones((96, 128), jnp.int8), jnp.ones(96)), "N=96"),
    (lambda: w8a16_kmajor(jnp.ones((65, 128), jnp.bfloat16), jnp.ones((64, 128), jnp.int8), jnp.ones(64)), "65 tokens"),
    (lambda: w8a16_kmajor(jnp.ones((1, 192), jnp.bfloat16), jnp.ones((64, 192), jnp.int8), jnp.ones(64)), "K=192"),
    (lambda: w4a16_kmajor(jnp.ones((1, 256), jnp.bfloat16), jnp.ones((128, 256), jnp.int4),
                          jnp.ones((4, 128)), jnp.ones((4, 128), jnp.uint8)), "groups of 128"),
    (lambda: w4a16_kmajor(jnp.ones((1, 256), jnp.bfloat16), jnp.ones((128, 256), jnp.uint8),
                          jnp.ones((2, 128)), jnp.ones((2, 128), jnp.uint8)), "int4"),
    (lambda: w4a16_kmajor(jnp.ones((1, 256), jnp.bfloat16), jnp.ones((64, 256), jnp.int4),
                          jnp.ones((2, 64)), jnp.ones((2, 64), jnp.uint8)), "block_n of 128 or 256"),
    (lambda: bf16_kmajor(jnp.ones((1, 128), jnp.bfloat16), jnp.ones((64, 128), jnp.float32)), "2-D bfloat16"),
    (lambda: bf16_kmajor(jnp.ones((1, 128), jnp.bfloat16), jnp.ones((64, 192), jnp.bfloat16)), r"\[M, 192\]"),
    (lambda: int8_kmajor(jnp.ones((64, 128), jnp.float32)), "2-D int8"),
    (lambda: int8_kmajor(jnp.ones((2, 64, 128), jnp.int8)), "2-D int8"),
    (lambda: int4_kmajor(jnp.ones((64, 128), jnp.int8)), "2-D uint8"),
    (lambda: KMajorConfig(block_n=96), "block_n=96"),
    (lambda: KMajorConfig(block_k=64), "block_k=64"),
    (lambda: plan("int4", 1, 4096, 4096, KMajorConfig(block_k=256)), "one group of 128 inputs, not block_k=256"),
    (lambda: plan("int8", 64, 4096, 4096, KMajorConfig(num_stages=8)), "num_stages=8"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()

