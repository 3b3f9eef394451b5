"""Tests for jaxllm.tiny_checkpoint: checkpoints load in transformers and the tokenizer round-trips."""

import json
import pathlib
import re
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers

from jaxllm.tiny_checkpoint import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SUPPORTED_ARCHITECTURES,
    byte_tokenizer,
    write_tiny_checkpoint,
)

transformers.logging.set_verbosity_error()
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(20240611)


def _random_seed() -> int:
    return int(RNG.integers(1, 2**31))


def _read_weights(path: pathlib.Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(path.glob("*.safetensors")):
        part = safetensors.numpy.load_file(str(file))
        assert not set(part) & set(tensors), f"tensor stored twice in {file.name}"
        tensors.update(part)
    return tensors


def _load(path: pathlib.Path, **kwargs) -> transformers.PreTrainedModel:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, **kwargs
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], f"{kind}: {info[kind]}"
    return model.eval()


def _random_ids(vocab_size: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(RNG.integers(0, vocab_size, size=shape))


def _files(path: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_checkpoint_loads_in_transformers(tmp_path, architecture, tied, num_shards):
    seed = _random_seed()
    path = write_tiny_checkpoint(
        tmp_path / "ckpt", architecture, seed=seed, tie_word_embeddings=tied, num_shards=num_shards
    )
    model = _load(path)
    assert type(model).__name__ == architecture
    assert model.config.vocab_size == len(byte_tokenizer())

    on_disk = _read_weights(path)
    state = model.state_dict()
    expected_names = set(state) - ({"lm_head.weight"} if tied else set())
    assert set(on_disk) == expected_names
    for name, array in on_disk.items():
        np.testing.assert_array_equal(state[name].numpy(), array, err_msg=name)
    if tied:
        assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    else:
        assert not np.array_equal(on_disk["lm_head.weight"], on_disk["model.embed_tokens.weight"])

    ids = _random_ids(model.config.vocab_size, (2, 24))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 24, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_next_token_distribution_is_peaked_but_not_degenerate(tmp_path, architecture):
    path = write_tiny_checkpoint(tmp_path, architecture, seed=_random_seed())
    model = _load(path)
    ids = _random_ids(model.config.vocab_size, (4, 32))
    with torch.no_grad():
        probs = model(ids).logits.softmax(-1)
    max_prob = probs.amax(-1)
    assert torch.isfinite(probs).all()
    assert 0.2 < max_prob.median().item() < 0.99
    assert len(set(probs.argmax(-1).flatten().tolist())) > 10


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_low_precision_weights_are_rounded_float32_weights(tmp_path, dtype, torch_dtype):
    seed = _random_seed()
    full = write_tiny_checkpoint(tmp_path / "f32", "Qwen3ForCausalLM", seed=seed)
    low = write_tiny_checkpoint(tmp_path / dtype, "Qwen3ForCausalLM", seed=seed, dtype=dtype)
    assert json.loads((low / "config.json").read_text())["dtype"] == dtype
    full_weights, low_weights = _read_weights(full), _read_weights(low)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    assert set(full_weights) == set(low_weights)
    for name, array in low_weights.items():
        assert array.dtype == np_dtype, name
        np.testing.assert_array_equal(array, full_weights[name].astype(np_dtype), err_msg=name)

    model = _load(low, dtype="auto")
    assert model.dtype == torch_dtype
    with torch.no_grad():
        logits = model(_random_ids(model.config.vocab_size, (1, 16))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("num_shards", [2, 5])
def test_sharded_index_matches_files_and_unsharded_weights(tmp_path, num_shards):
    seed = _random_seed()
    single = write_tiny_checkpoint(tmp_path / "single", "Qwen2ForCausalLM", seed=seed)
    # Writing shards over a single-file checkpoint must remove the stale model.safetensors.
    sharded = write_tiny_checkpoint(tmp_path / "single", "Qwen2ForCausalLM", seed=seed, num_shards=num_shards)
    assert not (sharded / "model.safetensors").exists()
    single = write_tiny_checkpoint(tmp_path / "reference", "Qwen2ForCausalLM", seed=seed)

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_names = [f"model-{k:05d}-of-{num_shards:05d}.safetensors" for k in range(1, num_shards + 1)]
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == shard_names
    weights = _read_weights(sharded)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in weights.values())
    for file in shard_names:
        stored = safetensors.numpy.load_file(str(sharded / file))
        assert stored, f"{file} is empty"
        assert {n for n, f in index["weight_map"].items() if f == file} == set(stored)

    reference = _read_weights(single)
    assert set(reference) == set(weights)
    for name, array in reference.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
    _load(sharded)


UNICODE_SAMPLES = [
    "",
    " ",
    "  leading and trailing  ",
    "def f(x):\n\treturn x ** 2\r\n",
    "héllo wörld ñ ç",
    "日本語のテキスト 中文 한국어",
    "emoji 🤗🚀👩‍👩‍👧 flags 🇺🇳",
    "combining e\u0301 and zero\u200bwidth",
    "\x00\x01\x7f control",
    "<|user|> looks like a role marker",
]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_tokenizer_round_trips_fixed_strings(text):
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.text(max_size=64))
def test_tokenizer_round_trips_random_unicode(text):
    ids = _TOKENIZER.encode(text)
    assert _TOKENIZER.decode(ids) == text
    assert all(0 <= i < len(_TOKENIZER) for i in ids)


_TOKENIZER = byte_tokenizer()


def test_tokenizer_specials_and_merges():
    tokenizer = byte_tokenizer()
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token] == [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
    assert len(set(specials)) == 3
    assert all(256 <= i < len(tokenizer) for i in specials)
    for token, token_id in zip((BOS_TOKEN, EOS_TOKEN, PAD_TOKEN), specials):
        assert tokenizer.encode(token) == [token_id]
    # No bos is added implicitly; the chat template adds it.
    word = "".join(RNG.choice(list("abcdefgh"), size=5))
    assert tokenizer.encode(word)[0] != tokenizer.bos_token_id
    # Merges are learned from Python-like text, so such text needs fewer tokens than bytes.
    code = f"    def {word}(self):\n        return self.value\n"
    assert len(tokenizer.encode(code)) < 0.8 * len(code.encode())
    # The first 256 ids are the byte-level alphabet, so every byte sequence is encodable.
    vocab = tokenizer.get_vocab()
    first = {token for token, i in vocab.items() if i < 256}
    assert first == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())


def test_saved_tokenizer_and_chat_template(tmp_path):
    path = write_tiny_checkpoint(tmp_path, "MistralForCausalLM", seed=_random_seed())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    reference = byte_tokenizer()
    assert len(tokenizer) == len(reference)
    for text in UNICODE_SAMPLES:
        assert tokenizer.encode(text) == reference.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text

    user = "".join(RNG.choice(list("xyz 123é"), size=12))
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": user},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = f"{BOS_TOKEN}<|system|>\nbe brief{EOS_TOKEN}\n<|user|>\n{user}{EOS_TOKEN}\n<|assistant|>\n"
    assert prompt == expected
    no_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_prompt == expected.removesuffix("<|assistant|>\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.eos_token_id) == 2
    assert tokenizer.decode(ids) == prompt

    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    for key, value in [("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id)]:
        assert config[key] == value
        assert generation[key] == value


def test_same_seed_gives_identical_files_and_other_seed_other_weights(tmp_path):
    seed = _random_seed()
    kwargs = dict(architecture="Qwen3ForCausalLM", num_shards=2, dtype="bfloat16")
    first = _files(write_tiny_checkpoint(tmp_path / "a", seed=seed, **kwargs))
    second = _files(write_tiny_checkpoint(tmp_path / "b", seed=seed, **kwargs))
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name

    other = write_tiny_checkpoint(tmp_path / "c", seed=seed + 1, **kwargs)
    weights, other_weights = _read_weights(tmp_path / "a"), _read_weights(other)
    for name, array in weights.items():
        assert not np.array_equal(array, other_weights[name]), name
    other_files = _files(other)
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert other_files[name] == first[name]


def test_torch_is_not_needed(tmp_path):
    seed = _random_seed()
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from jaxllm.tiny_checkpoint import write_tiny_checkpoint\n"
        f"write_tiny_checkpoint(sys.argv[1], 'Qwen2ForCausalLM', seed={seed}, num_shards=2)\n"
        "assert sys.modules['torch'] is None\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "no_torch")], check=True, cwd=REPO_ROOT,
        capture_output=True,
    )
    here = write_tiny_checkpoint(tmp_path / "with_torch", "Qwen2ForCausalLM", seed=seed, num_shards=2)
    assert _files(tmp_path / "no_torch") == _files(here)


def test_llama3_rope_scaling_is_written_and_loads(tmp_path):
    theta = float(RNG.uniform(1e3, 1e6))
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    path = write_tiny_checkpoint(tmp_path, rope_theta=theta, rope_scaling=scaling, seed=_random_seed())
    rope = json.loads((path / "config.json").read_text())["rope_parameters"]
    assert rope == {**scaling, "rope_theta": theta}
    model = _load(path)
    assert model.config.rope_parameters["rope_type"] == "llama3"


@pytest.mark.parametrize("architecture", ["MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_sliding_window_config(tmp_path, architecture):
    window = int(RNG.integers(4, 32))
    plain = json.loads((write_tiny_checkpoint(tmp_path / "plain", architecture) / "config.json").read_text())
    assert plain.get("use_sliding_window", False) is False
    assert plain["sliding_window"] is None
    path = write_tiny_checkpoint(tmp_path / "window", architecture, sliding_window=window)
    config = json.loads((path / "config.json").read_text())
    assert config["sliding_window"] == window
    if architecture != "MistralForCausalLM":
        assert config["use_sliding_window"] is True
        assert config["layer_types"] == ["sliding_attention"] * config["num_hidden_layers"]
    assert _load(path).config.sliding_window == window


def test_qwen3_head_dim_and_config_overrides(tmp_path):
    vocab = len(byte_tokenizer()) + int(RNG.integers(1, 200))
    eps = float(RNG.uniform(1e-6, 1e-4))
    path = write_tiny_checkpoint(
        tmp_path, "Qwen3ForCausalLM", head_dim=32, num_heads=4, num_kv_heads=1, hidden_size=64,
        config_overrides={"vocab_size": vocab, "rms_norm_eps": eps}, seed=_random_seed(),
    )
    weights = _read_weights(path)
    assert weights["model.embed_tokens.weight"].shape == (vocab, 64)
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert weights["model.layers.1.self_attn.o_proj.weight"].shape == (64, 4 * 32)
    assert weights["model.layers.1.self_attn.q_norm.weight"].shape == (32,)
    model = _load(path)
    assert model.config.rms_norm_eps == pytest.approx(eps)
    assert model.config.head_dim == 32


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"architecture": "GPT2LMHeadModel"}, "'GPT2LMHeadModel'"),
        ({"architecture": "GPT2LMHeadModel"}, "Qwen3ForCausalLM"),
        ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads=3"),
        ({"dtype": "int8"}, "'int8'"),
        ({"num_shards": 0}, "num_shards=0"),
        ({"num_shards": 10_000}, "num_shards=10000"),
        ({"hidden_size": -8}, "hidden_size=-8"),
        ({"hidden_size": 66}, "hidden_size=66"),
        ({"sliding_window": 16}, "sliding_window=16"),
        ({"architecture": "Qwen2ForCausalLM", "head_dim": 32}, "head_dim=32"),
        ({"rope_scaling": {"factor": 2.0}}, "rope_scaling="),
        ({"seed": -3}, "seed=-3"),
        ({"init_std": float("nan")}, "init_std=nan"),
        ({"config_overrides": {"vocab_size": 100}}, "vocab_size=100"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        write_tiny_checkpoint(tmp_path / "ckpt", **kwargs)
    assert not (tmp_path / "ckpt").exists()


def test_path_that_is_a_file_raises(tmp_path):
    file = tmp_path / "not_a_dir"
    file.write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(file))):
        write_tiny_checkpoint(file)
