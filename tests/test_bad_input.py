"""Bad input to LLM and generate: each a clear error whose message names the bad value."""

import json
import re
import shutil

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.checkpoint import CheckpointError
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

RNG = np.random.default_rng(7100)
MAX_MODEL_LEN = 32
POSITIONS = 256


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bad") / "llama", seed=int(RNG.integers(1, 2**31)),
                                 max_position_embeddings=POSITIONS)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, dtype="float32", max_model_len=MAX_MODEL_LEN, progress=False)


@pytest.fixture(scope="module")
def ids_only(ckpt):
    return LLM(ckpt, dtype="float32", max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True, progress=False)


def _ids(n: int) -> list[int]:
    return [int(t) for t in RNG.integers(0, 256, size=n)]


def _generate(llm, prompts, sp=None):
    return llm.generate(prompts, sp or SamplingParams(max_tokens=2), use_tqdm=False)


def test_unknown_architecture(ckpt, tmp_path):
    path = shutil.copytree(ckpt, tmp_path / "gpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["MyGPTForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MyGPTForCausalLM") as err:
        LLM(path, progress=False)
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert supported in str(err.value)


@pytest.mark.parametrize("prompt", ["", {"prompt_token_ids": []}], ids=["text", "ids"])
def test_empty_prompt(llm, prompt):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        _generate(llm, [{"prompt_token_ids": _ids(3)}, prompt])


@pytest.mark.parametrize("extra", [0, 1, 9])
def test_prompt_not_shorter_than_max_model_len(llm, extra):
    n = MAX_MODEL_LEN + extra
    with pytest.raises(ValueError, match=rf"prompt 0 has {n} tokens.*max_model_len is {MAX_MODEL_LEN}"):
        _generate(llm, {"prompt_token_ids": _ids(n)})


@pytest.mark.parametrize("bad", ["vocab", "negative", "float", "bool"])
def test_token_id_outside_vocab(llm, bad):
    vocab = llm.config.vocab_size
    value = {"vocab": vocab + int(RNG.integers(0, 50)), "negative": -int(RNG.integers(1, 50)),
             "float": 3.0, "bool": True}[bad]
    ids = _ids(5)
    ids[int(RNG.integers(0, 5))] = value
    with pytest.raises(ValueError, match=rf"token id {re.escape(repr(value))} outside the vocabulary \[0, {vocab}\)"):
        _generate(llm, {"prompt_token_ids": ids})


@pytest.mark.parametrize("field,value,allowed", [
    ("max_tokens", 0, "at least 1"),
    ("max_tokens", -3, "at least 1"),
    ("top_p", 0.0, r"in \(0, 1\]"),
    ("top_p", 1.5, r"in \(0, 1\]"),
    ("temperature", -0.5, ">= 0"),
])
def test_bad_sampling_params(field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field} must be .*{allowed}.*got {re.escape(repr(value))}"):
        SamplingParams(**{field: value})


def test_text_prompt_without_tokenizer(ids_only):
    with pytest.raises(ValueError, match="prompt 0 is text.*skip_tokenizer_init"):
        _generate(ids_only, "hello")
    with pytest.raises(ValueError, match="chat.*skip_tokenizer_init"):
        ids_only.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=r"stop strings \('xy',\).*skip_tokenizer_init"):
        _generate(ids_only, {"prompt_token_ids": _ids(4)}, SamplingParams(stop="xy"))
    # Token ids still work, with empty text.
    out = _generate(ids_only, {"prompt_token_ids": _ids(4)}, SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3 and out[0].outputs[0].text == ""


@pytest.mark.parametrize("count", [1, 3])
def test_wrong_number_of_sampling_params(llm, count):
    prompts = [{"prompt_token_ids": _ids(3)} for _ in range(2)]
    with pytest.raises(ValueError, match=f"got {count} SamplingParams for 2 prompts"):
        _generate(llm, prompts, [SamplingParams()] * count)


@pytest.mark.parametrize("value", [POSITIONS + 1, 10 * POSITIONS, 1, 0, 40.0])
def test_max_model_len_out_of_range(ckpt, value):
    with pytest.raises(ValueError, match=rf"max_model_len must be .*\[2, {POSITIONS}\].*got {re.escape(repr(value))}"):
        LLM(ckpt, max_model_len=value, progress=False)


def test_tensor_parallel_larger_than_devices(tmp_path):
    tp = 2 * len(jax.devices())
    path = write_tiny_checkpoint(tmp_path / "wide", num_heads=tp, num_kv_heads=tp, hidden_size=4 * tp,
                                 intermediate_size=8 * tp, num_layers=1)
    with pytest.raises(ValueError, match=rf"tensor_parallel_size={tp} but only {len(jax.devices())} device"):
        LLM(path, tensor_parallel_size=tp, progress=False)


@pytest.mark.parametrize("tp", [3, 4])
def test_tensor_parallel_not_dividing_kv_heads(ckpt, tp):
    with pytest.raises(ValueError, match=f"tensor_parallel_size={tp} must divide num_key_value_heads=2"):
        LLM(ckpt, tensor_parallel_size=tp, progress=False)


@pytest.mark.parametrize("tp", [0, -1, 1.0])
def test_tensor_parallel_not_positive_int(ckpt, tp):
    with pytest.raises(ValueError, match=rf"tensor_parallel_size must be a positive integer, got {tp!r}"):
        LLM(ckpt, tensor_parallel_size=tp, progress=False)


def test_nonexistent_model_dir(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        LLM(missing, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no config.json in .*{empty.name}"):
        LLM(empty, progress=False)


def test_no_weights(ckpt, tmp_path):
    path = shutil.copytree(ckpt, tmp_path / "noweights")
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no weights in .*noweights"):
        LLM(path, progress=False)


def test_bad_prompt_types(llm):
    with pytest.raises(ValueError, match="at least one prompt"):
        _generate(llm, [])
    with pytest.raises(ValueError, match="prompt 0 has type int"):
        _generate(llm, [17, 18])
    with pytest.raises(ValueError, match=r"prompt 0 is a dict without 'prompt' or 'prompt_token_ids': \['ids'\]"):
        _generate(llm, {"ids": [1, 2]})
    with pytest.raises(ValueError, match=r"sampling_params\[1\] has type dict"):
        _generate(llm, ["a", "b"], [SamplingParams(), {"max_tokens": 3}])


def test_stop_token_id_outside_vocab(llm):
    vocab = llm.config.vocab_size
    with pytest.raises(ValueError, match=f"stop_token_ids must be < vocab_size={vocab}"):
        _generate(llm, "hi", SamplingParams(stop_token_ids=[vocab]))
