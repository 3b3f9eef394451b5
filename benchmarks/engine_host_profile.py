"""Where an engine step's wall time goes: the synchronous `Engine` (no AsyncLLM thread) on a
random-token workload, once untimed (compiles), then timed with async scheduling on, off and on
again (same engine and programs), once under cProfile; the JSON holds each run's step and device
totals and the profile's top functions by own and cumulative time.

    PYTHONPATH=. python -m benchmarks.engine_host_profile --workload 128x128 --num-prompts 1024 --out p.json
    PYTHONPATH=. python -m benchmarks.engine_host_profile --small --out /tmp/p.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import pstats
import time

import jax

from benchmarks.shapes import random_model
from jaxllm import LLM, SamplingParams
from jaxllm.bench import RandomWorkload, compile_count
from jaxllm.engine.engine import Engine, EngineConfig


def _serve(engine: Engine, requests, n_out: int, tag: str) -> dict:
    params = SamplingParams(max_tokens=n_out, temperature=1.0, ignore_eos=True)
    before, compiled = engine.metrics(), compile_count()
    start = time.perf_counter()
    for i, r in enumerate(requests):
        engine.add_request(f"{tag}{i}", {"prompt_token_ids": list(r.prompt_token_ids)}, params)
    calls = 0
    while engine.has_unfinished_requests():
        engine.step()
        calls += 1
    elapsed = time.perf_counter() - start
    m = engine.metrics()
    return dict(elapsed_s=elapsed, output_tokens_per_s=len(requests) * n_out / elapsed, step_calls=calls,
                steps=m.steps - before.steps, step_s=m.step_s - before.step_s,
                device_s=m.device_s - before.device_s,
                chained_visits=m.chained_visits - before.chained_visits,
                compiles=compile_count()[0] - compiled[0])


def _top(stats: pstats.Stats, key: str, n: int) -> list[dict]:
    stats.sort_stats(key)
    rows = []
    for func in stats.fcn_list[:n]:
        cc, nc, tt, ct, _ = stats.stats[func]
        rows.append(dict(function=f"{func[0]}:{func[1]}({func[2]})", calls=nc, own_s=tt, cumulative_s=ct))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="128x128", help="INPUTxOUTPUT lengths")
    parser.add_argument("--num-prompts", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--num-decode-steps", type=int, default=8)
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens)
    parser.add_argument("--small", action="store_true", help="a tiny model, to smoke-test on a CPU")
    parser.add_argument("--out", default="results_engine_host_profile.json")
    args = parser.parse_args(argv)
    config, mesh, params = random_model(args.small)
    n_in, n_out = map(int, args.workload.split("x"))
    llm = LLM.from_params(config, params, mesh, max_model_len=n_in + n_out + 16, max_num_seqs=args.max_num_seqs)
    engine_config = EngineConfig(max_num_seqs=args.max_num_seqs, num_decode_steps=args.num_decode_steps,
                                 max_num_batched_tokens=args.max_num_batched_tokens,
                                 gpu_memory_utilization=args.gpu_memory_utilization,
                                 num_pages=args.max_num_seqs * -(-(n_in + n_out) // 16) + 1 if args.small else None)
    engine = Engine(llm, engine_config)
    result = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, workload=args.workload,
                  num_prompts=args.num_prompts, max_num_seqs=args.max_num_seqs)
    for tag, chain in (("compile", True), ("timed", True), ("timed_sync", False), ("timed_again", True)):
        engine.config = dataclasses.replace(engine_config, async_scheduling=chain)
        requests = RandomWorkload(args.num_prompts, n_in, n_out, seed=len(tag)).sample(config.vocab_size)
        result[tag] = _serve(engine, requests, n_out, tag)
        print(tag, result[tag], flush=True)
    requests = RandomWorkload(args.num_prompts, n_in, n_out, seed=99).sample(config.vocab_size)
    profiler = cProfile.Profile()
    profiler.enable()
    result["profiled"] = _serve(engine, requests, n_out, "profiled")
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    result["top_own"], result["top_cumulative"] = _top(stats, "tottime", 40), _top(stats, "cumulative", 60)
    print("profiled", result["profiled"])
    for row in result["top_own"][:25]:
        print(f"{row['own_s']:8.3f} {row['cumulative_s']:8.3f} {row['calls']:8d} {row['function']}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
