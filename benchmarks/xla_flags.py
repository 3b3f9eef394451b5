"""Batch-1 decode of the Llama-3-8B shape under XLA flag variants, each in its own process.

For each variant: tokens/s over 256 new tokens (median of 3, time to first token subtracted),
GPU kernels and kernel time per step (profiler, difference of a 128- and a 65-token run), and
the first 64 greedy tokens (to compare against the first variant). A variant whose name starts
with "textbook" runs the forward's earlier forms (RMSNorm before the product, one-token cache writes as scatters).

    PYTHONPATH=. python -m benchmarks.xla_flags --out flags.json \\
        --variant base= --variant softmax=--xla_gpu_experimental_enable_triton_softmax_priority_fusion=true
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def restore_textbook_forms() -> None:
    """The forward as it was before the norm-after-product and one-token cache-write changes, for
    an A/B in one run (variants whose name starts with "textbook")."""
    from jaxllm import ops  # before models (models -> jaxllm -> runner -> models is circular)
    from jaxllm.ops import attention
    import models.llama as llama

    def normed_einsum(subscripts, x, norm_weight, w, eps):
        return ops.einsum(subscripts, llama.rms_norm(x, norm_weight, eps), w)

    def write_kv(pages, layer, new, page_table, positions):
        page, slot = attention.slot_address(page_table, positions, pages.shape[2])
        return pages.at[layer, page, slot].set(new.astype(pages.dtype))

    llama.normed_einsum, attention.write_kv = normed_einsum, write_kv


def dense_kmajor(params: dict, kernel: bool) -> dict:
    """The layers' bf16 weights stored K-major ([N, K], as cuBLAS's "TN" gemv and our K-major
    kernel read them), with `ops.einsum` patched to multiply them: through XLA, or with `kernel`
    through `pallas_kernels.quant_matmul_kmajor.bf16_kmajor` up to 16 tokens where it takes the
    shape. For the variants named "kmajor_xla" and "kmajor_kernel"; returns the converted params."""
    import dataclasses
    import functools
    import math

    import jax
    from jax import lax

    from jaxllm import ops
    from jaxllm.ops.matmul import as_matrix_product
    from models.llama import INPUT_AXES
    from jaxllm.kernel_weights import _kernels_take
    from pallas_kernels.quant_matmul_kmajor import bf16_kmajor

    @functools.partial(jax.tree_util.register_dataclass, data_fields=["w_t"], meta_fields=["shape"])
    @dataclasses.dataclass(frozen=True)
    class DenseKMajor:
        w_t: jax.Array  # [N, K]
        shape: tuple[int, ...]  # the stored weight's shape

    einsum = ops.einsum

    def patched(subscripts, x, w):
        if not isinstance(w, DenseKMajor):
            return einsum(subscripts, x, w)
        m, k, n, out_shape = as_matrix_product(subscripts, tuple(x.shape), w.shape)
        x2 = x.reshape(m, k).astype(w.w_t.dtype)
        if kernel and m <= 16 and _kernels_take("bf16", k, n):
            y = bf16_kmajor(x2, w.w_t, interpret=jax.default_backend() != "gpu")
        else:
            y = lax.dot_general(x2, w.w_t, (((1,), (1,)), ((), ())))
        return y.astype(x.dtype).reshape(out_shape)

    ops.einsum = patched

    def convert(name, w):
        k = math.prod(w.shape[: len(INPUT_AXES[name])])
        return DenseKMajor(w.reshape(k, -1).T, tuple(w.shape))

    layers = [{name: convert(name, w) if name in INPUT_AXES and name != "lm_head" else w for name, w in layer.items()}
              for layer in params["layers"]]
    return {**params, "layers": layers}


def child(out_path: str, textbook: bool, profile: bool = True) -> None:
    import jax
    import numpy as np

    if textbook:
        restore_textbook_forms()
    if os.environ.get("JAXLLM_BENCH_UNFUSED") == "1":
        # The decode step as before the attention kernel stored the new token: XLA writes it (two
        # cache-update kernels a layer), then the kernel reads it back from the page.
        from jaxllm.ops import attention

        attention.STORE_IN_KERNEL_MAX_BATCH = 0
    if os.environ.get("JAXLLM_BENCH_DECODE_CONFIG"):  # "BLOCK_KV,STAGES": the decode kernel's default
        from pallas_kernels import paged_decode_attention as pda

        block_kv, stages = map(int, os.environ["JAXLLM_BENCH_DECODE_CONFIG"].split(","))
        for fn in (pda.paged_decode_attention, pda.paged_decode_attention_append):
            fn.__kwdefaults__["config"] = pda.DecodeConfig(block_kv, stages)

    from benchmarks.decode import _nbytes, _timed
    from benchmarks.profile_decode import summarise, traced_events
    from benchmarks.shapes import COPY_BANDWIDTH, llama3_8b
    from jaxllm import LLM, SamplingParams
    from jaxllm.checkpoint import random_params
    from jaxllm.sharding import ParallelConfig, make_mesh
    from models.llama import unstack_layers

    config = llama3_8b()
    mesh = make_mesh(ParallelConfig(1))
    params = unstack_layers(random_params(config, mesh))
    if os.environ.get("JAXLLM_BENCH_KMAJOR"):
        params = dense_kmajor(params, kernel=os.environ["JAXLLM_BENCH_KMAJOR"] == "kernel")
    llm = LLM.from_params(config, params, mesh, max_model_len=512, max_num_seqs=1)
    prompts = [{"prompt_token_ids": np.random.default_rng(0).integers(0, config.vocab_size, 128).tolist()}]
    sp = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate(prompts, sp(256), use_tqdm=False)
    llm.generate(prompts, sp(1), use_tqdm=False)
    compile_s = time.perf_counter() - start
    total = float(np.median(_timed(lambda: llm.generate(prompts, sp(256), use_tqdm=False), 3)))
    ttft = float(np.median(_timed(lambda: llm.generate(prompts, sp(1), use_tqdm=False), 3)))
    step_s = (total - ttft) / 255
    step_bytes = _nbytes(llm.params) - params["embed"].nbytes + 2 * 32 * 8 * 128 * 2 * (128 + 128)
    prof = dict(kernels_per_step=None, kernel_us_per_step=None, top=[])
    if profile:
        (short, _), (long, _) = (traced_events(llm, prompts, sp(n)) for n in (65, 128))
        prof = summarise(short, long, 128 - 65, top=60)
    result = dict(tokens_per_s=1 / step_s, ms_per_step=1e3 * step_s,
                  fraction_of_copy_ceiling=step_bytes / step_s / COPY_BANDWIDTH,
                  compile_and_first_run_s=compile_s, kernels_per_step=prof["kernels_per_step"],
                  kernel_us_per_step=prof["kernel_us_per_step"], top=prof["top"],
                  greedy_tokens=out[0].outputs[0].token_ids[:64], jax=jax.__version__)
    with open(out_path, "w") as f:
        json.dump(result, f)


def _decode_config(name: str) -> str:
    """"128,2" for a variant named kv128_s2 (or kv128_s2_again), else ""."""
    import re

    match = re.match(r"kv(\d+)_s(\d+)", name)
    return f"{match[1]},{match[2]}" if match else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", action="append", default=[], help="NAME=FLAGS (space-separated XLA flags)")
    parser.add_argument("--out", default="xla_flags.json")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="stop a variant's process when this many seconds have passed since the start")
    parser.add_argument("--no-profile", action="store_true", help="tokens/s only, no profiler trace per variant")
    parser.add_argument("--profile-variants", nargs="*", default=None,
                        help="with --no-profile: the variants that still get a profile")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, textbook=os.environ.get("JAXLLM_BENCH_TEXTBOOK") == "1",
              profile=os.environ.get("JAXLLM_BENCH_PROFILE") != "0")
        return 0
    results, began = [], time.perf_counter()
    for spec in args.variant or ["base="]:
        name, _, flags = spec.partition("=")
        env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags])),
                   JAXLLM_BENCH_TEXTBOOK="1" if name.startswith("textbook") else "0",
                   JAXLLM_BENCH_UNFUSED="1" if name.startswith("unfused") else "0",
                   JAXLLM_BENCH_DECODE_CONFIG=_decode_config(name),
                   JAXLLM_BENCH_KMAJOR=name.split("_")[1] if name.startswith("kmajor_") else "",
                   JAXLLM_BENCH_PROFILE="0" if args.no_profile and name not in (args.profile_variants or ()) else "1")
        path = f"{args.out}.{name}.part"
        start = time.perf_counter()
        left = None if args.deadline_s is None else max(1.0, args.deadline_s - (time.perf_counter() - began))
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.xla_flags", "--child", path], env=env,
                                  capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess([], -9, "", f"stopped at the {args.deadline_s} s deadline")
        row = dict(name=name, flags=flags, wall_s=time.perf_counter() - start, returncode=proc.returncode)
        if proc.returncode == 0:
            with open(path) as f:
                row.update(json.load(f))
            os.remove(path)
            if results and "greedy_tokens" in results[0]:
                base = results[0]["greedy_tokens"]
                row["tokens_equal_first_variant"] = sum(a == b for a, b in zip(base, row["greedy_tokens"]))
        else:
            row["stderr_tail"] = proc.stderr[-3000:]
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("top", "greedy_tokens")}), flush=True)
        for t in row.get("top", [])[:14]:
            print(f"  {t['us_per_step']:8.1f} us x{t['calls_per_step']:5.1f} {t['name'][:90]}", flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d"), results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
