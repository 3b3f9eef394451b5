"""`jaxllm.ops.top_k` (k argmax passes) against `jax.lax.top_k`: values and indices equal, ties
to the lower index, -inf entries, and bad k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import ops


@pytest.mark.parametrize("shape,k,dtype", [((3, 1000), 10, jnp.float32), ((2, 3, 257), 1, jnp.bfloat16),
                                           ((1, 64), 16, jnp.float32), ((4, 40), 17, jnp.float32)])
def test_matches_lax_top_k(shape, k, dtype):
    x = jax.random.normal(jax.random.key(k), shape).astype(dtype)
    got, want = ops.top_k(x, k), jax.lax.top_k(x, k)
    assert got[1].dtype == jnp.int32 and got[0].dtype == dtype
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))


def test_ties_go_to_the_lower_index_and_minus_infinity_is_ranked():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 4, size=(5, 50)), jnp.float32)  # many ties
    x = x.at[0, :].set(-jnp.inf).at[0, 7].set(2.0).at[1, 3:].set(-jnp.inf)
    got, want = ops.top_k(x, 12), jax.lax.top_k(x, 12)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert len(set(np.asarray(got[1][0]).tolist())) == 12  # no index taken twice, even among -inf


@pytest.mark.parametrize("k", [0, 51, 2.0, True])
def test_bad_k_names_the_allowed_range(k):
    with pytest.raises(ValueError, match=r"must be an integer in \[1, 50\]"):
        ops.top_k(jnp.zeros((2, 50)), k)
