"""The decode-speed forms of the forward (issue 4) against their textbook forms.

`normed_einsum` computes RMSNorm(x) W as ((x * g) W) / rms(x); the one-token cache write is a
dynamic_update_slice instead of a scatter. Both must give what the textbook forms give.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import ops
from jaxllm.kv_cache import KVCache
from jaxllm.ops.attention import store_kv, write_kv
from jaxllm.ops.matmul import observe_inputs
from models.llama import normed_einsum, rms_norm

EPS = 1e-5


def _inputs(dtype, seed=0):
    kx, kg, kw = jax.random.split(jax.random.key(seed), 3)
    x = (3.0 * jax.random.normal(kx, (2, 5, 64))).astype(dtype)  # un-normalised, as the residual is
    g = (1.0 + 0.3 * jax.random.normal(kg, (64,))).astype(dtype)
    w = (0.1 * jax.random.normal(kw, (64, 3, 2, 8))).astype(dtype)
    return x, g, w


def _textbook(x, g, w):
    return jnp.einsum("btd,dhgk->bthgk", rms_norm(x, g, EPS), w)


def test_normed_einsum_matches_norm_then_product_in_float32():
    x, g, w = _inputs(jnp.float32)
    got = normed_einsum("btd,dhgk->bthgk", x, g, w, EPS)
    want = _textbook(x, g, w)
    assert got.shape == want.shape == (2, 5, 3, 2, 8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_normed_einsum_in_bfloat16_stays_within_bfloat16_rounding():
    x, g, w = _inputs(jnp.bfloat16, seed=1)
    exact = _textbook(*(a.astype(jnp.float32) for a in (x, g, w)))
    got = normed_einsum("btd,dhgk->bthgk", x, g, w, EPS).astype(jnp.float32)
    textbook = _textbook(x, g, w).astype(jnp.float32)
    err_got = float(jnp.max(jnp.abs(got - exact)))
    err_textbook = float(jnp.max(jnp.abs(textbook - exact)))
    assert got.dtype == jnp.float32 and err_got > 0  # a different rounding, not the same numbers
    assert err_got <= 2 * err_textbook + 1e-3, (err_got, err_textbook)


def test_normed_einsum_keeps_the_textbook_order_for_float16_and_calibration():
    x, g, w = _inputs(jnp.float16, seed=2)
    np.testing.assert_array_equal(np.asarray(normed_einsum("btd,dhgk->bthgk", x, g, w, EPS)),
                                  np.asarray(_textbook(x, g, w)))
    x, g, w = _inputs(jnp.bfloat16, seed=3)
    seen = []
    with observe_inputs(lambda subscripts, a, b: seen.append(a)):
        assert ops.observing()
        got = normed_einsum("btd,dhgk->bthgk", x, g, w, EPS)
    assert not ops.observing()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_textbook(x, g, w)))
    np.testing.assert_array_equal(np.asarray(seen[0]), np.asarray(rms_norm(x, g, EPS)))  # normalised


def _scatter(pages, layer, new, page_table, positions):
    from jaxllm.ops.attention import slot_address

    page, slot = slot_address(page_table, positions, pages.shape[2])
    return pages.at[layer, page, slot].set(new.astype(pages.dtype))


@pytest.mark.parametrize("position", [0, 5, 15, 16, 37, -1])
def test_one_token_write_equals_the_scatter(position):
    rng = np.random.default_rng(position + 10)
    pages = jnp.asarray(rng.normal(size=(3, 6, 16, 2, 8)), jnp.float32)
    new = jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32)
    table = jnp.asarray([[4, 2, 5, 0]], jnp.int32)
    positions = jnp.asarray([[position]], jnp.int32)
    for layer in (0, 2, jnp.int32(1)):
        got = jax.jit(write_kv)(pages, layer, new, table, positions)
        want = _scatter(pages, layer, new, table, positions)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert int(jnp.sum(got != pages)) == new.size  # exactly one slot changed


def test_one_token_write_of_quantized_pages_and_their_scales():
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32)
    pages = jnp.zeros((2, 4, 4, 2, 8), jnp.int8)
    scales = jnp.zeros((2, 4, 4, 2), jnp.float32)
    table, positions = jnp.asarray([[3, 1]], jnp.int32), jnp.asarray([[6]], jnp.int32)
    cache = store_kv(KVCache(pages, pages, scales, scales), 1, k, v, table, positions)
    # position 6 is slot 2 of the row's second page, page 1
    restored = cache.k[1, 1, 2].astype(jnp.float32) * cache.k_scale[1, 1, 2][:, None]
    np.testing.assert_allclose(np.asarray(restored), np.asarray(k[0, 0]), atol=float(jnp.max(jnp.abs(k))) / 127)
    assert int(jnp.sum(cache.v != 0)) > 0 and int(jnp.sum(cache.v_scale != 0)) == 2
    untouched = cache.k.at[1, 1, 2].set(0)
    assert int(jnp.sum(untouched != 0)) == 0
