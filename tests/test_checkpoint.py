"""Checkpoint loading: sharded, pickle and reduced-precision checkpoints, and broken ones."""

import json
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from jaxllm import LLM, SamplingParams
from jaxllm.checkpoint import CheckpointError, load_config, load_params
from jaxllm.config import ModelConfig
from jaxllm.sharding import ParallelConfig, make_mesh
from jaxllm.tiny_checkpoint import write_tiny_checkpoint
from models import llama, llama_checkpoint

RNG = np.random.default_rng(31337)
SEED = int(RNG.integers(1, 2**31))
MAX_MODEL_LEN = 48
PROMPTS = ["Hello, world", "The quick brown fox"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "one", seed=SEED)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(ParallelConfig(1))


@pytest.fixture(scope="module")
def greedy_tokens(ckpt):
    llm = LLM(ckpt, dtype="float32", max_model_len=MAX_MODEL_LEN, progress=False)
    return _greedy(llm)


def _greedy(llm) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]


def _load(path, mesh, dtype="auto", **kw):
    params = load_params(path, load_config(path, dtype), mesh, progress=False, **kw)
    return jax.device_get(params)


def _assert_same_params(a, b):
    flat_a, tree_a = jax.tree.flatten_with_path(a)
    flat_b, tree_b = jax.tree.flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=str(path))


def _rewrite(file, change):
    tensors = safetensors.numpy.load_file(str(file))
    change(tensors)
    safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})


def _layer_tensor(config_path) -> str:
    layers = json.loads((config_path / "config.json").read_text())["num_hidden_layers"]
    kind = RNG.choice(["self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.down_proj.weight",
                       "post_attention_layernorm.weight"])
    return f"model.layers.{int(RNG.integers(layers))}.{kind}"


# -- layouts that load -----------------------------------------------------------------------


def test_sharded_equals_unsharded(ckpt, mesh, tmp_path):
    sharded = write_tiny_checkpoint(tmp_path / "sharded", seed=SEED, num_shards=3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    assert (sharded / "model.safetensors.index.json").is_file()
    _assert_same_params(_load(sharded, mesh), _load(ckpt, mesh))
    # A different seed gives different params: the comparison is not vacuous.
    other = write_tiny_checkpoint(tmp_path / "other", seed=SEED + 1, num_shards=3)
    with pytest.raises(AssertionError):
        _assert_same_params(_load(other, mesh), _load(ckpt, mesh))


def test_tied_embeddings_load(mesh, tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tied", seed=SEED, tie_word_embeddings=True)
    params = _load(path, mesh)
    assert "lm_head" not in params
    on_disk = safetensors.numpy.load_file(str(path / "model.safetensors"))
    np.testing.assert_array_equal(params["embed"], on_disk["model.embed_tokens.weight"])


def _to_pickle(src, dest, dtype=None):
    path = shutil.copytree(src, dest)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(str(f)))
        f.unlink()
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    torch.save(state, path / "pytorch_model.bin")
    return path


def test_pickle_refused_unless_allowed(ckpt, mesh, greedy_tokens, tmp_path):
    path = _to_pickle(ckpt, tmp_path / "pickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickle.*allow_pickle=True"):
        LLM(path, progress=False)
    _assert_same_params(_load(path, mesh, allow_pickle=True), _load(ckpt, mesh))
    llm = LLM(path, dtype="float32", max_model_len=MAX_MODEL_LEN, allow_pickle=True, progress=False)
    assert _greedy(llm) == greedy_tokens


def test_bfloat16_pickle_matches_bfloat16_safetensors(mesh, tmp_path):
    bf16 = write_tiny_checkpoint(tmp_path / "bf16", seed=SEED, dtype="bfloat16")
    path = _to_pickle(bf16, tmp_path / "bf16-pickled")
    from_pickle = _load(path, mesh, allow_pickle=True)
    assert from_pickle["embed"].dtype == ml_dtypes.bfloat16
    _assert_same_params(from_pickle, _load(bf16, mesh))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_generates(ckpt, mesh, tmp_path, dtype):
    llm = LLM(ckpt, dtype=dtype, max_model_len=MAX_MODEL_LEN, progress=False)
    assert llm.config.dtype == dtype
    assert all(x.dtype == jax.numpy.dtype(dtype) for x in jax.tree.leaves(llm.params))
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    for out in llm.generate(PROMPTS, sp, use_tqdm=False):
        c = out.outputs[0]
        assert len(c.token_ids) == 12
        lps = [e[t].logprob for t, e in zip(c.token_ids, c.logprobs)]
        lps += [e[t].logprob for t, e in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
        assert np.all(np.isfinite(lps)) and np.all(np.asarray(lps) <= 0)
        assert all(e[t].rank == 1 for t, e in zip(c.token_ids, c.logprobs))
    # A checkpoint saved in this dtype loads as this dtype ("auto") with the same values.
    saved = write_tiny_checkpoint(tmp_path / dtype, seed=SEED, dtype=dtype)
    assert load_config(saved).dtype == dtype
    _assert_same_params(_load(saved, mesh), jax.device_get(llm.params))


@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8", None])
def test_bad_dtype(ckpt, dtype):
    with pytest.raises(ValueError, match=rf"dtype {re.escape(repr(dtype))} not supported.*bfloat16"):
        LLM(ckpt, dtype=dtype, progress=False)


# -- broken checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["layer", "lm_head.weight", "model.norm.weight"])
def test_missing_tensor(ckpt, mesh, tmp_path, which):
    path = shutil.copytree(ckpt, tmp_path / "missing")
    name = _layer_tensor(path) if which == "layer" else which
    _rewrite(path / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor.*{re.escape(name)}"):
        _load(path, mesh)


def test_index_maps_tensor_to_shard_without_it(mesh, tmp_path):
    path = write_tiny_checkpoint(tmp_path / "sharded", seed=SEED, num_shards=3)
    name = _layer_tensor(path)
    shard = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
    _rewrite(path / shard, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor {re.escape(name)}.*{re.escape(shard)}"):
        _load(path, mesh)


def test_wrong_tensor_shape(ckpt, mesh, tmp_path):
    path = shutil.copytree(ckpt, tmp_path / "shape")
    name = _layer_tensor(path)

    def grow(t):
        old = t[name]
        t[name] = RNG.standard_normal((old.shape[0] + int(RNG.integers(1, 5)), *old.shape[1:])).astype(np.float32)
        return old.shape, t[name].shape

    shapes = {}
    _rewrite(path / "model.safetensors", lambda t: shapes.setdefault("s", grow(t)))
    want, got = shapes["s"]
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}.*{re.escape(str(list(got)))}.*"
                                              rf"{re.escape(str(list(want)))}"):
        _load(path, mesh)


@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_corrupt_safetensors(mesh, tmp_path, num_shards, damage):
    path = write_tiny_checkpoint(tmp_path / "corrupt", seed=SEED, num_shards=num_shards)
    files = sorted(path.glob("*.safetensors"))
    victim = files[int(RNG.integers(len(files)))]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[:int(len(data) * RNG.uniform(0.2, 0.95))])
    elif damage == "garbage":
        victim.write_bytes(RNG.integers(0, 256, size=len(data), dtype=np.uint8).tobytes())
    else:
        victim.write_bytes(data[:int(RNG.integers(1, 8))])
    with pytest.raises(CheckpointError, match=f"cannot read .*{re.escape(victim.name)}"):
        _load(path, mesh)


def test_index_names_missing_shard(mesh, tmp_path):
    path = write_tiny_checkpoint(tmp_path / "sharded", seed=SEED, num_shards=3)
    victim = sorted(path.glob("model-*.safetensors"))[int(RNG.integers(3))]
    victim.unlink()
    with pytest.raises(CheckpointError, match=re.escape(victim.name)):
        _load(path, mesh)


# -- the fused layout ------------------------------------------------------------------------


def test_convert_layer_reproduces_hf_projections():
    hkv, g, hd = int(RNG.integers(1, 4)), int(RNG.integers(1, 4)), 2 * int(RNG.integers(2, 6))
    d, f, t = int(RNG.integers(8, 40)), int(RNG.integers(8, 40)), int(RNG.integers(2, 7))
    h = hkv * g
    config = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=50, hidden_size=d, intermediate_size=f,
                         num_layers=2, num_heads=h, num_kv_heads=hkv, head_dim=hd,
                         qkv_bias=True, o_bias=True, qk_norm=True)
    layer = 1
    shapes = llama_checkpoint.hf_shapes(config)
    hf = {n: RNG.standard_normal(s).astype(np.float32) for n, s in shapes.items() if f"layers.{layer}." in n}
    assert sorted(hf) == sorted(llama_checkpoint.hf_layer_names(config, layer))
    ours = llama_checkpoint.convert_layer(config, layer, hf)
    want_shapes = {k: s[1:] for k, s in llama.param_shapes(config)["layers"].items()}
    assert {k: v.shape for k, v in ours.items()} == want_shapes

    w = lambda n: hf[f"model.layers.{layer}.{n}"]
    x = RNG.standard_normal((t, d)).astype(np.float32)
    # HF: y = x @ W^T + b, heads split from the output features; query head i uses KV head i // g.
    q_hf = (x @ w("self_attn.q_proj.weight").T + w("self_attn.q_proj.bias")).reshape(t, h, hd)
    k_hf = (x @ w("self_attn.k_proj.weight").T + w("self_attn.k_proj.bias")).reshape(t, hkv, hd)
    v_hf = (x @ w("self_attn.v_proj.weight").T + w("self_attn.v_proj.bias")).reshape(t, hkv, hd)
    qkv = np.einsum("td,dhgk->thgk", x, ours["wqkv"]) + ours["bqkv"]
    for i in range(h):
        np.testing.assert_allclose(qkv[:, i // g, i % g], q_hf[:, i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qkv[:, :, g], k_hf, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qkv[:, :, g + 1], v_hf, rtol=1e-5, atol=1e-5)

    attn = RNG.standard_normal((t, h, hd)).astype(np.float32)
    o_hf = attn.reshape(t, h * hd) @ w("self_attn.o_proj.weight").T + w("self_attn.o_proj.bias")
    o = np.einsum("thgk,hgkd->td", attn.reshape(t, hkv, g, hd), ours["wo"]) + ours["bo"]
    np.testing.assert_allclose(o, o_hf, rtol=1e-5, atol=1e-5)

    gate_up = np.einsum("td,dcf->tcf", x, ours["w_gate_up"])
    np.testing.assert_allclose(gate_up[:, 0], x @ w("mlp.gate_proj.weight").T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gate_up[:, 1], x @ w("mlp.up_proj.weight").T, rtol=1e-5, atol=1e-5)
    hidden = RNG.standard_normal((t, f)).astype(np.float32)
    np.testing.assert_allclose(hidden @ ours["w_down"], hidden @ w("mlp.down_proj.weight").T,
                               rtol=1e-5, atol=1e-5)
    for ours_name, hf_name in [("attn_norm", "input_layernorm.weight"),
                               ("mlp_norm", "post_attention_layernorm.weight"),
                               ("q_norm", "self_attn.q_norm.weight"), ("k_norm", "self_attn.k_norm.weight")]:
        np.testing.assert_array_equal(ours[ours_name], w(hf_name))
