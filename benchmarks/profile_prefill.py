"""Where a batch-1 prefill's time goes, per quantization method: GPU kernel time by kernel name and
by kind (matmuls, attention, the rest), against the wall time of the `generate` call.

Llama-3-8B shape, random weights, unrolled layers, one prompt of `--prefill-len` tokens, one new
token, under jax.profiler (one warm-up call first).

    PYTHONPATH=. python -m benchmarks.profile_prefill --methods none fp8 --out profile_prefill.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from benchmarks.profile_decode import per_name, traced_events
from benchmarks.shapes import llama3_8b
from jaxllm import LLM, SamplingParams
from jaxllm.checkpoint import random_params
from jaxllm.sharding import ParallelConfig, make_mesh
from models.llama import unstack_layers

# By kernel name; Mosaic GPU kernels count as attention: in the default ("auto") mode the prefill's
# only Mosaic GPU kernel is the attention kernel.
KINDS = (("matmul", ("gemm", "cublas", "cutlass", "dot", "matmul", "sm90_xmma", "nvjet")),
         ("attention", ("attention", "mosaic", "flash", "cudnn", "fmha")))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def gaps(events: list[dict], host: list[dict], top: int = 12, least_us: float = 5.0) -> dict:
    """Idle stretches of the GPU between kernels, the largest with their neighbours' names and the
    longest host events overlapping them."""
    ordered = sorted(events, key=lambda e: e["ts"])
    found, busy_until, before = [], None, None
    for e in ordered:
        if busy_until is not None and e["ts"] - busy_until >= least_us:
            found.append((e["ts"] - busy_until, busy_until, before, e))
        if busy_until is None or e["ts"] + e["dur"] > busy_until:
            busy_until, before = e["ts"] + e["dur"], e
    found.sort(key=lambda g: -g[0])

    def host_during(t0, t1):
        over = [h for h in host if h["ts"] < t1 and h["ts"] + h["dur"] > t0]
        return [f"{h['name'][:80]} ({h['dur']:.0f} us)" for h in sorted(over, key=lambda h: -h["dur"])[:4]]

    return dict(count=len(found), total_ms=sum(g[0] for g in found) / 1e3,
                largest=[dict(us=g, after=a["name"][:80], before=b["name"][:80], host=host_during(t0, t0 + g))
                         for g, t0, a, b in found[:top]])


def profile(llm, prompt, sampling) -> dict:
    llm.generate(prompt, sampling, use_tqdm=False)
    events, wall, host = traced_events(llm, prompt, sampling, with_host=True)
    start = min((e["ts"] for e in events), default=0.0)  # no GPU events on a CPU
    end = max((e["ts"] + e["dur"] for e in events), default=0.0)
    by_name = per_name(events)
    by_kind: dict[str, float] = {}
    for name, (us, _) in by_name.items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + us
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:30]
    return dict(gaps=gaps(events, host), wall_ms=wall * 1e3, gpu_span_ms=(end - start) / 1e3, kernel_ms=sum(t for t, _ in by_name.values()) / 1e3,
                kernels=sum(c for _, c in by_name.values()), by_kind_ms={k: v / 1e3 for k, v in by_kind.items()},
                top=[dict(name=n[:160], ms=t / 1e3, calls=c) for n, (t, c) in top])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["none", "fp8"])
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--out", default="profile_prefill.json")
    args = parser.parse_args(argv)
    config = llama3_8b()
    mesh = make_mesh(ParallelConfig(1))
    params = unstack_layers(random_params(config, mesh))
    rng = np.random.default_rng(0)
    prompt = [{"prompt_token_ids": rng.integers(0, config.vocab_size, args.prefill_len).tolist()}]
    sampling = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    rows = []
    for method in args.methods:
        llm = LLM.from_params(config, params, mesh, max_model_len=args.prefill_len + 32, max_num_seqs=1,
                              quantization=None if method == "none" else method)
        row = dict(method=method, prefill_len=args.prefill_len, **profile(llm, prompt, sampling))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("top", "gaps")}), flush=True)
        print(json.dumps(row["gaps"], indent=0)[:3000], flush=True)
        for t in row["top"][:18]:
            print(f"  {t['ms']:8.2f} ms x{t['calls']:4d}  {t['name'][:120]}", flush=True)
        del llm
        with open(args.out, "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
