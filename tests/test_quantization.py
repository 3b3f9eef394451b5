"""Quantization (int8, int4, AWQ, GPTQ, fp8 and SmoothQuant W8A8, fp4): the pytree swap, error bounds,
the quantized matmul, calibration, Hugging Face int4 checkpoints and the errors. The bundled model's
perplexity under each method, and the calibrated checkpoints `jaxllm quantize` writes from it, are in
test_quantization_bundled_model.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.ops import einsum
from jaxllm.calibration import InputStats, awq_input_scale, gptq_quantize
from jaxllm.quantization import (Int4Weight, QuantizedWeight, dequantize, quantize_int4, quantize_int8,
                                 quantize_params)
from jaxllm.tiny_checkpoint import write_tiny_checkpoint
from models.llama import INPUT_AXES

# In a child process: the full suite's process crashed here (SIGSEGV in jax 0.10.2's CPU compiler,
# which grows likelier with the number of programs one process compiles); see conftest.py.
# At the suite's fast-compiling XLA settings (conftest.py): these tests compile many small programs and
# compute little (alone, 99 s of CPU optimized, 36 s so); the bundled model's calibration and perplexity,
# heavy in arithmetic, run optimized in test_quantization_bundled_model.py.
pytestmark = pytest.mark.isolated_module(seconds=35)


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


def test_unknown_method_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="quantization 'int3' not supported; choose one of"):
        LLM(str(write_tiny_checkpoint(tmp_path)), skip_tokenizer_init=True, quantization="int3", progress=False)


def test_int4_packing_groups_and_error_bound():
    w = jax.random.normal(jax.random.PRNGKey(2), (256, 3, 8)) * jnp.arange(1, 9)
    qw = quantize_int4(w, (0,), group_size=64)
    assert isinstance(qw, Int4Weight) and qw.packed.dtype == jnp.uint8
    assert qw.packed.shape == (128, 24) and qw.scale.shape == (4, 24) and qw.zero.shape == (4, 24)
    deq = np.asarray(dequantize(qw)).reshape(256, 24)
    step = np.repeat(np.asarray(qw.scale), 64, axis=0)
    assert np.all(np.abs(deq - np.asarray(w).reshape(256, 24)) <= step / 2 + 1e-5)
    # the 4-bit codes survive packing: re-quantizing the dequantized weight gives the same bytes
    np.testing.assert_array_equal(quantize_int4(jnp.asarray(deq).reshape(w.shape), (0,), 64).packed, qw.packed)
    with pytest.raises(ValueError, match="group size 100 must be even and divide the input dimension 256"):
        quantize_int4(w, (0,), group_size=100)
    with pytest.raises(ValueError, match="input axes"):
        quantize_int4(w, (1,))


@pytest.mark.parametrize("subscripts,x_shape,w_shape,axes", [
    ("btd,dhgk->bthgk", (2, 3, 128), (128, 2, 6, 8), (0,)),
    ("bthgk,hgkd->btd", (2, 3, 2, 4, 16), (2, 4, 16, 32), (0, 1, 2)),
])
def test_int4_einsum_with_input_scales(subscripts, x_shape, w_shape, axes):
    kx, kw, ks = jax.random.split(jax.random.PRNGKey(3), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    k = int(np.prod([w_shape[a] for a in axes]))
    s = jnp.exp(0.3 * jax.random.normal(ks, (k,)))  # mild: random scales only hurt RTN
    qw = quantize_int4(w, axes, group_size=64, input_scale=s)
    got = einsum(subscripts, x, qw)
    np.testing.assert_allclose(got, jnp.einsum(subscripts, x, dequantize(qw)), rtol=1e-5, atol=1e-5)
    rel = float(jnp.linalg.norm(got - jnp.einsum(subscripts, x, w)) / jnp.linalg.norm(jnp.einsum(subscripts, x, w)))
    assert 1e-3 < rel < 0.2


def test_awq_protects_salient_input_channels():
    """Inputs with a few large channels: AWQ's scale search beats plain round-to-nearest."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 128)).astype(np.float32)
    x[:, :4] *= 30.0  # salient channels
    w = rng.standard_normal((128, 64)).astype(np.float32)
    stats = InputStats(np.abs(x).sum(0), x.shape[0], [x])
    scale, report = awq_input_scale(jnp.asarray(w), (0,), stats, group_size=64)
    assert report["alpha"] > 0 and report["loss"] < 0.8 * report["rtn_loss"]
    assert scale[:4].min() > scale[4:].max()  # the salient channels are scaled up


def test_quantization_bad_input(tmp_path, capsys):
    import json

    from jaxllm import cli

    with pytest.raises(ValueError, match="'awq' needs calibration data: write a quantized checkpoint"):
        LLM(quantization="awq", progress=False)
    assert cli.main(["quantize", "--method", "awq", "--out", str(tmp_path / "x")]) == 2
    assert "quantize --method awq needs --calib" in capsys.readouterr().err
    assert cli.main(["quantize", "--method", "int4", "--group-size", "100", "--out", str(tmp_path / "x")]) == 2
    assert "group size 100 must be even and divide the input dimension" in capsys.readouterr().err
    # a checkpoint quantized in a format we do not read: the error names what is supported
    path = write_tiny_checkpoint(tmp_path / "hf_awq")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantized as 'fp8', which jaxllm cannot load yet; supported"):
        LLM(str(path), skip_tokenizer_init=True, progress=False)
    # a jaxllm checkpoint cannot be quantized again with another method
    assert cli.main(["quantize", "--method", "int4", "--group-size", "64", "--out", str(tmp_path / "q4")]) == 0
    with pytest.raises(ValueError, match="already quantized with 'int4'"):
        LLM(str(tmp_path / "q4"), quantization="int8", progress=False)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_hf_int4_checkpoint_matches_dense_reference_from_same_integers(tmp_path, method):
    from jaxllm.tiny_checkpoint import write_tiny_int4_checkpoint

    qdir, ddir = write_tiny_int4_checkpoint(tmp_path / method, method, tmp_path / "dense", hidden_size=64,
                                            intermediate_size=128, num_heads=4, num_kv_heads=2, with_tokenizer=False)
    quant = LLM(str(qdir), dtype="float32", skip_tokenizer_init=True, progress=False)
    dense = LLM(str(ddir), dtype="float32", skip_tokenizer_init=True, progress=False)
    assert quant.quantization == method and isinstance(quant.params["layers"][1]["w_down"], Int4Weight)
    for a, b in zip(quant.params["layers"], dense.params["layers"]):
        for name in INPUT_AXES:
            if name in a:  # the same weights, up to the float16 rounding of the dense reference
                np.testing.assert_allclose(dequantize(a[name]), b[name], atol=5e-4, rtol=1e-3)
    prompt = [{"prompt_token_ids": [1, 5, 9, 33, 2, 17, 250, 3, 8]}]
    sp = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    pa, pb = (llm.generate(prompt, sp, use_tqdm=False)[0].prompt_logprobs[1:] for llm in (quant, dense))
    got = [lp[t].logprob for lp, t in zip(pa, prompt[0]["prompt_token_ids"][1:])]
    want = [lp[t].logprob for lp, t in zip(pb, prompt[0]["prompt_token_ids"][1:])]
    np.testing.assert_allclose(got, want, atol=5e-3)
    assert np.std(want) > 0.05  # the scored tokens differ in likelihood: not a flat comparison


@pytest.mark.parametrize("change,match", [
    (dict(desc_act=True), "act-order"),
    (dict(bits=8), "bits=8"),
    (dict(checkpoint_format="gptq_v2"), "checkpoint_format"),
])
def test_hf_int4_unsupported_configs_are_named(tmp_path, change, match):
    import json

    from jaxllm.tiny_checkpoint import write_tiny_int4_checkpoint

    qdir, _ = write_tiny_int4_checkpoint(tmp_path / "q", "gptq", tmp_path / "d", hidden_size=64,
                                         intermediate_size=128, num_heads=4, num_kv_heads=2, with_tokenizer=False)
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (qdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        LLM(str(qdir), skip_tokenizer_init=True, progress=False)


def test_gptq_beats_round_to_nearest_on_the_calibration_inputs():
    """GPTQ's error feedback lowers the output error || X W - X W_q || on correlated inputs."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((2048, 16))
    x = (base @ rng.standard_normal((16, 128)) + 0.1 * rng.standard_normal((2048, 128))).astype(np.float32)
    w = rng.standard_normal((128, 32)).astype(np.float32)
    stats = InputStats(np.abs(x).sum(0), x.shape[0], [x[:512]], x.T.astype(np.float64) @ x)
    gq = gptq_quantize(jnp.asarray(w), (0,), stats, group_size=64)
    rtn = quantize_int4(jnp.asarray(w), (0,), group_size=64)
    err = lambda q: float(np.linalg.norm(x @ (np.asarray(dequantize(q)) - w)))
    assert err(gq) < 0.7 * err(rtn)
    with pytest.raises(ValueError, match="second moment"):
        gptq_quantize(jnp.asarray(w), (0,), InputStats(np.ones(128), 1, [x[:4]]))


def _w8a8_reference(subscripts, x, w, s, kind):
    """Per-token quantized x / s times per-channel quantized diag(s) W, spelled out in numpy."""
    from jaxllm.quantization import QMAX, to_codes

    x2 = np.asarray(x, np.float32).reshape(-1, np.asarray(s).size) / np.asarray(s)
    w2 = np.asarray(w, np.float32).reshape(np.asarray(s).size, -1) * np.asarray(s)[:, None]
    sx = np.abs(x2).max(1, keepdims=True) / QMAX[kind]
    sw = np.abs(w2).max(0, keepdims=True) / QMAX[kind]
    qx = np.asarray(to_codes(jnp.asarray(x2 / sx), kind), np.float32)
    qw = np.asarray(to_codes(jnp.asarray(w2 / sw), kind), np.float32)
    return (qx @ qw) * sx * sw


@pytest.mark.parametrize("kind", ["int8", pytest.param("fp8", marks=pytest.mark.isolated)])
def test_w8a8_einsum_quantizes_tokens_and_channels(kind):
    from jaxllm.quantization import quantize_w8a8

    kx, kw, ks = jax.random.split(jax.random.PRNGKey(4), 3)
    x, w = jax.random.normal(kx, (2, 3, 64)), jax.random.normal(kw, (64, 40))
    s = jnp.exp(0.3 * jax.random.normal(ks, (64,)))
    qw = quantize_w8a8(w, (0,), kind, s)
    got = np.asarray(einsum("btd,dn->btn", x, qw)).reshape(6, 40)
    np.testing.assert_allclose(got, _w8a8_reference("btd,dn->btn", x, w, s, kind), rtol=1e-4, atol=1e-4)
    dense = np.asarray(jnp.einsum("btd,dn->btn", x, w)).reshape(6, 40)
    rel = np.linalg.norm(got - dense) / np.linalg.norm(dense)
    assert 1e-4 < rel < (0.02 if kind == "int8" else 0.06)
    # several contracted axes and a leading "..." (the output projection, the lm_head)
    w3 = jax.random.normal(kw, (2, 4, 8, 32))
    q3 = quantize_w8a8(w3, (0, 1, 2), kind)
    x3 = jax.random.normal(kx, (2, 3, 2, 4, 8))
    np.testing.assert_allclose(einsum("bthgk,hgkd->btd", x3, q3), jnp.einsum("bthgk,hgkd->btd", x3, w3),
                               rtol=0.15, atol=0.15 * float(jnp.abs(jnp.einsum("bthgk,hgkd->btd", x3, w3)).mean()))
    assert einsum("...d,dv->...v", x, qw).shape == (2, 3, 40)
    with pytest.raises(ValueError, match="W8A8 kind 'int4' not supported; choose one of"):
        quantize_w8a8(w, (0,), "int4")
    with pytest.raises(ValueError, match="input axes"):
        quantize_w8a8(w, (1,), kind)


def test_smoothquant_moves_activation_outliers_into_the_weights():
    from jaxllm.calibration import smoothquant_input_scale

    rng = np.random.default_rng(2)
    x = rng.standard_normal((512, 128)).astype(np.float32)
    x[:, 3] *= 60.0  # an outlier channel, as LLM activations have
    w = rng.standard_normal((128, 64)).astype(np.float32)
    stats = InputStats(np.abs(x).sum(0), 512, [x], abs_max=np.abs(x).max(0))
    s, report = smoothquant_input_scale(jnp.asarray(w), stats)
    assert report["alpha"] > 0 and report["loss"] < 0.5 * report["unsmoothed_loss"]
    assert s[3] == s.max()


@pytest.mark.isolated  # NVFP4 scales are e4m3: fp8 compiles (conftest.py)
def test_fp4_blocks_round_trip_and_error():
    from jaxllm.quantization import FP4_VALUES, FP4Weight, quantize_fp4

    # values exactly representable (an e2m1 value times a power of two per block) come back exactly
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 16, (64, 6))
    codes[0] = 7  # each block of 32 holds a 6, so the MX shared exponent is that of the table
    codes[32] = 7
    exact = FP4_VALUES[codes] * np.repeat(2.0 ** rng.integers(-3, 3, (2, 6)), 32, axis=0)
    q = quantize_fp4(jnp.asarray(exact), (0,), "mxfp4")
    np.testing.assert_array_equal(np.asarray(dequantize(q)), exact)
    w = jax.random.normal(jax.random.PRNGKey(6), (128, 5, 8))
    errs = {}
    for fmt in ("mxfp4", "nvfp4"):
        qw = quantize_fp4(w, (0,), fmt)
        assert isinstance(qw, FP4Weight) and qw.packed.shape == (64, 40)
        errs[fmt] = float(jnp.linalg.norm(dequantize(qw) - w) / jnp.linalg.norm(w))
    assert 0.02 < errs["nvfp4"] < errs["mxfp4"] < 0.15  # NV's finer blocks and scales win
    with pytest.raises(ValueError, match="multiple of its block of 32"):
        quantize_fp4(jax.random.normal(jax.random.PRNGKey(0), (48, 4)), (0,), "mxfp4")
