"""Serving throughput of the 8B shape (random bf16 weights): the engine (AsyncLLM, in-flight
batching), one LLM.generate call in static batches and one on the engine (batching="inflight"), on
random-token workloads, each after an untimed warm-up.

    PYTHONPATH=. python -m benchmarks.engine_throughput --workloads 128x128 --num-prompts 256
    PYTHONPATH=. python -m benchmarks.engine_throughput --small --workloads 16x8 --num-prompts 8   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from benchmarks.shapes import random_model
from jaxllm import LLM
from jaxllm.bench import RandomWorkload, run_throughput
from jaxllm.engine.engine import EngineConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", nargs="+", default=["128x128"], help="INPUTxOUTPUT lengths")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--backends", nargs="+", default=["engine", "llm", "llm-inflight"],
                        choices=["engine", "llm", "llm-inflight"])
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                        help="page pool share: the XLA attention path of mixed prefill steps needs room")
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                        help="engine runs: tokens a step computes (decodes and prefill chunks)")
    parser.add_argument("--num-decode-steps", type=int, nargs="+", default=[8],
                        help="engine runs, one per value: decode steps per scheduler visit")
    parser.add_argument("--quantization", default=None, help="LLM's quantization (e.g. fp8); default bf16")
    parser.add_argument("--kv-cache-dtype", default="auto", help="LLM's kv_cache_dtype (auto, fp8, int8)")
    parser.add_argument("--small", action="store_true", help="a tiny model, to smoke-test on a CPU")
    parser.add_argument("--out", default="results_engine_throughput.json")
    args = parser.parse_args(argv)
    config, mesh, params = random_model(args.small)
    rows = []
    for workload in args.workloads:
        n_in, n_out = map(int, workload.split("x"))
        llm = LLM.from_params(config, params, mesh, max_model_len=n_in + n_out + 16, max_num_seqs=args.max_num_seqs,
                              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
        requests = RandomWorkload(args.num_prompts, n_in, n_out).sample(config.vocab_size)
        runs = [(b, n) for b in args.backends for n in (args.num_decode_steps if b == "engine" else [None])]
        for backend, steps in runs:
            start = time.perf_counter()
            engine_config = EngineConfig(max_num_seqs=args.max_num_seqs, num_decode_steps=steps or 1,
                                         gpu_memory_utilization=args.gpu_memory_utilization,
                                         max_num_batched_tokens=args.max_num_batched_tokens)
            # "llm" is LLM.generate in static batches, "llm-inflight" LLM.generate on the engine.
            llm.batching = "inflight" if backend == "llm-inflight" else "static"
            def warmed(seconds, compiles, name=f"{workload} {backend} (decode steps a visit: {steps})"):
                print(f"{name}: warm-up {seconds:.0f} s, {compiles[0]} compilations ({compiles[1]:.0f} s)", flush=True)

            result = run_throughput(llm, requests, backend="llm" if backend.startswith("llm") else backend,
                                    engine_config=engine_config, on_warm=warmed)
            row = dict(result.as_dict(), backend=backend, workload=workload, num_decode_steps=steps,
                       quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                       max_num_batched_tokens=args.max_num_batched_tokens if backend == "engine" else None,
                       wall_with_warmup_s=time.perf_counter() - start)
            rows.append(row)
            print(f"{workload} {backend} (decode steps a visit: {steps}): {result.output_tokens_per_s:,.0f} output tok/s "
                  f"({result.elapsed_s:.1f} s timed, {row['wall_with_warmup_s']:.0f} s with warm-up)", flush=True)
            with open(args.out, "w") as f:
                json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, rows=rows), f, indent=1,
                          default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
