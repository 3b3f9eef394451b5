"""The Mosaic GPU paged decode-attention kernel against its jnp reference, in Pallas' GPU
interpret mode (CPU): random page tables, ragged lengths, windows, splits and page sizes, over
bf16 pages and over int8 / fp8 (e4m3) pages with random per-token scales.

The interpreter's wgmma takes neither transposed nor register operands, so under it the kernel's
two products are jnp dots; the TMA page copies, barriers, pipeline, masking, online softmax and
the split merge are the kernel's own. The GPU run (benchmarks/attention.py) checks the wgmma path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.kv_cache import KVCache
from jaxllm.ops.attention import STORE_IN_KERNEL_MAX_BATCH, kernel_limits, paged_attention, store_and_attend, store_kv
from jaxllm.ops.kv_quant import dequantize, quantize
from jaxllm.tiny_checkpoint import write_tiny_checkpoint
from pallas_kernels.paged_decode_attention import (DecodeConfig, choose_splits, paged_decode_attention,
                                                   paged_decode_attention_append,
                                                   paged_decode_attention_append_reference,
                                                   paged_decode_attention_reference)

pytestmark = pytest.mark.isolated_module(seconds=215)  # see conftest.py


def _inputs(seed, batch, kv_heads, groups, head_dim, page_size, pmax, lens, layers=2):
    rng = np.random.default_rng(seed)
    num_pages = batch * pmax + 3
    table = (1 + rng.permutation(num_pages - 1)[:batch * pmax]).reshape(batch, pmax)
    shape = (layers, num_pages, page_size, kv_heads, head_dim)
    q = jnp.asarray(rng.standard_normal((batch, kv_heads, groups, head_dim)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    return q, k, v, jnp.asarray(table, jnp.int32), jnp.asarray(lens, jnp.int32)


CASES = [  # groups, page_size, pmax, lens, window, block_kv, stages, splits, kv_heads
    # (The interpreter's time goes with the grid, rows x KV heads x splits: most cases have one KV head.)
    (4, 16, 8, [100, 7, 128], 0, 64, 2, 3, 1),  # splits, one of them empty for the short row
    (4, 16, 8, [100, 70, 128], 50, 64, 3, 2, 1),  # sliding window: the first keys are masked
    (8, 8, 16, [1, 128, 65], 0, 64, 4, 2, 1),  # 8 pages per tile, a 1-token context
    (2, 128, 2, [200, 129, 0], 0, 64, 2, 2, 2),  # pages larger than a tile; an empty (padding) row; two
    # KV heads (with one, this case's one-key-fewer control falls within the bound)
    (1, 64, 3, [192, 3, 64], 0, 128, 2, 1, 1),  # one split; MQA-like single group, 128-key tiles
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("groups,page_size,pmax,lens,window,block_kv,stages,splits,kv_heads", CASES)
def test_kernel_matches_reference(groups, page_size, pmax, lens, window, block_kv, stages, splits, kv_heads):
    q, k, v, table, lens = _inputs(len(lens) + groups, len(lens), kv_heads, groups, 64, page_size, pmax, lens)
    cfg = DecodeConfig(block_kv=block_kv, num_stages=stages, num_splits=splits)
    got = paged_decode_attention(q, k, v, 1, table, lens, window, scale=0.125, config=cfg, interpret=True)
    want = paged_decode_attention_reference(q, k, v, 1, table, lens, window, scale=0.125)
    assert got.shape == want.shape == q.shape
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=8e-3, rtol=1e-2)
    # The bound catches one key too few or another layer's pages (negative controls).
    shorter = paged_decode_attention_reference(q, k, v, 1, table, jnp.maximum(lens - 1, 0), window, scale=0.125)
    assert not np.allclose(np.asarray(shorter, np.float32), want, atol=8e-3, rtol=1e-2)
    other = np.asarray(paged_decode_attention_reference(q, k, v, 0, table, lens, window, scale=0.125), np.float32)
    assert not np.allclose(other, want, atol=8e-3, rtol=1e-2)


APPEND_CASES = [  # groups, page_size, pmax, lens, window, block_kv, stages, splits, kv_heads
    (4, 16, 8, [100, 7, 128], 0, 64, 2, 3, 1),  # splits: the token is the last of a middle split for row 1
    (8, 8, 16, [1, 128, 65], 0, 64, 4, 2, 2),  # a 1-token context (only the new token); 8 pages a tile; 2 KV heads
    (2, 128, 2, [200, 129, 0], 50, 64, 2, 2, 1),  # pages larger than a tile, a window; an empty row
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("groups,page_size,pmax,lens,window,block_kv,stages,splits,kv_heads", APPEND_CASES)
def test_append_kernel_stores_the_token_and_matches_reference(groups, page_size, pmax, lens, window, block_kv,
                                                              stages, splits, kv_heads):
    q, k, v, table, lens = _inputs(len(lens) + 7, len(lens), kv_heads, groups, 64, page_size, pmax, lens)
    rng = np.random.default_rng(groups)
    k_new, v_new = (jnp.asarray(rng.standard_normal((len(lens), kv_heads, 64)), jnp.bfloat16) for _ in range(2))
    cfg = DecodeConfig(block_kv=block_kv, num_stages=stages, num_splits=splits)
    got = jax.jit(lambda *a: paged_decode_attention_append(*a, 1, table, lens, window, scale=0.125, config=cfg,
                                                           interpret=True))(q, k_new, v_new, k, v)
    want = paged_decode_attention_append_reference(q, k_new, v_new, k, v, 1, table, lens, window, scale=0.125)
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), atol=8e-3, rtol=1e-2)
    for got_pages, want_pages, old in zip(got[1:], want[1:], (k, v)):  # exactly the token's rows change
        np.testing.assert_array_equal(np.asarray(got_pages, np.float32), np.asarray(want_pages, np.float32))
        changed = int(np.sum(np.any(np.asarray(got_pages != old), axis=-1)))  # (page row, KV head) pairs
        assert changed == kv_heads * int(np.sum(np.asarray(lens) > 0))
    # Negative control: attending without the new token (the old page rows) is far off.
    stale = paged_decode_attention_reference(q, k, v, 1, table, lens, window, scale=0.125)
    assert not np.allclose(np.asarray(stale, np.float32), np.asarray(want[0], np.float32), atol=8e-3, rtol=1e-2)


def test_append_kernel_rejects_mismatched_rows():
    q, k, v, table, lens = _inputs(0, 2, 2, 4, 64, 16, 4, [10, 20])
    bad = jnp.zeros((2, 2, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"k_new \(2, 2, 32\) / v_new \(2, 2, 32\) must both be \(2, 2, 64\)"):
        paged_decode_attention_append(q, bad, bad, k, v, 0, table, lens, scale=0.125, interpret=True)


def _decode_step_args(batch):
    rng = np.random.default_rng(batch)
    positions = rng.integers(0, 60, (batch, 1)).astype(np.int32)
    positions[1] = -1  # padding
    q, k_pages, v_pages, table, _ = _inputs(batch, batch, 2, 4, 64, 16, 4, [1] * batch)
    k, v = (jnp.asarray(rng.standard_normal((batch, 1, 2, 64)), jnp.bfloat16) for _ in range(2))
    kv_lens = jnp.asarray(np.maximum(positions[:, 0] + 1, 0))
    return positions, (q[:, None], k, v, KVCache(k_pages, v_pages), 1, table, jnp.asarray(positions), kv_lens)


@pytest.mark.timeout(300)
def test_store_and_attend_through_kernel_matches_xla_path():
    """The ops entry the model calls: one decode token per row (one a padding row) stored and
    attended by the kernel, against store_kv + the XLA attention."""
    positions, args = _decode_step_args(3)
    got, got_cache = jax.jit(lambda *a: store_and_attend(*a, scale=0.125, backend="pallas"))(*args)
    want, want_cache = store_and_attend(*args, scale=0.125, backend="xla")
    real = positions[:, 0] >= 0  # a padding row's output is discarded (the paths differ there)
    np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(want, np.float32)[real], atol=8e-3,
                               rtol=1e-2)
    for a, b in zip(got_cache[:2], want_cache[:2]):  # page 0 is scratch: XLA writes the padding row there
        np.testing.assert_array_equal(np.asarray(a[:, 1:], np.float32), np.asarray(b[:, 1:], np.float32))


def test_store_in_kernel_only_up_to_its_batch_limit():
    """Above STORE_IN_KERNEL_MAX_BATCH rows XLA stores the tokens (a scatter) before the kernel reads them."""
    def scatters(batch):
        _, args = _decode_step_args(batch)
        jaxpr = jax.make_jaxpr(lambda *a: store_and_attend(*a, scale=0.125, backend="pallas"))(*args)
        return "scatter" in str(jaxpr)

    assert not scatters(STORE_IN_KERNEL_MAX_BATCH)
    assert scatters(STORE_IN_KERNEL_MAX_BATCH + 1)


def _quantized(k, v, kind, seed):
    """int8 / fp8 pages of k and v, with scales scattered by a random factor per token and head
    (so a kernel that ignored or misplaced them would be far off)."""
    rng = np.random.default_rng(seed)
    out = []
    for x in (k, v):
        codes, scales = quantize(x, kind)
        out += [codes, scales * jnp.asarray(rng.uniform(0.5, 2.0, scales.shape), jnp.float32)]
    return out  # k8, k_scale, v8, v_scale


QUANTIZED_CASES = [  # kind, kv_heads, groups, page_size, pmax, lens, window, stages, splits
    ("int8", 1, 4, 32, 4, [100, 7], 0, 2, 2),  # the short row's second split is empty
    ("fp8_e4m3", 2, 4, 16, 8, [128, 70], 50, 3, 1),  # sliding window
    ("fp8_e4m3", 2, 8, 128, 2, [200, 0], 0, 2, 1),  # pages larger than a tile, 4 steps; an empty row
    ("int8", 1, 20, 32, 4, [128, 70], 0, 2, 2),  # 20 query heads: wgmma's N of 32
    ("fp8_e4m3", 2, 4, 16, 16, [256, 130], 0, 2, 1),  # pages of 16: four copies a tile, several refills
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind,kv_heads,groups,page_size,pmax,lens,window,stages,splits", QUANTIZED_CASES)
def test_kernel_over_quantized_pages_matches_reference(kind, kv_heads, groups, page_size, pmax, lens, window,
                                                       stages, splits):
    q, k, v, table, lens = _inputs(len(lens) + groups + page_size, len(lens), kv_heads, groups, 64, page_size,
                                   pmax, lens)
    k8, ks, v8, vs = _quantized(k, v, kind, groups)
    cfg = DecodeConfig(block_kv=64, num_stages=stages, num_splits=splits)
    got = paged_decode_attention(q, k8, v8, 1, table, lens, window, scale=0.125, k_scale=ks, v_scale=vs,
                                 config=cfg, interpret=True)
    want = paged_decode_attention_reference(q, k8, v8, 1, table, lens, window, scale=0.125, k_scale=ks, v_scale=vs)
    # The same attention in float32 throughout (pages dequantized to float32): the kernel rounds in
    # other places than the bf16 reference (float16 / bfloat16 products, scales on the probabilities),
    # so both are held to it, the kernel to no more than 1.5x the reference's own error.
    exact = paged_decode_attention_reference(q.astype(jnp.float32), k8, v8, 1, table, lens, window, scale=0.125,
                                             k_scale=ks, v_scale=vs)
    assert got.shape == want.shape == q.shape and got.dtype == q.dtype
    got, want, exact = (np.asarray(x, np.float32) for x in (got, want, exact))
    assert np.all(np.isfinite(got)) and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, exact, atol=1.5e-2, rtol=1e-2)
    assert np.abs(got - exact).max() <= 1.5 * np.abs(want - exact).max()
    # Negative controls: one mean scale per layer instead of per token, or V's scales on K.
    flat = paged_decode_attention_reference(q, k8, v8, 1, table, lens, window, scale=0.125,
                                            k_scale=jnp.full_like(ks, ks.mean()), v_scale=vs)
    assert not np.allclose(np.asarray(flat, np.float32), exact, atol=1.5e-2, rtol=1e-2)
    swapped = paged_decode_attention_reference(q, k8, v8, 1, table, lens, window, scale=0.125, k_scale=vs,
                                               v_scale=vs)
    assert not np.allclose(np.asarray(swapped, np.float32), exact, atol=1.5e-2, rtol=1e-2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
def test_quantized_decode_through_ops_matches_xla_path(kind):
    """paged_attention sends one-token steps over a quantized cache to the kernel (backend="pallas")
    and gets what the XLA path computes from the same cache, built by store_kv."""
    rng = np.random.default_rng(7)
    batch, tokens, kv_heads, groups, head_dim, page_size = 2, 80, 1, 4, 64, 32
    table = jnp.asarray(1 + rng.permutation(12)[:6].reshape(batch, 3), jnp.int32)
    store = {"int8": jnp.int8, "fp8_e4m3": jnp.float8_e4m3fn}[kind]
    pages, scales = jnp.zeros((1, 13, page_size, kv_heads, head_dim), store), jnp.zeros((1, 13, page_size, kv_heads))
    k, v = (jnp.asarray(rng.standard_normal((batch, tokens, kv_heads, head_dim)), jnp.bfloat16) for _ in "kv")
    positions = jnp.broadcast_to(jnp.arange(tokens), (batch, tokens))
    cache = store_kv(KVCache(pages, pages, scales, scales), 0, k, v, table, positions)
    q = jnp.asarray(rng.standard_normal((batch, 1, kv_heads, groups, head_dim)), jnp.bfloat16)
    step = jnp.asarray([[79], [40]], jnp.int32)  # row 1 is at an earlier step: keys 41.. are hidden
    lens = jnp.asarray([80, 41], jnp.int32)
    args = (q, cache, 0, table, step, lens)
    got = np.asarray(paged_attention(*args, scale=0.125, backend="pallas"), np.float32)
    want = np.asarray(paged_attention(*args, scale=0.125, backend="xla"), np.float32)
    np.testing.assert_allclose(got, want, atol=8e-3, rtol=1e-2)
    earlier = np.asarray(paged_attention(q, cache, 0, table, step - 1, lens - 1, scale=0.125), np.float32)
    assert not np.allclose(earlier, want, atol=8e-3, rtol=1e-2)  # one key fewer is visible


def test_reference_dequantizes_like_the_cache():
    q, k, v, table, lens = _inputs(3, 2, 2, 4, 64, 16, 4, [37, 64])
    for kind in ("int8", "fp8_e4m3"):
        k8, ks, v8, vs = _quantized(k, v, kind, 1)
        got = paged_decode_attention_reference(q, k8, v8, 0, table, lens, scale=0.3, k_scale=ks, v_scale=vs)
        dense = paged_decode_attention_reference(q, dequantize(k8, ks, q.dtype), dequantize(v8, vs, q.dtype), 0,
                                                 table, lens, scale=0.3)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(dense, np.float32))


def test_kernel_limits_for_quantized_pages():
    pages, scales = jnp.zeros((1, 4, 16, 2, 64), jnp.int8), jnp.zeros((1, 4, 16, 2))
    cache = KVCache(pages, pages, scales, scales)
    assert kernel_limits((2, 1, 2, 4, 64), cache, jnp.bfloat16) is None  # decode: the kernel
    assert "prefill kernel takes bfloat16 or float16" in kernel_limits((2, 5, 2, 4, 64), cache, jnp.bfloat16)
    assert "q of float32" in kernel_limits((2, 1, 2, 4, 64), cache, jnp.float32)
    one_head = KVCache(pages[..., :1, :], pages[..., :1, :], scales[..., :1], scales[..., :1])
    assert "multiple of 32" in kernel_limits((2, 1, 1, 4, 64), one_head, jnp.bfloat16)
    q = jnp.ones((2, 5, 2, 4, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="prefill kernel takes bfloat16 or float16 pages"):
        paged_attention(q, cache, 0, jnp.ones((2, 2), jnp.int32), jnp.zeros((2, 5), jnp.int32),
                        jnp.full((2,), 5), scale=1.0, backend="pallas")


@pytest.mark.parametrize("bad,match", [
    (dict(pages=jnp.bfloat16), "with scales: the kernel takes int8 or float8_e4m3fn"),
    (dict(v_scale=None), "k_scale and v_scale must be given together"),
    (dict(scale_shape=(1, 9, 16, 2)), r"k_scale of float32 \(1, 9, 16, 2\)"),
    (dict(scale_dtype=jnp.bfloat16), "k_scale of bfloat16"),
    (dict(q=jnp.float32), "q of float32 over int8 pages"),
    (dict(kv_heads=1), "must be a multiple of 32 for quantized pages"),
])
def test_kernel_rejects_bad_quantized_inputs(bad, match):
    kv_heads = bad.get("kv_heads", 2)
    q, k, v, table, lens = _inputs(0, 1, kv_heads, 4, 64, 16, 4, [5])
    k8, ks, v8, vs = _quantized(k, v, "int8", 0)
    if "pages" in bad:
        k8, v8 = k, v
    if "scale_shape" in bad:
        ks = jnp.ones(bad["scale_shape"], jnp.float32)
    if "scale_dtype" in bad:
        ks = ks.astype(bad["scale_dtype"])
    if "v_scale" in bad:
        vs = None
    q = q.astype(bad.get("q", q.dtype))
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(q, k8, v8, 0, table, lens, scale=1.0, k_scale=ks, v_scale=vs, interpret=True)


def test_reference_equals_dense_softmax():
    q, k, v, table, lens = _inputs(0, 2, 2, 4, 64, 16, 4, [37, 64])
    got = paged_decode_attention_reference(q, k, v, 0, table, lens, 10, scale=0.3)
    for b, n in enumerate([37, 64]):
        keys = np.asarray(k[0][table[b]], np.float32).reshape(-1, 2, 64)[n - 10:n]
        vals = np.asarray(v[0][table[b]], np.float32).reshape(-1, 2, 64)[n - 10:n]
        s = np.einsum("hgd,shd->hgs", np.asarray(q[b], np.float32), keys) * 0.3
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(got[b], np.float32), np.einsum("hgs,shd->hgd", p, vals),
                                   atol=2e-2, rtol=2e-2)


def test_choose_splits_fills_the_gpu():
    assert choose_splits(512, 64, 132) == 1  # batch 64 x 8 heads: four full waves already
    assert choose_splits(64, 256, 132) == 4  # batch 8: 256 blocks, two waves of 97 %
    assert choose_splits(8, 2, 132) == 2  # never more splits than steps


@pytest.mark.parametrize("bad,match", [
    (dict(head_dim=32), "head_dim=32"),
    (dict(groups=65), "at most 64"),
    (dict(page_size=12), "page_size=12"),
    (dict(dtype=jnp.float32), "bfloat16 or float16"),
])
def test_kernel_rejects_what_it_cannot_run(bad, match):
    head_dim, groups, page_size = bad.get("head_dim", 64), bad.get("groups", 4), bad.get("page_size", 16)
    q, k, v, table, lens = _inputs(0, 1, 1, groups, head_dim, page_size, 4, [5])
    if "dtype" in bad:
        k, v = k.astype(bad["dtype"]), v.astype(bad["dtype"])
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(q, k, v, 0, table, lens, scale=1.0, interpret=True)


def test_config_validation():
    with pytest.raises(ValueError, match="block_kv=96"):
        DecodeConfig(block_kv=96)
    with pytest.raises(ValueError, match="num_stages=0"):
        DecodeConfig(num_stages=0)
    assert (DecodeConfig().stages(False), DecodeConfig().stages(True)) == (4, 3)  # bf16 / 8-bit pages
    assert DecodeConfig(num_stages=2).stages(True) == 2


@pytest.fixture(scope="module")
def tiny_hd64(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("hd64"), hidden_size=128, num_heads=4,
                                 num_kv_heads=2, head_dim=64, num_layers=2, with_tokenizer=False)


@pytest.mark.timeout(600)
def test_llm_decode_through_kernel_matches_xla(tiny_hd64, monkeypatch):
    """The whole decode loop with the kernel (interpreted) gives the XLA path's tokens and logprobs."""
    from jaxllm import llm as llm_module

    # Each interpreted kernel call costs seconds and the device loop runs DECODE_CHECK_EVERY steps a
    # visit: with checks every step, 3 tokens are a prefill and two decode steps (the second reads
    # the token the first stored in the pages).
    monkeypatch.setattr(llm_module, "DECODE_CHECK_EVERY", 1)
    prompts = [{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": list(range(10, 40))}]
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = {}
    for backend in ("xla", "pallas"):
        llm = LLM(str(tiny_hd64), dtype="float16", skip_tokenizer_init=True, attention_backend=backend,
                  max_model_len=64, progress=False)
        assert llm.config.attention_backend == backend
        outs[backend] = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert [len(o.token_ids) for o in outs["pallas"]] == [3, 3]
    for ref, ker in zip(outs["xla"], outs["pallas"]):
        assert ref.token_ids == ker.token_ids
        for step, token in enumerate(ref.token_ids):
            assert abs(ref.logprobs[step][token].logprob - ker.logprobs[step][token].logprob) < 2e-2


def test_attention_backend_bad_values(tiny_hd64):
    with pytest.raises(ValueError, match="attention_backend 'cuda' not supported"):
        LLM(str(tiny_hd64), skip_tokenizer_init=True, attention_backend="cuda", progress=False)
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        LLM(str(tiny_hd64), skip_tokenizer_init=True, attention_backend="pallas", tensor_parallel_size=2,
            progress=False)
    # float32 pages: the kernel says why it cannot run instead of silently falling back
    llm = LLM(str(tiny_hd64), dtype="float32", skip_tokenizer_init=True, attention_backend="pallas",
              max_model_len=64, progress=False)
    with pytest.raises(ValueError, match="pages of float32: the kernel takes bfloat16 or float16"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False)


def test_auto_backend_uses_xla_off_gpu(tiny_hd64):
    llm = LLM(str(tiny_hd64), dtype="bfloat16", skip_tokenizer_init=True, max_model_len=64, progress=False)
    assert llm.config.attention_backend == "auto"
    assert jax.default_backend() != "gpu"  # so "auto" takes the XLA path here, fast
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3, temperature=0.0),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("semantics", ["Lane", "Warpgroup"])
def test_kernels_lower_for_the_gpu(monkeypatch, semantics):
    """Both decode kernels compile to Mosaic GPU at the 8B shape under both lowering semantics
    (jax 0.10 defaults to Lane, jax 0.11, on the GPU machine, to Warpgroup), without a GPU."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from pallas_kernels import paged_decode_attention as pda

    params = plgpu.CompilerParams
    monkeypatch.setattr(plgpu, "CompilerParams", lambda **kw: params(
        lowering_semantics=getattr(plgpu.LoweringSemantics, semantics), **kw))
    pda._build.cache_clear()
    try:
        S = jax.ShapeDtypeStruct
        q, row = S((1, 8, 4, 128), jnp.bfloat16), S((1, 8, 128), jnp.bfloat16)
        pages, table, lens = S((32, 64, 16, 8, 128), jnp.bfloat16), S((1, 32), jnp.int32), S((1,), jnp.int32)
        plain = jax.jit(lambda q, k, v, t, n: paged_decode_attention(q, k, v, 3, t, n, scale=0.1))
        plain.trace(q, pages, pages, table, lens).lower(lowering_platforms=("cuda",))
        append = jax.jit(lambda q, kn, vn, k, v, t, n: paged_decode_attention_append(q, kn, vn, k, v, 3, t, n, scale=0.1))
        text = append.trace(q, row, row, pages, pages, table, lens).lower(lowering_platforms=("cuda",)).as_text()
        assert "output_operand_aliases" in text  # the pages are updated in place
    finally:
        pda._build.cache_clear()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("page_dtype,groups", [(jnp.float8_e4m3fn, 4), (jnp.int8, 4), (jnp.float8_e4m3fn, 40)])
def test_8bit_kernel_lowers_for_the_gpu(page_dtype, groups):
    """The 8-bit-page kernel (Lane semantics on both jax versions) compiles to Mosaic GPU at the 8B
    shape, without a GPU; 40 query heads take wgmma's N of 64."""
    S = jax.ShapeDtypeStruct
    q = S((64, 8, groups, 128), jnp.bfloat16)
    pages, scales = S((32, 4096, 16, 8, 128), page_dtype), S((32, 4096, 16, 8), jnp.float32)
    f = jax.jit(lambda q, k, v, ks, vs, t, n: paged_decode_attention(q, k, v, 3, t, n, scale=0.1, k_scale=ks,
                                                                     v_scale=vs))
    f.trace(q, pages, pages, scales, scales, S((64, 256), jnp.int32), S((64,), jnp.int32)).lower(
        lowering_platforms=("cuda",))


def test_8bit_kernel_queries():
    """q goes to the product dtype of the pages (float16 for fp8, clipped to its range; bfloat16 for
    int8), padded with zero rows to wgmma's N."""
    from pallas_kernels.paged_decode_attention_8bit import product_dtype, queries, query_columns

    assert [query_columns(g) for g in (1, 4, 16, 17, 32, 33, 64)] == [16, 16, 16, 32, 32, 64, 64]
    assert product_dtype(jnp.float8_e4m3fn) == jnp.float16 and product_dtype(jnp.int8) == jnp.bfloat16
    q = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 64)) * 100, jnp.bfloat16)
    q = q.at[0, 0, 0, 0].set(1e6).at[0, 0, 0, 1].set(-1e6)
    got = queries(q, jnp.float8_e4m3fn)
    assert got.shape == (2, 3, 16, 64) and got.dtype == jnp.float16
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    assert float(got[0, 0, 0, 0]) == 65504.0 and float(got[0, 0, 0, 1]) == -65504.0
    np.testing.assert_array_equal(np.asarray(got[1, :, :4], np.float32), np.asarray(q[1], np.float32))
    assert not np.any(np.asarray(got[:, :, 4:], np.float32))
    as_int8 = queries(q, jnp.int8)
    assert as_int8.dtype == jnp.bfloat16 and float(as_int8[0, 0, 0, 0]) == float(q[0, 0, 0, 0])
