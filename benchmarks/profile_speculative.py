"""Where a speculative step's time goes on the bundled model: GPU kernels per step, kernel time and
wall time per step, plain decoding against n-gram and Medusa (issue 7).

One held-out completion prompt at batch 1; each method's `generate` call of `--max-tokens` tokens
runs once to compile, once under jax.profiler, then three times timed (tokens/s: the best). With
`--lax-top-k`, "medusa, lax.top_k" is Medusa with the heads' candidates taken by `jax.lax.top_k`
instead of `jaxllm.ops.top_k`; `--xla-attention` adds plain and Medusa with XLA's attention instead of
cuDNN's; `--medusa NAME=DIR` adds Medusa with other heads. Steps: the plain
loop's one per token; a speculative loop's from its `spec_decode` statistics (tokens / mean accepted
length). Per-call totals are divided by steps, so the prefill's kernels are spread over them (a few
percent at 256 tokens). Idle time: the gaps between one kernel's end and the next one's start
within the traced call, per step, and the kernel pairs around the largest of them.

    PYTHONPATH=. python -m benchmarks.profile_speculative --out results_profile_speculative.json
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import jax

from benchmarks.profile_decode import per_name, traced_events
from benchmarks.speculative import complete_prompts, heldout_texts
from jaxllm import LLM, SamplingParams
from jaxllm.default_model import default_model_dir
from jaxllm.ops import attention as attention_module
from jaxllm.ops import topk as top_k_module


def idle_gaps(events: list[dict], top: int) -> tuple[float, list[tuple[str, str, float, int]]]:
    """Total idle time between consecutive kernels (us) and the (kernel before, kernel after) pairs
    with the most idle time after them: (before, after, total us, count)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events)
    idle, pairs = 0.0, collections.defaultdict(lambda: [0.0, 0])
    end, before = None, None
    for start, stop, name in spans:
        if end is not None and start > end:
            idle += start - end
            pairs[(before, name)][0] += start - end
            pairs[(before, name)][1] += 1
        if end is None or stop >= end:
            end, before = stop, name
    rows = sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]
    return idle, [(a, b, t, c) for (a, b), (t, c) in rows]


def profile_method(llm: LLM, prompts, params: SamplingParams, top: int) -> dict:
    out = llm.generate(prompts, params, use_tqdm=False)  # compile
    events, wall, host = traced_events(llm, prompts, params, with_host=True)
    timed = []
    for _ in range(3):  # without the profiler
        start = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        timed.append(time.perf_counter() - start)
    completion = out[0].outputs[0]
    tokens = len(completion.token_ids)
    stats = completion.spec_decode
    steps = tokens / stats.mean_accepted_length if stats is not None and stats.mean_accepted_length else tokens
    by_name = per_name(events)
    busy = sum(t for t, _ in by_name.values())
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    idle, gaps = idle_gaps(events, 12)
    host_calls = collections.Counter(e.get("name", "")[:100] for e in host)
    return dict(tokens=tokens, steps=steps, tokens_per_step=tokens / steps, tokens_per_s=tokens / min(timed),
                profiled_wall_ms=1e3 * wall, kernel_us_per_step=busy / steps,
                kernels_per_step=sum(c for _, c in by_name.values()) / steps, idle_us_per_step=idle / steps,
                top=[dict(name=n[:160], us_per_step=t / steps, calls_per_step=c / steps) for n, (t, c) in rows],
                top_gaps=[dict(before=a[:120], after=b[:120], us_per_step=t / steps, count_per_step=c / steps)
                          for a, b, t, c in gaps],
                host_events_per_step={n: c / steps for n, c in host_calls.most_common(40)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=0, help="which held-out file to complete")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default="results_profile_speculative.json")
    parser.add_argument("--lax-top-k", action="store_true", help="also Medusa with jax.lax.top_k candidates")
    parser.add_argument("--no-ngram", action="store_true")
    parser.add_argument("--xla-attention", action="store_true",
                        help="also plain and Medusa with the XLA attention path instead of cuDNN's")
    parser.add_argument("--medusa", action="append", default=[], metavar="NAME=DIR",
                        help="also Medusa with the heads in DIR, reported as 'medusa NAME'")
    args = parser.parse_args(argv)
    model_dir = default_model_dir()
    on = {"disable_by_batch_size": None}
    methods = {"plain": None}
    if not args.no_ngram:
        methods["ngram k4"] = {"method": "ngram", "num_speculative_tokens": 4, **on}
    methods["medusa"] = {"method": "medusa", "model": str(model_dir / "medusa"), **on}
    if args.lax_top_k:
        methods["medusa, lax.top_k"] = methods["medusa"]
    if args.xla_attention:
        methods["plain, xla attention"] = methods["plain"]
        methods["medusa, xla attention"] = methods["medusa"]
    for item in args.medusa:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_dir():
            parser.error(f"--medusa {item!r}: expected NAME=DIR with DIR a Medusa heads directory")
        methods[f"medusa {name}"] = {"method": "medusa", "model": path, **on}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    results = {}
    prompts = None
    for name, spec in methods.items():
        llm = LLM(progress=False, max_num_seqs=1, speculative_config=spec)
        if prompts is None:
            prompts = complete_prompts(llm.tokenizer, heldout_texts(model_dir, args.prompt + 1)[args.prompt:])
        jax.clear_caches()  # the patched variant must be traced again, not found in jit's cache
        saved = top_k_module.ARGMAX_PASSES_MAX_K, attention_module.CUDNN_ATTENTION
        if name.endswith("lax.top_k"):
            top_k_module.ARGMAX_PASSES_MAX_K = 0
        if name.endswith("xla attention"):
            attention_module.CUDNN_ATTENTION = False
        try:
            results[name] = profile_method(llm, prompts, params, args.top)
        finally:
            top_k_module.ARGMAX_PASSES_MAX_K, attention_module.CUDNN_ATTENTION = saved
        results[name]["speedup_vs_plain"] = results[name]["tokens_per_s"] / results["plain"]["tokens_per_s"]
        print(json.dumps({name: {k: v for k, v in results[name].items()
                                  if k not in ("top", "top_gaps", "host_events_per_step")}}), flush=True)
        for row in results[name]["top"][:15]:
            print(f"  {row['us_per_step']:8.1f} us  x{row['calls_per_step']:5.1f}  {row['name'][:100]}", flush=True)
        for n, c in list(results[name]["host_events_per_step"].items())[:12]:
            print(f"  host {c:7.2f} / step  {n[:90]}", flush=True)
        for row in results[name]["top_gaps"][:6]:
            print(f"  idle {row['us_per_step']:6.1f} us x{row['count_per_step']:4.1f}  {row['before'][:50]} -> "
                  f"{row['after'][:50]}", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, device=jax.devices()[0].device_kind,
                       method=__doc__, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
