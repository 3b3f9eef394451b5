"""int8 weight-only quantization: the pytree swap, its error bound, the quantized matmul, and the
bundled model's perplexity against bf16."""

import glob
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.evaluate import perplexity
from jaxllm.ops import einsum
from jaxllm.quantization import QuantizedWeight, dequantize, quantize_int8, quantize_params
from jaxllm.tiny_checkpoint import write_tiny_checkpoint
from models.llama import INPUT_AXES


def test_int8_error_bound_and_per_channel_scales():
    w = jax.random.normal(jax.random.PRNGKey(0), (48, 3, 5, 16)) * jnp.arange(1, 17)  # channels differ
    qw = quantize_int8(w, (0,))
    assert qw.q.dtype == jnp.int8 and qw.scale.shape == (1, 3, 5, 16)
    np.testing.assert_allclose(qw.scale, jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127, rtol=1e-6)
    err = np.abs(np.asarray(dequantize(qw)) - np.asarray(w))
    assert np.all(err <= np.asarray(qw.scale) / 2 + 1e-6)  # round to nearest: half a step at most
    assert np.max(np.abs(qw.q)) == 127
    # several input axes (wo): one scale per output column
    assert quantize_int8(w, (0, 1, 2)).scale.shape == (1, 1, 1, 16)


@pytest.mark.parametrize("subscripts,x_shape,w_shape,axes", [
    ("btd,dhgk->bthgk", (2, 3, 32), (32, 2, 6, 8), (0,)),  # fused QKV
    ("bthgk,hgkd->btd", (2, 3, 2, 4, 8), (2, 4, 8, 32), (0, 1, 2)),  # output projection
    ("btd,dcf->btcf", (2, 3, 32), (32, 2, 24), (0,)),  # gate/up
    ("...d,dv->...v", (2, 3, 32), (32, 50), (0,)),  # lm_head
])
def test_quantized_einsum_equals_dense_einsum_of_dequantized(subscripts, x_shape, w_shape, axes):
    kx, kw = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, w_shape)
    qw = quantize_int8(w, axes)
    got = einsum(subscripts, x, qw)
    np.testing.assert_allclose(got, jnp.einsum(subscripts, x, dequantize(qw)), rtol=1e-5, atol=1e-5)
    # and close to the dense product, but not equal to it (the test would notice a no-op)
    dense = jnp.einsum(subscripts, x, w)
    rel = float(jnp.linalg.norm(got - dense) / jnp.linalg.norm(dense))
    assert 1e-5 < rel < 2e-2


def test_quantize_params_stacked_and_unrolled_agree(tmp_path):
    llm = LLM(str(write_tiny_checkpoint(tmp_path)), skip_tokenizer_init=True, layers="scan", progress=False)
    stacked = quantize_params(llm.params, INPUT_AXES)
    unrolled = quantize_params(LLM(str(tmp_path), skip_tokenizer_init=True, progress=False).params, INPUT_AXES)
    for i, layer in enumerate(unrolled["layers"]):
        for name, w in layer.items():
            if name in INPUT_AXES:
                assert isinstance(w, QuantizedWeight)
                np.testing.assert_array_equal(w.q, stacked["layers"][name].q[i])
    assert not isinstance(stacked["embed"], QuantizedWeight)  # the gathered table stays dense


def test_int8_llm_close_to_dense_and_tp_consistent(tmp_path):
    path = write_tiny_checkpoint(tmp_path, num_kv_heads=2)
    prompts = [{"prompt_token_ids": list(range(3, 20))}, {"prompt_token_ids": [5, 9, 2]}]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    dense = LLM(str(path), skip_tokenizer_init=True, progress=False).generate(prompts, sp, use_tqdm=False)
    q1 = LLM(str(path), skip_tokenizer_init=True, quantization="int8", progress=False)
    q2 = LLM(str(path), skip_tokenizer_init=True, quantization="int8", tensor_parallel_size=2, progress=False)
    out1, out2 = (q.generate(prompts, sp, use_tqdm=False) for q in (q1, q2))
    for d, a, b in zip(dense, out1, out2):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids  # TP splits the same int8 weights
        first = a.outputs[0].token_ids[0]
        assert first == d.outputs[0].token_ids[0]
        assert abs(a.outputs[0].logprobs[0][first].logprob - d.outputs[0].logprobs[0][first].logprob) < 0.3  # random weights, std 0.3: sharp logits


def test_bundled_model_int8_perplexity_within_one_percent():
    files = sorted(glob.glob(f"{sys.base_prefix}/lib/python3.*/json/*.py"))[:4]
    assert files, "the interpreter's stdlib json package is the scored text"
    texts = [open(f, encoding="utf-8").read() for f in files]
    ppl = {q: perplexity(LLM(dtype="bfloat16", quantization=q, progress=False), texts, window=512).perplexity
           for q in (None, "int8")}
    assert ppl[None] < 30  # the bundled model knows Python
    assert abs(ppl["int8"] / ppl[None] - 1) < 0.01


def test_unknown_method_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="quantization 'int3' not supported; choose one of"):
        LLM(str(write_tiny_checkpoint(tmp_path)), skip_tokenizer_init=True, quantization="int3", progress=False)
