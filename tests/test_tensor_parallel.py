"""Tensor parallelism on 8 fake CPU devices gives the same greedy tokens as one device.

The module runs in a process of its own (`isolated_module`, see conftest.py: a jax 0.10.2 CPU compiler
crash, seen when these tests followed the kernel tests in one process). Until the eighteenth session
each test had its own process; one for the three took 53 s against 68."""

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.isolated_module(seconds=60)

ARCHS = {
    # vocab 384 splits evenly, so the embedding and lm_head are vocab-parallel too
    "LlamaForCausalLM": dict(num_heads=8, num_kv_heads=4, config_overrides={"vocab_size": 384}),
    "Qwen2ForCausalLM": dict(num_heads=8, num_kv_heads=4),
    "Qwen3ForCausalLM": dict(num_heads=8, num_kv_heads=4, head_dim=16, config_overrides={"vocab_size": 384}),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tp"), request.param, seed=11, **ARCHS[request.param])


def greedy(llm, prompts):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def test_tp2_and_tp4_match_tp1(checkpoint):
    assert jax.device_count() >= 8  # conftest's fake CPU devices (a test of its own cost a process)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 300, n).tolist() for n in (3, 17, 40)]
    results = {}
    for tp, layers in ((1, "unrolled"), (2, "unrolled"), (4, "unrolled"), (2, "scan")):
        llm = LLM(str(checkpoint), dtype="float32", max_model_len=96, tensor_parallel_size=tp,
                  skip_tokenizer_init=True, progress=False, layers=layers)
        wqkv = llm.params["layers"][0]["wqkv"] if layers == "unrolled" else llm.params["layers"]["wqkv"]
        kv_axis = 1 if layers == "unrolled" else 2  # [(L,) D, Hkv, G+2, hd]
        assert len(wqkv.sharding.device_set) == tp
        # KV heads are split over the devices: each shard holds 4 / tp of them
        assert {s.data.shape[kv_axis] for s in wqkv.addressable_shards} == {4 // tp}
        results[tp if layers == "unrolled" else "scan"] = greedy(llm, prompts)
    for tp in (2, 4, "scan"):
        for ref, got in zip(results[1], results[tp]):
            assert got.token_ids == ref.token_ids
            lp_ref = [d[t].logprob for d, t in zip(ref.logprobs, ref.token_ids)]
            lp_got = [d[t].logprob for d, t in zip(got.logprobs, got.token_ids)]
            np.testing.assert_allclose(lp_got, lp_ref, atol=1e-4)
