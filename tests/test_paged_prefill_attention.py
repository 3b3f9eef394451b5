"""The Mosaic GPU paged prefill-attention kernel against its jnp reference, in Pallas' GPU interpret
mode (CPU): chunks after cached prefixes, ragged chunk lengths, padding rows, windows, page sizes,
and GQA group sizes. (Under the interpreter the two products are jnp dots: see
tests/test_paged_decode_attention.py.)"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_prefill_attention import (PrefillConfig, paged_prefill_attention,
                                                    paged_prefill_attention_reference)

pytestmark = pytest.mark.isolated_module(seconds=60)  # see conftest.py


def _inputs(seed, groups, tokens, starts, counts, page_size, pmax, kv_heads=2, head_dim=64, layers=2):
    rng = np.random.default_rng(seed)
    batch = len(starts)
    num_pages = batch * pmax + 2
    q = jnp.asarray(rng.standard_normal((batch, tokens, kv_heads, groups, head_dim)), jnp.bfloat16)
    shape = (layers, num_pages, page_size, kv_heads, head_dim)
    k = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    table = jnp.asarray((1 + rng.permutation(num_pages - 1)[:batch * pmax]).reshape(batch, pmax), jnp.int32)
    t = np.arange(tokens)[None]
    positions = np.where(t < np.array(counts)[:, None], np.array(starts)[:, None] + t, -1)
    lens = np.array(starts) + np.array(counts)
    return q, k, v, table, jnp.asarray(positions, jnp.int32), jnp.asarray(lens, jnp.int32)


# The interpreter's time grows with the grid: one KV head where a second adds no path (the first
# case keeps two, for the head index into every operand).
CASES = [  # groups, tokens, starts, counts, page_size, pmax, window, block_kv, stages, kv_heads
    (4, 32, [0, 40], [32, 20], 16, 8, 0, 64, 2, 2),  # a whole prompt; a chunk after a 40-token prefix
    (8, 16, [5, 0, 100], [16, 3, 9], 16, 8, 0, 64, 3, 1),  # ragged chunks, 8 heads a group
    (4, 32, [70, 0], [30, 32], 16, 8, 24, 64, 2, 1),  # sliding window across the prefix
    (2, 64, [0, 0], [64, 0], 64, 2, 0, 128, 2, 1),  # a row of padding only; big pages and tiles
    (1, 40, [17], [40], 8, 8, 0, 64, 2, 1),  # one head a group: 64 tokens a warpgroup, T padded
    (4, 64, [127, 100], [64, 50], 16, 16, 0, 64, 2, 1),  # long prefixes: unmasked tiles, then the diagonal
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("groups,tokens,starts,counts,page_size,pmax,window,block_kv,stages,kv_heads", CASES)
def test_kernel_matches_reference(groups, tokens, starts, counts, page_size, pmax, window, block_kv, stages,
                                  kv_heads):
    q, k, v, table, positions, lens = _inputs(groups + tokens, groups, tokens, starts, counts, page_size, pmax,
                                              kv_heads=kv_heads)
    cfg = PrefillConfig(block_kv=block_kv, num_stages=stages)
    got = paged_prefill_attention(q, k, v, 1, table, positions, lens, window, scale=0.125, config=cfg,
                                  interpret=True)
    want = paged_prefill_attention_reference(q, k, v, 1, table, positions, lens, window, scale=0.125)
    assert got.shape == want.shape == q.shape
    valid = np.asarray(positions) >= 0
    got, want = np.asarray(got, np.float32)[valid], np.asarray(want, np.float32)[valid]
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=1e-2)
    # Negative controls: non-causal attention over the chunk, or another layer, break the bound.
    no_causal = paged_prefill_attention_reference(q, k, v, 1, table, jnp.where(positions >= 0, lens[:, None] - 1, -1),
                                                  lens, window, scale=0.125)
    assert not np.allclose(np.asarray(no_causal, np.float32)[valid], want, atol=2e-2, rtol=1e-2)
    other = paged_prefill_attention_reference(q, k, v, 0, table, positions, lens, window, scale=0.125)
    assert not np.allclose(np.asarray(other, np.float32)[valid], want, atol=2e-2, rtol=1e-2)


def test_reference_padding_rows_are_zero():
    q, k, v, table, positions, lens = _inputs(0, 4, 16, [3], [5], 16, 2)
    out = np.asarray(paged_prefill_attention_reference(q, k, v, 0, table, positions, lens, scale=0.1))
    assert np.all(out[0, 5:] == 0) and np.all(np.abs(out[0, :5]).sum(-1) > 0)


@pytest.mark.parametrize("groups,match", [(3, "divisor of 64"), (128, "divisor of 64")])
def test_kernel_rejects_group_sizes_it_cannot_tile(groups, match):
    q, k, v, table, positions, lens = _inputs(0, groups, 8, [0], [8], 16, 2, kv_heads=1)
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention(q, k, v, 0, table, positions, lens, scale=1.0, interpret=True)


def test_config_validation():
    with pytest.raises(ValueError, match="block_kv=32"):
        PrefillConfig(block_kv=32)
