"""The residual-add + RMSNorm-factors kernel (pallas_kernels/add_rms_norm.py) against its jnp
reference in Pallas' GPU interpret mode (CPU), its lowering for the GPU, the dispatch through
`jaxllm.ops.add_rms_norm`, and its bad input. `benchmarks/xla_flags.py` (variant "unfused_norm")
measures it end to end on the GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.ops import norm
from pallas_kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference

pytestmark = pytest.mark.isolated_module  # see conftest.py


def _rows(rows, d, dtype, seed):
    kx, kd, kg = jax.random.split(jax.random.key(seed), 3)
    x = (4.0 * jax.random.normal(kx, (rows, d))).astype(dtype)
    delta = jax.random.normal(kd, (rows, d)).astype(dtype)
    g = (1.0 + 0.2 * jax.random.normal(kg, (d,))).astype(dtype)
    return x, delta, g


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rows,d,dtype,seed", [(1, 512, jnp.bfloat16, 0), (3, 256, jnp.bfloat16, 1),
                                               (2, 1024, jnp.float16, 2)])
def test_kernel_matches_reference(rows, d, dtype, seed):
    x, delta, g = _rows(rows, d, dtype, seed)
    got = add_rms_norm(x, delta, g, eps=1e-5, interpret=True)
    want = add_rms_norm_reference(x, delta, g, eps=1e-5)
    for a, b in zip(got[:2], want[:2]):  # the add and g * h round the same way
        assert a.dtype == dtype and a.shape == (rows, d)
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert got[2].shape == (rows,) and got[2].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), rtol=1e-6)
    # and the statistics are those of h = x + delta, not of x
    h32 = (x + delta).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(got[2]), 1 / np.sqrt(np.mean(np.square(np.asarray(h32)), -1) + 1e-5),
                               rtol=1e-5)
    assert not np.allclose(np.asarray(got[2]), np.asarray(add_rms_norm_reference(x, 0 * delta, g, eps=1e-5)[2]))


@pytest.mark.timeout(300)
def test_kernel_lowers_for_the_gpu():
    S = jax.ShapeDtypeStruct
    f = jax.jit(lambda x, d, g: add_rms_norm(x, d, g, eps=1e-5))
    text = f.trace(S((1, 4096), jnp.bfloat16), S((1, 4096), jnp.bfloat16), S((4096,), jnp.bfloat16)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_bad_input_names_the_problem():
    x, delta, g = _rows(2, 256, jnp.bfloat16, 3)
    with pytest.raises(ValueError, match=r"delta \(2, 128\)"):
        add_rms_norm(x, delta[:, :128], g, eps=1e-5)
    with pytest.raises(ValueError, match=r"weight of shape \(128,\) must be \(256,\)"):
        add_rms_norm_reference(x, delta, g[:128], eps=1e-5)
    with pytest.raises(ValueError, match="multiple of 256"):
        add_rms_norm(x[:, :200], delta[:, :200], g[:200], eps=1e-5)
    with pytest.raises(ValueError, match="65 rows"):
        add_rms_norm(jnp.zeros((65, 256), jnp.bfloat16), jnp.zeros((65, 256), jnp.bfloat16), g, eps=1e-5)
    with pytest.raises(ValueError, match="float32"):
        add_rms_norm(x.astype(jnp.float32), delta, g, eps=1e-5)


def test_dispatch_takes_the_kernel_only_on_a_gpu_for_few_bf16_rows(monkeypatch):
    assert not norm.kernel_applies((1, 4096), jnp.bfloat16, "auto")  # this machine has no GPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert norm.kernel_applies((1, 4096), jnp.bfloat16, "auto")
    assert norm.kernel_applies((norm.ADD_NORM_KERNEL_MAX_ROWS, 4096), jnp.bfloat16, "pallas")
    assert not norm.kernel_applies((norm.ADD_NORM_KERNEL_MAX_ROWS + 1, 4096), jnp.bfloat16, "auto")
    assert not norm.kernel_applies((1, 4096), jnp.bfloat16, "xla")
    assert not norm.kernel_applies((1, 4096), jnp.float32, "auto")
    assert not norm.kernel_applies((1, 4000), jnp.bfloat16, "auto")


def test_ops_entry_keeps_leading_axes():
    x, delta, g = _rows(6, 256, jnp.float32, 4)
    h, gh, inv = norm.add_rms_norm(x.reshape(2, 3, 256), delta.reshape(2, 3, 256), g, 1e-5)
    assert h.shape == gh.shape == (2, 3, 256) and inv.shape == (2, 3)
    want = add_rms_norm_reference(x, delta, g, eps=1e-5)
    np.testing.assert_allclose(np.asarray(inv).ravel(), np.asarray(want[2]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gh).reshape(6, 256), np.asarray(want[1]), rtol=1e-6)
