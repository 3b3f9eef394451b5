"""Shapes are bucketed: new prompt lengths and output lengths inside a bucket do not recompile."""

import numpy as np

from jaxllm import LLM, SamplingParams, runner
from jaxllm.llm import bucket
from jaxllm.tiny_checkpoint import write_tiny_checkpoint


def test_bucket_is_next_power_of_two():
    assert [bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
    assert bucket(3, 16) == 16


def test_new_lengths_in_a_bucket_reuse_compiled_steps(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ckpt", "LlamaForCausalLM", seed=5)
    llm = LLM(str(path), dtype="float32", max_model_len=128, skip_tokenizer_init=True, progress=False)
    rng = np.random.default_rng(0)

    def run(lengths, max_tokens):
        prompts = [{"prompt_token_ids": rng.integers(0, 300, n).tolist()} for n in lengths]
        return llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                            use_tqdm=False)

    run([5, 9], 20)
    compiled = (runner.prefill._cache_size(), runner.decode._cache_size())
    outs = run([3, 14], 30)  # same buckets: 2 rows, 16 prompt tokens, 32 new tokens
    assert [len(o.outputs[0].token_ids) for o in outs] == [30, 30]
    assert (runner.prefill._cache_size(), runner.decode._cache_size()) == compiled
    run([20], 20)  # a longer prompt: a new prompt bucket compiles a new prefill
    assert runner.prefill._cache_size() > compiled[0]
