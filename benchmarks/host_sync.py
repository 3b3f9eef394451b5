"""What host round trips cost on the device: XLA's GPU runtime copies a `lax.cond` predicate, and a
while-loop predicate whose trip count it cannot prove, to the host and waits for it.

Part 1 (micro): how long a jitted call takes to return against how long its work takes, with and
without a trailing `lax.cond`; the cost per iteration of a tiny loop body under `lax.while_loop`
(trip count unknown), `lax.fori_loop` (known), and either with a `lax.cond` inside.
Part 2 (decode): `runner.decode` per step with the sampling path chosen on the device ("auto", the
old default) or on the host, and with a while loop or a fixed trip count, same process and weights.
Part 3 (llm): issue 4's batch-1 (and batch-64) measurement through `LLM.generate`
(`benchmarks.decode.run`) with the decode loop's done-check every 1, 4 and 8 steps.

    PYTHONPATH=. python -m benchmarks.host_sync --out results_host_sync.json            # GPU
    PYTHONPATH=. python -m benchmarks.host_sync --parts llm --out results_host_sync_llm.json
    PYTHONPATH=. python -m benchmarks.host_sync --small --out /tmp/h.json               # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.shapes import llama3_8b, random_model
from jaxllm import SamplingParams, runner
from jaxllm.kv_cache import contiguous_page_table, init_cache
from jaxllm.sampling import make_sampling_tensors


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def micro(small: bool) -> dict:
    n = 512 if small else 4096
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)

    def work(x):  # a few ms of matmuls on an H200
        for _ in range(4 if small else 16):
            x = (x @ x) * (1.0 / n)
        return x

    plain = jax.jit(work)
    with_cond = jax.jit(lambda x: jax.lax.cond(jnp.sum(work(x)) > 0, lambda y: y + 1, lambda y: y - 1, x))
    out = {}
    for name, fn in (("plain", plain), ("cond_after", with_cond)):
        fn(x).block_until_ready()
        dispatch, total = [], []
        for _ in range(5):
            start = time.perf_counter()
            y = fn(x)
            dispatch.append(time.perf_counter() - start)
            y.block_until_ready()
            total.append(time.perf_counter() - start)
        out[name] = dict(dispatch_ms=1e3 * min(dispatch), total_ms=1e3 * min(total))

    iters = 200 if small else 2000
    v = jnp.ones(1024, jnp.float32)
    body = lambda y: y * 1.0001 + 1.0
    cond_body = lambda y: jax.lax.cond(y[0] > 0, body, lambda z: z - 1.0, y)
    loops = {
        "while": jax.jit(lambda v, k: jax.lax.while_loop(lambda c: c[0] < k, lambda c: (c[0] + 1, body(c[1])),
                                                         (0, v))[1]),
        "fori": jax.jit(lambda v, k: jax.lax.fori_loop(0, iters, lambda i, y: body(y), v)),
        "while_with_cond": jax.jit(lambda v, k: jax.lax.while_loop(
            lambda c: c[0] < k, lambda c: (c[0] + 1, cond_body(c[1])), (0, v))[1]),
        "fori_with_cond": jax.jit(lambda v, k: jax.lax.fori_loop(0, iters, lambda i, y: cond_body(y), v)),
    }
    for name, fn in loops.items():
        fn(v, iters).block_until_ready()
        out[f"{name}_us_per_iter"] = 1e6 * _best(lambda: fn(v, iters).block_until_ready(), 3) / iters
    return out


def _state(llm_params, config, batch: int, prompt_len: int, max_new: int, params: SamplingParams, mode: str):
    rows, page = batch, 16
    pages = -(-(prompt_len + max_new) // page)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (rows, prompt_len)).astype(np.int32)
    prompt_lens = np.full(rows, prompt_len, np.int32)
    limits = runner.Limits(np.full((rows, 4), -1, np.int32), np.full(rows, max_new, np.int32),
                           np.int32(prompt_len + max_new + 1))
    st = make_sampling_tensors([params] * rows, list(range(rows)), rows, config.vocab_size)
    cache = init_cache(config, rows * pages + 1, page, config.dtype)
    state, _ = runner.prefill(llm_params, cache, tokens, prompt_lens, contiguous_page_table(rows, pages), st, limits,
                              config=config, max_new=max_new, logprobs_k=None, prompt_logprobs_k=None,
                              sampling_mode=mode)
    return state, st, limits


def decode(name: str, config, llm_params, batch: int, steps: int, temperature: float, repeats: int) -> list[dict]:
    params = SamplingParams(temperature=temperature, seed=0, ignore_eos=True)
    host_mode = "greedy" if temperature == 0 else "unsorted"
    max_new = 1 << (steps + 1).bit_length()
    rows = []
    for mode, trip in (("auto", None), (host_mode, None), (host_mode, steps), ("auto", None)):
        def once():
            state, st, limits = _state(llm_params, config, batch, 128, max_new, params, mode)
            jax.block_until_ready(state)
            start = time.perf_counter()
            state = runner.decode(llm_params, state, st, limits, np.int32(steps), config=config, logprobs_k=None,
                                  sampling_mode=mode, trip_count=trip)
            returned = time.perf_counter() - start
            tokens = np.asarray(state.tokens)
            return returned, time.perf_counter() - start, tokens

        _, _, tokens = once()  # compiles
        runs = [once() for _ in range(repeats)]
        returned, total = min(r[0] for r in runs), min(r[1] for r in runs)
        rows.append(dict(model=name, batch=batch, temperature=temperature, sampling_mode=mode, trip_count=trip,
                         steps=steps, ms_per_step=1e3 * total / steps, dispatch_ms=1e3 * returned,
                         tokens_per_s=batch * steps / total, first_tokens=tokens[0, :8].tolist()))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="tiny shapes, to smoke-test on a CPU")
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--parts", nargs="+", default=["micro", "decode"], choices=["micro", "decode", "llm"])
    parser.add_argument("--out", default="results_host_sync.json")
    args = parser.parse_args(argv)
    result = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, device=jax.devices()[0].device_kind)
    if "micro" in args.parts:
        result["micro"] = micro(args.small)
        print(result["micro"], flush=True)
    if "llm" in args.parts:
        result["llm"] = llm_decode(args.small)
    if "decode" not in args.parts:
        return _write(result, args.out)
    steps, repeats = (16, 1) if args.small else (255, 3)
    from jaxllm import LLM
    from jaxllm.default_model import default_model_dir

    demo = LLM(str(default_model_dir()), progress=False)
    result["decode"] = []
    for batch, temperature in ((1, 0.0), (1, 1.0), (16, 1.0)):
        result["decode"] += decode("bundled", demo.config, demo.params, batch, steps, temperature, repeats)
    if not args.skip_8b:
        config, _, params = random_model(args.small)
        assert args.small or config == llama3_8b()
        for batch, temperature in ((1, 0.0), (64, 1.0)):
            result["decode"] += decode("8b" if not args.small else "tiny", config, params, batch, steps,
                                       temperature, repeats)
    return _write(result, args.out)


def _write(result: dict, out: str) -> int:
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


def llm_decode(small: bool) -> list[dict]:
    """benchmarks.decode.run (issue 4's table: 128-token prompt, 256 new tokens, greedy, unrolled
    layers) with llm.DECODE_CHECK_EVERY set to each value, one set of weights."""
    from benchmarks import decode as decode_bench
    from jaxllm import llm as llm_module

    from benchmarks.shapes import tiny
    from jaxllm.checkpoint import random_params
    from jaxllm.sharding import ParallelConfig, make_mesh

    config = tiny() if small else llama3_8b()
    params = random_params(config, make_mesh(ParallelConfig(1)))  # stacked: run() unrolls them
    kwargs = dict(prompt_len=16, new_tokens=16, repeats=1) if small else dict(repeats=3)
    rows = []
    for batch, every in ((1, 1), (1, 4), (1, 8), (1, 1), (64, 1), (64, 4)):
        llm_module.DECODE_CHECK_EVERY = every
        r = decode_bench.run(batch=batch, config=config, layers="unrolled", params=params, prefill_len=None, **kwargs)
        r = {k: v for k, v in r.items() if k != "greedy_tokens"} | dict(check_every=every,
                                                                          first_tokens=r["greedy_tokens"][:16])
        rows.append(r)
        print({k: r[k] for k in ("batch", "check_every", "decode_tokens_per_s", "ms_per_step",
                                 "fraction_of_copy_ceiling")}, flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
