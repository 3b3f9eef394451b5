"""LLM.generate_stream: partial outputs that grow into exactly what generate() returns."""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("stream"), "LlamaForCausalLM", seed=4)
    return LLM(str(path), dtype="float32", max_model_len=96, progress=False)


def test_stream_grows_into_generate_output(llm):
    prompts = ["def add(a, b):", "import os\n"]
    params = [SamplingParams(max_tokens=21, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0.8, seed=3, ignore_eos=True)]
    want = llm.generate(prompts, params, use_tqdm=False)
    updates = list(llm.generate_stream(prompts, params, interval=4))
    assert len(updates) == 1 + int(np.ceil(20 / 4))  # after prefill, then every 4 steps
    for before, after in zip(updates, updates[1:]):
        for b, a in zip(before, after):
            assert a.outputs[0].token_ids[:len(b.outputs[0].token_ids)] == b.outputs[0].token_ids
    assert [len(u[1].outputs[0].token_ids) for u in updates] == [1, 5, 9, 9, 9, 9]
    assert [u[1].finished for u in updates] == [False, False, True, True, True, True]
    assert not updates[-2][0].finished and updates[-1][0].finished
    for got, ref in zip(updates[-1], want):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids
        assert got.outputs[0].text == ref.outputs[0].text
        assert got.outputs[0].finish_reason == ref.outputs[0].finish_reason == "length"


def test_stream_rejects_bad_interval(llm):
    with pytest.raises(ValueError, match="interval must be a positive integer, got 0"):
        next(llm.generate_stream("x", interval=0))
