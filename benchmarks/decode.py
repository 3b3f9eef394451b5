"""Batch-1 decode and prefill of a Llama-3-8B-shaped model with random bf16 weights."""

from __future__ import annotations

import time

import jax
import numpy as np

from benchmarks.shapes import BF16_MATMUL, COPY_BANDWIDTH, llama3_8b, tiny
from jaxllm import LLM, SamplingParams
from jaxllm.checkpoint import random_params
from jaxllm.sharding import ParallelConfig, make_mesh
from models.llama import unstack_layers


def _nbytes(tree) -> int:
    """Bytes the arrays hold; 4-bit types count half a byte (XLA packs them two to a byte)."""
    bits = lambda dt: 4 if dt.name in ("int4", "uint4") else 8 * dt.itemsize
    return sum(x.size * bits(x.dtype) // 8 for x in jax.tree.leaves(tree))


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


SMALL = dict(prompt_len=16, new_tokens=16, prefill_len=64, repeats=1,
             config=tiny())


def run(batch: int = 1, prompt_len: int = 128, new_tokens: int = 256, prefill_len: int | None = 2048,
        repeats: int = 3, config=None, layers: str = "scan", params=None, temperature: float = 0.0,
        quantization: str | None = None) -> dict:
    """One decode measurement; `layers` is "scan" (stacked weights) or "unrolled" (a list)."""
    config = config or llama3_8b()
    mesh = make_mesh(ParallelConfig(1))
    params = params if params is not None else random_params(config, mesh)
    if layers == "unrolled":
        params = unstack_layers(params)
    max_len = max(prefill_len or 0, prompt_len + new_tokens) + 16
    llm = LLM.from_params(config, params, mesh, max_model_len=max_len, max_num_seqs=max(batch, 1),
                          quantization=quantization)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, config.vocab_size, prompt_len).tolist()}
               for _ in range(batch)]
    sampled = dict(temperature=temperature, top_p=0.95, seed=0) if temperature else dict(temperature=0.0)
    full = SamplingParams(max_tokens=new_tokens, ignore_eos=True, **sampled)
    first = SamplingParams(max_tokens=1, ignore_eos=True, **sampled)

    generate = lambda p: llm.generate(prompts, p, use_tqdm=False)
    compile_start = time.perf_counter()
    out = generate(full)
    generate(first)
    compile_s = time.perf_counter() - compile_start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in out)

    total = float(np.median(_timed(lambda: generate(full), repeats)))
    ttft = float(np.median(_timed(lambda: generate(first), repeats)))
    decode_s = total - ttft
    tokens_per_s = batch * (new_tokens - 1) / decode_s

    weight_bytes = _nbytes(llm.params) - params["embed"].nbytes  # a step reads one embedding row
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2
    mean_context = prompt_len + new_tokens / 2
    step_bytes = weight_bytes + batch * kv_per_token * mean_context
    bandwidth = step_bytes * (new_tokens - 1) / decode_s

    prefill = _prefill(llm, config, params, prefill_len, repeats, rng) if prefill_len else {}
    return {
        "shape": "llama3-8b" if config.hidden_size == 4096 else "small", "layers": layers,
        "temperature": temperature, "quantization": quantization,
        "dtype": config.dtype, "batch": batch, "prompt_len": prompt_len,
        "new_tokens": new_tokens, "compile_and_first_run_s": compile_s,
        "generate_s": total, "ttft_s": ttft, "decode_s": decode_s,
        "decode_tokens_per_s": tokens_per_s, "ms_per_step": 1e3 * decode_s / (new_tokens - 1),
        "weight_bytes": weight_bytes, "bytes_per_step": step_bytes,
        "bandwidth_TBps": bandwidth / 1e12, "fraction_of_copy_ceiling": bandwidth / COPY_BANDWIDTH,
        "ceiling_tokens_per_s": COPY_BANDWIDTH / step_bytes,
        **prefill,
        "greedy_tokens": out[0].outputs[0].token_ids,
    }


def _prefill(llm, config, params, prefill_len: int, repeats: int, rng) -> dict:
    """Batch-1 prefill of `prefill_len` tokens: time and TFLOP/s."""
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    long_prompt = [{"prompt_token_ids": rng.integers(0, config.vocab_size, prefill_len).tolist()}]
    llm.generate(long_prompt, first, use_tqdm=False)
    prefill_s = float(np.median(_timed(lambda: llm.generate(long_prompt, first, use_tqdm=False), repeats)))
    layers = params["layers"]
    matmul_params = _nbytes(layers) // 2  # prefill projects only the last token to logits
    attn_flops = 4 * config.num_layers * config.num_heads * config.head_dim * prefill_len**2 / 2
    prefill_flops = 2 * matmul_params * prefill_len + attn_flops
    return {"prefill_len": prefill_len, "prefill_s": prefill_s, "prefill_TFLOPs": prefill_flops / prefill_s / 1e12,
            "prefill_fraction_of_matmul_ceiling": prefill_flops / prefill_s / BF16_MATMUL}
