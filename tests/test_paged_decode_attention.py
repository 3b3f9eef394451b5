"""The Mosaic GPU paged decode-attention kernel against its jnp reference, in Pallas' GPU
interpret mode (CPU): random page tables, ragged lengths, windows, splits and page sizes.

The interpreter's wgmma takes neither transposed nor register operands, so under it the kernel's
two products are jnp dots; the TMA page copies, barriers, pipeline, masking, online softmax and
the split merge are the kernel's own. The GPU run (benchmarks/attention.py) checks the wgmma path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.tiny_checkpoint import write_tiny_checkpoint
from pallas_kernels.paged_decode_attention import (DecodeConfig, choose_splits, paged_decode_attention,
                                                   paged_decode_attention_reference)

pytestmark = pytest.mark.isolated_module  # see conftest.py


def _inputs(seed, batch, kv_heads, groups, head_dim, page_size, pmax, lens, layers=2):
    rng = np.random.default_rng(seed)
    num_pages = batch * pmax + 3
    table = (1 + rng.permutation(num_pages - 1)[:batch * pmax]).reshape(batch, pmax)
    shape = (layers, num_pages, page_size, kv_heads, head_dim)
    q = jnp.asarray(rng.standard_normal((batch, kv_heads, groups, head_dim)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    return q, k, v, jnp.asarray(table, jnp.int32), jnp.asarray(lens, jnp.int32)


CASES = [  # groups, page_size, pmax, lens, window, block_kv, stages, splits
    (4, 16, 8, [100, 7, 128], 0, 64, 2, 1),
    (4, 16, 8, [100, 7, 128], 0, 64, 2, 3),  # splits, one of them empty for the short row
    (4, 16, 8, [100, 70, 128], 50, 64, 3, 2),  # sliding window: the first keys are masked
    (8, 8, 16, [1, 128, 65], 0, 64, 4, 2),  # 8 pages per tile, a 1-token context
    (2, 128, 2, [200, 129, 0], 0, 64, 2, 2),  # pages larger than a tile; an empty (padding) row
    (1, 64, 3, [192, 3, 64], 0, 128, 2, 1),  # MQA-like single group, 128-key tiles
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("groups,page_size,pmax,lens,window,block_kv,stages,splits", CASES)
def test_kernel_matches_reference(groups, page_size, pmax, lens, window, block_kv, stages, splits):
    q, k, v, table, lens = _inputs(len(lens) + groups, len(lens), 2, groups, 64, page_size, pmax, lens)
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


@pytest.fixture(scope="module")
def tiny_hd64(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("hd64"), hidden_size=128, num_heads=4,
                                 num_kv_heads=2, head_dim=64, num_layers=2, with_tokenizer=False)


@pytest.mark.timeout(600)
def test_llm_decode_through_kernel_matches_xla(tiny_hd64):
    """The whole decode loop with the kernel (interpreted) gives the XLA path's tokens and logprobs."""
    prompts = [{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": list(range(10, 40))}]
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = {}
    for backend in ("xla", "pallas"):
        llm = LLM(str(tiny_hd64), dtype="float16", skip_tokenizer_init=True, attention_backend=backend,
                  max_model_len=64, progress=False)
        assert llm.config.attention_backend == backend
        outs[backend] = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]
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
