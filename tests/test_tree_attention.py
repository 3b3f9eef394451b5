"""paged_tree_attention (the tree's keys from the step's own K/V) against attention over the pages
after the tree was stored (its keys read back from their slots, masked per query)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kv_cache import AttentionMeta, KVCache
from jaxllm.ops import kv_quant
from jaxllm.ops.attention import gather_pages, store_kv
from jaxllm.ops.tree_attention import paged_tree_attention
from jaxllm.speculative.medusa import default_tree

B, HKV, G, D, PAGE, PMAX = 2, 2, 2, 16, 8, 8


def _reference(q, cache, page_table, positions, start, tree_mask, window, scale):
    """softmax over slots: those before start (within the window), and tree slot start + u where
    tree_mask[t, u]; keys and values read from the pages."""
    k = np.asarray(gather_pages(cache.k, cache.k_scale, 0, page_table, q.dtype), np.float64)
    v = np.asarray(gather_pages(cache.v, cache.v_scale, 0, page_table, q.dtype), np.float64)
    q = np.asarray(q, np.float64)
    t = q.shape[1]
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for i in range(t):
            slots = [s for s in range(start[b]) if window <= 0 or s > positions[b, i] - window]
            slots += [start[b] + u for u in range(t) if tree_mask[i, u]]
            s = np.einsum("hgd,shd->hgs", q[b, i], k[b, slots]) * scale
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, i] = np.einsum("hgs,shd->hgd", p / p.sum(-1, keepdims=True), v[b, slots])
    return out


@pytest.mark.parametrize("kv_dtype, window", [("auto", 0), ("auto", 5), ("int8", 0), ("fp8_e4m3", 0)])
def test_tree_attention_matches_attention_over_stored_slots(kv_dtype, window):
    tree = default_tree(2)
    t = tree.num_nodes
    rng = np.random.default_rng(0)
    num_pages = B * PMAX + 1
    page_table = jnp.asarray(rng.permutation(np.arange(1, num_pages))[: B * PMAX].reshape(B, PMAX), jnp.int32)
    start = np.array([7, 13], np.int32)  # prefix lengths; the tree fills slots start .. start + t - 1
    assert start.max() + t <= PMAX * PAGE
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    shape = (1, num_pages, PAGE, HKV, D)
    k_pages, v_pages = (jax.random.normal(x, shape, jnp.float32) for x in keys[:2])
    cache = KVCache(k_pages, v_pages)
    if kv_dtype != "auto":  # the prefix as a quantized cache holds it
        (kq, ks), (vq, vs) = (kv_quant.quantize(x, kv_dtype) for x in (k_pages, v_pages))
        cache = KVCache(kq, vq, ks, vs)
    q = jax.random.normal(keys[2], (B, t, HKV, G, D), jnp.float32)
    k, v = (jax.random.normal(x, (B, t, HKV, D), jnp.float32) for x in keys[3:5])
    positions = jnp.asarray(start[:, None] + tree.depth[None], jnp.int32)
    slots = jnp.asarray(start[:, None] + np.arange(t)[None], jnp.int32)
    cache = store_kv(cache, 0, k, v, page_table, slots)
    got = paged_tree_attention(q, k, v, cache, 0, page_table, positions, jnp.asarray(start),
                               jnp.asarray(tree.ancestor_mask), window, scale=D**-0.5)
    want = _reference(q, cache, page_table, np.asarray(positions), start, tree.ancestor_mask, window, D**-0.5)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-5)
    # A padding row (start -1) sees nothing and stays finite.
    pad = paged_tree_attention(q[:1], k[:1], v[:1], cache, 0, page_table[:1], positions[:1] * 0 - 1,
                               jnp.array([-1], jnp.int32), jnp.asarray(tree.ancestor_mask), scale=D**-0.5)
    assert np.all(np.isfinite(np.asarray(pad)))


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "fp8_e4m3"])
def test_store_kv_layers_equals_store_kv_layer_by_layer(kv_dtype):
    from jaxllm.ops import store_kv_layers

    layers, t = 3, 5
    rng = np.random.default_rng(1)
    page_table = jnp.asarray(rng.permutation(np.arange(1, B * PMAX + 1)).reshape(B, PMAX), jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    shape = (layers, B * PMAX + 1, PAGE, HKV, D)
    cache = KVCache(*(jax.random.normal(x, shape, jnp.float32) for x in keys[:2]))
    if kv_dtype != "auto":
        (kq, ks), (vq, vs) = (kv_quant.quantize(x, kv_dtype) for x in cache[:2])
        cache = KVCache(kq, vq, ks, vs)
    k, v = (jax.random.normal(x, (layers, B, t, HKV, D), jnp.float32) for x in keys[2:])
    positions = jnp.asarray([[3, 4, 5, 6, -1], [17, 18, -1, -1, -1]], jnp.int32)  # -1: not stored
    got = store_kv_layers(cache, k, v, page_table, positions)
    want = cache
    for layer in range(layers):
        want = store_kv(want, layer, k[layer], v[layer], page_table, positions)
    for a, b in zip(got, want):  # page 0 is scratch: padding writes land there in any order
        assert (a is None) == (b is None)
        if a is None:
            continue
        np.testing.assert_array_equal(np.asarray(a[:, 1:], np.float32), np.asarray(b[:, 1:], np.float32))
    assert not np.array_equal(np.asarray(got.k[:, 1:], np.float32), np.asarray(cache.k[:, 1:], np.float32))
    with pytest.raises(ValueError, match=r"must both be \[layers, batch, tokens, kv_heads, head_dim\]"):
        store_kv_layers(cache, k[:2], v[:2], page_table, positions)  # two layers for a three-layer cache


def test_forward_hidden_refuses_a_tree():
    from models import llama

    meta = AttentionMeta(jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 1), jnp.int32), jnp.ones(1, jnp.int32),
                         jnp.zeros(1, jnp.int32), jnp.ones((2, 2), bool))
    with pytest.raises(ValueError, match="runs through forward_tree"):
        llama.forward_hidden({}, jnp.zeros((1, 2), jnp.int32), meta, None, None)
    with pytest.raises(ValueError, match="forward_tree needs a cache"):
        llama.forward_tree({}, jnp.zeros((1, 2), jnp.int32), meta._replace(tree_mask=None), None, None)


def test_attend_sends_long_chunks_to_cudnn_on_gpus(monkeypatch):
    """On a GPU, chunks of CUDNN_MIN_QUERIES tokens or more go to jax.nn.dot_product_attention's
    cuDNN implementation with query heads in KV-head-major order; shorter chunks, or shapes cuDNN
    refuses at trace time, take XLA's ops. Here jax's XLA implementation stands in for cuDNN."""
    from jaxllm.ops import attention

    real = jax.nn.dot_product_attention
    calls = []

    def stand_in(q, k, v, *, mask, scale, implementation):
        calls.append((q.shape, mask.shape, implementation))
        return real(q, k, v, mask=mask, scale=scale, implementation="xla")

    def refuses(*args, **kwargs):
        calls.append("refused")
        raise NotImplementedError("head dim")

    t_long, t_short, s = attention.CUDNN_MIN_QUERIES, 8, 48
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(keys[0], (1, t_long, HKV, G, D), jnp.bfloat16)
    k, v = (jax.random.normal(x, (1, s, HKV, D), jnp.bfloat16) for x in keys[1:])
    visible = jnp.arange(s)[None, None, :] <= (s - t_long + jnp.arange(t_long))[None, :, None]
    want = np.asarray(attention._attend(q, k, v, visible, D**-0.5), np.float32)  # CPU: XLA's ops
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    got = np.asarray(attention._attend(q, k, v, visible, D**-0.5), np.float32)
    assert calls == [((1, t_long, HKV * G, D), (1, 1, t_long, s), "cudnn")]
    np.testing.assert_allclose(got, want, atol=2e-2)
    calls.clear()
    attention._attend(q[:, :t_short], k, v, visible[:, :t_short], D**-0.5)
    assert calls == []  # decode-sized chunks stay on XLA
    attention._attend(q, k, v, visible, D**-0.5, backend="xla")
    assert calls == []  # so does attention_backend="xla" (and tensor parallelism, which sets it)
    monkeypatch.setattr(jax.nn, "dot_product_attention", refuses)
    got = np.asarray(attention._attend(q, k, v, visible, D**-0.5), np.float32)
    assert calls == ["refused"]
    np.testing.assert_array_equal(got, want)
