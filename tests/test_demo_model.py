"""The bundled demo model: transformers loads the same files and computes the same logits."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxllm import LLM, SamplingParams
from jaxllm.default_model import bundled_model_dir, default_model_dir

CODE = '''import os


def read_lines(path):
    """Return the lines of a text file."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\\n") for line in f]
'''


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=256, progress=False)  # no model: the bundled one


def test_default_is_bundled_and_small():
    path = default_model_dir()
    assert path == bundled_model_dir()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 16 * 2**20, f"bundled model is {size / 2**20:.1f} MiB, the limit is 16"
    training = json.loads((path / "training.json").read_text())
    assert training["heldout_files"] and training["curve"][-1]["heldout_loss"] < 3.0


def test_logits_match_transformers(llm):
    ids = llm.get_tokenizer().encode(CODE)
    assert ids == AutoTokenizer.from_pretrained(bundled_model_dir()).encode(CODE)
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
        greedy = model.generate(torch.tensor([ids[:20]]), do_sample=False, max_new_tokens=16,
                                attention_mask=torch.ones(1, 20, dtype=torch.long))[0, 20:].tolist()
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    got = [out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]
    np.testing.assert_allclose(got, ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    # a trained model predicts this code well: mean loss far below uniform (log 8192 = 9.0)
    assert -np.mean(got) < 3.0
    ours = llm.generate({"prompt_token_ids": ids[:20]}, SamplingParams(max_tokens=16, temperature=0),
                        use_tqdm=False)[0].outputs[0].token_ids
    assert ours == greedy[:len(ours)]


def test_completes_a_python_function(llm):
    out = llm.generate("def fibonacci(n):", SamplingParams(max_tokens=48, temperature=0), use_tqdm=False)
    text = out[0].outputs[0].text
    assert text.startswith("\n    ") or text.startswith("\n        ")  # an indented body
    assert any(word in text for word in ("return", '"""', "if ", "for "))
