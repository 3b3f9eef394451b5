"""Decode tokens/s of the 8B shape with the XLA attention path and with our Pallas kernel, one run.

    PYTHONPATH=. python -m benchmarks.decode_backends --batch 1 8 32 64 --out results_decode_backends.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from benchmarks import decode
from benchmarks.shapes import llama3_8b
from jaxllm import LLM, SamplingParams
from jaxllm.checkpoint import random_params
from jaxllm.sharding import ParallelConfig, make_mesh
from models.llama import unstack_layers


def compare_logprobs(config, params, backends, steps: int = 64) -> dict:
    """Batch-1 greedy decode with logprobs on each backend: where the tokens first differ, and how
    far the chosen tokens' logprobs drift before that (bf16 rounding differs between the paths)."""
    mesh = make_mesh(ParallelConfig(1))
    params = unstack_layers(params)
    prompt = [{"prompt_token_ids": np.random.default_rng(1).integers(0, config.vocab_size, 128).tolist()}]
    sp = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, logprobs=2)
    runs = {}
    for backend in backends:
        llm = LLM.from_params(config.replace(attention_backend=backend), params, mesh, max_model_len=256,
                              max_num_seqs=1)
        runs[backend] = llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0]
    a, b = (runs[k] for k in backends[:2])
    first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
    same = len(a.token_ids) if first is None else first
    drift = [abs(a.logprobs[i][t].logprob - b.logprobs[i][t].logprob) for i, t in enumerate(a.token_ids[:same])]
    result = dict(steps=steps, first_difference=first, max_abs_logprob_diff_before=max(drift, default=0.0))
    if first is not None:  # how close the reference's top two were where the paths parted
        top = sorted((lp.logprob for lp in a.logprobs[first].values()), reverse=True)
        result["reference_top2_gap_at_difference"] = top[0] - top[1] if len(top) > 1 else None
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--backends", nargs="+", default=["xla", "pallas"], help="the first is the reference")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--xla-batches", type=int, nargs="*", default=None,
                        help="batches that also run the XLA path (default: all)")
    parser.add_argument("--int8-batches", type=int, nargs="*", default=[],
                        help="batches to run again with int8 weight-only quantization (Pallas attention)")
    parser.add_argument("--prefill-len", type=int, default=None, help="also time one prefill of this length")
    parser.add_argument("--out", default="results_decode_backends.json")
    args = parser.parse_args(argv)
    config = llama3_8b()
    params = random_params(config, make_mesh(ParallelConfig(1)))
    rows, tokens = [], {}
    for batch in args.batch:
        for backend in args.backends:
            if backend == "xla" and args.xla_batches is not None and batch not in args.xla_batches:
                continue
            try:
                row = decode.run(batch=batch, config=config.replace(attention_backend=backend), params=params,
                                 layers="unrolled", prefill_len=args.prefill_len if batch == 1 else None,
                                 repeats=args.repeats)
            except Exception as e:  # a failing path is reported, and the others still run
                print(f"batch {batch:3d} {backend:7s} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
                rows.append(dict(batch=batch, backend=backend, error=f"{type(e).__name__}: {str(e)[:2000]}"))
                continue
            tokens[(batch, backend)] = row.pop("greedy_tokens")
            row["backend"] = backend
            rows.append(row)
            print(f"batch {batch:3d} {backend:7s} {row['decode_tokens_per_s']:9.1f} tok/s "
                  f"{row['ms_per_step']:.3f} ms/step {row['fraction_of_copy_ceiling']:.3f} of copy bw"
                  + (f"; prefill {row['prefill_len']}: {row['prefill_s'] * 1e3:.1f} ms, "
                     f"{row['prefill_TFLOPs']:.0f} TFLOP/s" if "prefill_s" in row else ""), flush=True)
        same = [tokens[(batch, b)] for b in args.backends if (batch, b) in tokens]
        if len(same) < 2:
            continue
        first_diff = next((i for i, t in enumerate(zip(*same)) if len(set(t)) > 1), None)
        print(f"batch {batch}: greedy tokens of row 0 equal across backends: {first_diff is None} "
              f"(first difference at step {first_diff})", flush=True)
        rows.append(dict(batch=batch, greedy_equal=first_diff is None, first_difference=first_diff))
    for batch in args.int8_batches:
        row = decode.run(batch=batch, config=config.replace(attention_backend="auto"), params=params,
                         layers="unrolled", prefill_len=None, repeats=args.repeats, quantization="int8")
        row.pop("greedy_tokens")
        rows.append(dict(row, backend="auto+int8"))
        print(f"batch {batch:3d} int8    {row['decode_tokens_per_s']:9.1f} tok/s {row['ms_per_step']:.3f} ms/step "
              f"{row['fraction_of_copy_ceiling']:.3f} of copy bw (int8 bytes)", flush=True)
    try:
        agreement = compare_logprobs(config, params, args.backends)
    except Exception as e:
        agreement = dict(error=f"{type(e).__name__}: {str(e)[:2000]}")
    print("logprob agreement:", json.dumps(agreement), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, rows=rows,
                       logprob_agreement=agreement), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
