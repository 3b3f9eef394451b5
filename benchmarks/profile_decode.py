"""Where a decode step's time goes: GPU kernel time by kernel name, and the gaps between kernels.

Runs the Llama-3-8B-shaped decode (random bf16 weights, unrolled layers) under jax.profiler,
reads the Perfetto trace and sums the GPU events per name. `--quantization` profiles the same
weights quantized at load (each method after the other, in one process), as `LLM` runs them.

    PYTHONPATH=. python -m benchmarks.profile_decode --batch 1 --out profile_b1.json
    PYTHONPATH=. python -m benchmarks.profile_decode --batch 1 --quantization int8 int4 --out profile_q.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import time

import jax
import numpy as np

from benchmarks.shapes import llama3_8b
from jaxllm import LLM, SamplingParams
from jaxllm.checkpoint import random_params
from jaxllm.sharding import ParallelConfig, make_mesh
from models.llama import unstack_layers


def gpu_events(trace: dict) -> list[dict]:
    """Complete ('X') events of the processes whose name mentions a GPU, each kernel once.

    Some machines' traces list every kernel under two GPU processes (the tenth session's decode
    profiles counted 2 calls of the lm_head a step, and more kernel time than wall time), with the
    same names and counts but other timestamps (the eleventh session's): a process whose events repeat
    another's name for name and count is dropped, and events of the same name, start and duration
    are kept once. For one-device traces (every profile here): two GPUs running the same kernels
    would look like such a repeat."""
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    by_pid = collections.defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            by_pid[e["pid"]].append(e)
    signatures, seen, out = set(), set(), []
    for pid in sorted(by_pid, key=str):
        signature = frozenset(collections.Counter(e.get("name") for e in by_pid[pid]).items())
        if signature in signatures:
            continue
        signatures.add(signature)
        for e in by_pid[pid]:
            key = (e.get("name"), e.get("ts"), e["dur"])
            if key not in seen:
                seen.add(key)
                out.append(e)
    return out


def per_name(events: list[dict]) -> dict[str, list[float]]:
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
    return by_name


def summarise(short: list[dict], long: list[dict], steps: int, top: int = 40) -> dict:
    """Per decode step: the long run's kernel time minus the short run's, over the extra steps
    (prefill and fixed costs cancel)."""
    a, b = per_name(short), per_name(long)
    diff = {n: ((b[n][0] - a.get(n, [0, 0])[0]) / steps, (b[n][1] - a.get(n, [0, 0])[1]) / steps)
            for n in b}
    busy = sum(t for t, _ in diff.values())
    rows = sorted(diff.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(
        steps=steps, kernel_us_per_step=busy, kernels_per_step=sum(c for _, c in diff.values()),
        top=[dict(name=n[:160], us_per_step=t, calls_per_step=c) for n, (t, c) in rows],
    )


def timeline(events: list[dict], count: int) -> list[dict]:
    """`count` consecutive kernels from the middle of a run, in start order: name, microseconds
    from the first, duration, the idle gap before it, and the event's arguments (grid, shared
    memory) where the trace gives them."""
    ordered = sorted(events, key=lambda e: e["ts"])
    start = max(0, len(ordered) // 2 - count // 2)
    window = ordered[start:start + count]
    out, end = [], None
    for e in window:
        gap = None if end is None else e["ts"] - end
        end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])
        args = {k: v for k, v in e.get("args", {}).items() if isinstance(v, (int, float, str)) and len(str(v)) < 80}
        out.append(dict(name=e["name"][:60], t=e["ts"] - window[0]["ts"], dur=e["dur"], gap=gap, args=args))
    return out


def traced(run) -> tuple[dict, float]:
    """The Perfetto trace of `run()` under jax.profiler, and its wall time."""
    log_dir = tempfile.mkdtemp()
    start = time.perf_counter()
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        run()
    wall = time.perf_counter() - start
    path = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        return json.load(f), wall


def traced_events(llm, prompts, params, with_host: bool = False):
    """The GPU events of one `generate` call and its wall time (and, `with_host`, the other events)."""
    trace, wall = traced(lambda: llm.generate(prompts, params, use_tqdm=False))
    gpu = gpu_events(trace)
    if not with_host:
        return gpu, wall
    ids = {id(e) for e in gpu}
    host = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e and id(e) not in ids]
    return gpu, wall, host


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 greedy; the throughput benchmark samples at 1")
    parser.add_argument("--quantization", nargs="+", default=["none"],
                        help="weight methods to profile: none (bf16) or jaxllm.quantization's (int8, int4, fp8, ...)")
    parser.add_argument("--timeline", type=int, default=0,
                        help="also keep this many consecutive kernels from the middle of the long run")
    parser.add_argument("--out", default="profile_decode.json")
    args = parser.parse_args(argv)
    from jaxllm.quantization import METHODS
    for method in args.quantization:
        if method != "none" and method not in METHODS:
            parser.error(f"--quantization {method!r}: choose none or one of {sorted(METHODS)}")
    if args.timeline < 0:
        parser.error(f"--timeline {args.timeline}: a kernel count, 0 or more")
    config = llama3_8b().replace(attention_backend=args.backend)
    mesh = make_mesh(ParallelConfig(1))
    params = unstack_layers(random_params(config, mesh))
    results = []
    for method, batch in ((m, b) for m in args.quantization for b in args.batch):
        llm = LLM.from_params(config, params, mesh, max_model_len=args.prompt_len + 384,
                              max_num_seqs=batch, quantization=None if method == "none" else method)
        rng = np.random.default_rng(0)
        prompts = [{"prompt_token_ids": rng.integers(0, config.vocab_size, args.prompt_len).tolist()} for _ in range(batch)]
        # 65 and 128 new tokens share one output bucket, so both runs use the same executables.
        short = SamplingParams(max_tokens=65, temperature=args.temperature, ignore_eos=True)
        long = SamplingParams(max_tokens=128, temperature=args.temperature, ignore_eos=True)
        llm.generate(prompts, long, use_tqdm=False)  # compile
        (short_events, short_s), (long_events, long_s) = (traced_events(llm, prompts, p) for p in (short, long))
        summary = summarise(short_events, long_events, 128 - 65)
        if args.timeline:
            summary["timeline"] = timeline(long_events, args.timeline)
        summary.update(quantization=method, batch=batch, backend=args.backend, prompt_len=args.prompt_len, temperature=args.temperature, wall_ms_per_step=1e3 * (long_s - short_s) / (128 - 65))
        results.append(summary)
        print(json.dumps({k: v for k, v in summary.items() if k != "top"}), flush=True)
        for row in summary["top"][:25]:
            print(f"  {row['us_per_step']:9.1f} us  x{row['calls_per_step']:6.1f}  {row['name'][:110]}")
    with open(args.out, "w") as f:
        json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
