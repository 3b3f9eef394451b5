"""Time to first token of many requests sharing a long prefix, with prefix reuse on and off (issue 5:
64 requests sharing a 1024-token prefix should see at least 5x better TTFT with reuse).

For each setting: an untimed pass of the same shape (compiles), then one request that leaves a new
shared prefix in the cache, then the timed batch, added at once to the synchronous engine. A
request's TTFT is when the engine step that samples its first token returns.

    PYTHONPATH=. python -m benchmarks.prefix_reuse --out benchmarks/results_prefix_reuse_h200.json
    PYTHONPATH=. python -m benchmarks.prefix_reuse --small --out /tmp/prefix.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from jaxllm import LLM, SamplingParams
from jaxllm.bench import summarize
from jaxllm.engine.engine import Engine, EngineConfig
from jaxllm.kv_cache import pages_for


def _prompts(rng, vocab: int, num: int, prefix_len: int, suffix_len: int) -> list[list[int]]:
    prefix = rng.integers(0, vocab, prefix_len).tolist()
    return [prefix + rng.integers(0, vocab, suffix_len).tolist() for _ in range(num)]


def _timed_batch(engine: Engine, prompts: list[list[int]], out_len: int, tag: str) -> tuple[list[float], float]:
    """Adds every prompt at once and steps to the end: (TTFT of each, total seconds)."""
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}{i}", {"prompt_token_ids": p}, params)
    first: dict[str, float] = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter() - start
        for out in outs:
            first.setdefault(out.request_id, now)
    return [first[f"{tag}{i}"] for i in range(len(prompts))], time.perf_counter() - start


def run(llm: LLM, *, caching: bool, num: int, prefix_len: int, suffix_len: int, out_len: int,
        page_size: int, budget: int, seed: int = 0) -> dict:
    """One setting: compile pass, prefix warm-up, timed batch; TTFT statistics and engine counts."""
    rng = np.random.default_rng(seed)
    per_seq = pages_for(prefix_len + suffix_len + out_len, page_size)
    config = EngineConfig(num_pages=(num + 1) * per_seq + 1, page_size=page_size, max_num_seqs=num,
                          max_num_batched_tokens=budget, enable_prefix_caching=caching)
    engine = Engine(llm, config)
    vocab = llm.config.vocab_size
    for tag in ("compile", "timed"):
        prompts = _prompts(rng, vocab, num, prefix_len, suffix_len)
        _timed_batch(engine, prompts[:1], 1, f"{tag}-warm")  # leaves the prefix's pages cached (if on)
        before = engine.metrics()
        ttft, total = _timed_batch(engine, prompts, out_len, tag)
    after = engine.metrics()
    s = summarize(ttft)
    return dict(prefix_caching=caching, ttft_mean_s=s.mean, ttft_p50_s=s.p50, ttft_p90_s=s.p90,
                ttft_p99_s=s.p99, total_s=total,
                prompt_tokens_computed=after.prompt_tokens_computed - before.prompt_tokens_computed,
                prefix_cache_hits=after.prefix_cache_hits - before.prefix_cache_hits)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--small", action="store_true", help="a tiny model and workload, to smoke-test on a CPU")
    parser.add_argument("--out", default="results_prefix_reuse.json")
    args = parser.parse_args(argv)

    from benchmarks.shapes import random_model

    if args.small:
        args.num_requests, args.prefix_len, args.suffix_len, args.output_len = 8, 64, 8, 2
        args.page_size, args.max_num_batched_tokens = 8, 128
    config, mesh, params = random_model(args.small)
    max_len = args.prefix_len + args.suffix_len + args.output_len + 16
    llm = LLM.from_params(config, params, mesh, max_model_len=max_len, max_num_seqs=args.num_requests,
                          page_size=args.page_size)
    sizes = dict(num=args.num_requests, prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                 out_len=args.output_len, page_size=args.page_size, budget=args.max_num_batched_tokens)
    rows = [run(llm, caching=caching, **sizes) for caching in (False, True)]
    for row in rows:
        print(json.dumps(row), flush=True)
    result = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, device=jax.devices()[0].device_kind,
                  workload=sizes, rows=rows, ttft_mean_ratio=rows[0]["ttft_mean_s"] / rows[1]["ttft_mean_s"])
    print(f"mean TTFT without reuse / with reuse: {result['ttft_mean_ratio']:.2f}x", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
