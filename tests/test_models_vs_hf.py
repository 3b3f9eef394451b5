"""Each supported architecture against `transformers` (PyTorch CPU) on tiny random checkpoints."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jaxllm import LLM, SamplingParams
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 19, 33)

CASES = {
    "llama-gqa": dict(architecture="LlamaForCausalLM"),
    "llama-mha": dict(architecture="LlamaForCausalLM", num_heads=4, num_kv_heads=4),
    "llama3.2-tied-rope-scaling": dict(
        architecture="LlamaForCausalLM", tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rope_theta=500000.0),
    "llama-linear-rope": dict(architecture="LlamaForCausalLM",
                              rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral-sliding-window": dict(architecture="MistralForCausalLM", sliding_window=8),
    "qwen2-qkv-bias": dict(architecture="Qwen2ForCausalLM"),
    "qwen3-qk-norm": dict(architecture="Qwen3ForCausalLM", head_dim=32, num_heads=4, num_kv_heads=2),
}


def prompts_for(seed: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


def hf_reference(path, prompts, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # plain greedy, like ignore_eos=True
    logprobs, greedy = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logprobs.append(torch.log_softmax(model(ids).logits[0].float(), -1).numpy())
            out = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS,
                                 pad_token_id=0, attention_mask=torch.ones_like(ids))
            greedy.append(out[0, len(prompt):].tolist())
    return logprobs, greedy


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kwargs = dict(CASES[request.param])
    path = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), kwargs.pop("architecture"),
                                 seed=7, **kwargs)
    llm = LLM(str(path), dtype="float32", max_model_len=128, skip_tokenizer_init=True, progress=False)
    prompts = prompts_for(1, llm.config.vocab_size)
    return llm, prompts, hf_reference(path, prompts)


def run(llm, prompts, **params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, ignore_eos=True, **params), use_tqdm=False)


def test_prompt_logprobs_match_transformers(case):
    llm, prompts, (ref_logprobs, _) = case
    outs = run(llm, prompts, max_tokens=1, prompt_logprobs=3)
    for prompt, out, ref in zip(prompts, outs, ref_logprobs):
        assert out.prompt_logprobs[0] is None
        got = [out.prompt_logprobs[t][prompt[t]].logprob for t in range(1, len(prompt))]
        want = [ref[t - 1, prompt[t]] for t in range(1, len(prompt))]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        # the top-3 entries are the reference's three most likely tokens
        for t in range(1, len(prompt)):
            top = sorted(out.prompt_logprobs[t].items(), key=lambda kv: kv[1].rank)[:3]
            assert [tok for tok, _ in top] == np.argsort(-ref[t - 1])[:3].tolist()


def test_greedy_tokens_match_transformers_generate(case):
    llm, prompts, (_, ref_greedy) = case
    outs = run(llm, prompts, max_tokens=NEW_TOKENS, logprobs=1)
    for out, ref in zip(outs, ref_greedy):
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_error_is_no_worse_than_transformers(tmp_path, dtype):
    """Rounding error against float32 is of the same size as transformers' own in that dtype."""
    path = write_tiny_checkpoint(tmp_path / "ckpt", "LlamaForCausalLM", seed=3, dtype=dtype)
    llm = LLM(str(path), max_model_len=64, skip_tokenizer_init=True, progress=False)
    assert llm.config.dtype == dtype  # "auto" takes the checkpoint's dtype
    assert llm.params["layers"][0]["wqkv"].dtype == dtype
    prompts = prompts_for(2, llm.config.vocab_size)
    ref32, _ = hf_reference(path, prompts, torch.float32)
    ref_half, _ = hf_reference(path, prompts, getattr(torch, dtype))
    outs = run(llm, prompts, max_tokens=1, prompt_logprobs=0)
    ours_err, hf_err = [], []
    for prompt, out, r32, rh in zip(prompts, outs, ref32, ref_half):
        idx = (np.arange(len(prompt) - 1), prompt[1:])
        got = np.array([out.prompt_logprobs[t][prompt[t]].logprob for t in range(1, len(prompt))])
        assert np.all(np.isfinite(got))
        ours_err.append(np.abs(got - r32[idx]))
        hf_err.append(np.abs(rh[idx] - r32[idx]))
    ours_err, hf_err = np.concatenate(ours_err), np.concatenate(hf_err)
    assert 0 < ours_err.mean() < 1.5 * hf_err.mean()
    assert ours_err.max() < 2 * hf_err.max()


def test_scan_over_stacked_layers_gives_the_same_tokens(case):
    """The two layer layouts (unrolled list, the default, and stacked under lax.scan) agree exactly."""
    llm, prompts, (_, ref_greedy) = case
    assert isinstance(llm.params["layers"], list)
    scan = LLM(llm.model_dir, dtype="float32", max_model_len=128, skip_tokenizer_init=True,
               progress=False, layers="scan")
    assert scan.params["layers"]["wqkv"].shape[0] == llm.config.num_layers
    outs = run(scan, prompts, max_tokens=NEW_TOKENS)
    assert [o.outputs[0].token_ids for o in outs] == ref_greedy
