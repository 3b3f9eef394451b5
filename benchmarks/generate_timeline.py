"""Where one `LLM.generate` call's wall time goes: a timeline of its host events and the GPU's busy
spans (issue 7: a call's fixed cost). Bundled model, batch 1, one held-out completion prompt; plain
decoding and Medusa, each at `--lengths` new tokens: compiled, warmed, then traced once.

Host events: every traced event of at least `--min-us` on a host thread (nested ones included), start
and end in microseconds from the call's first event. GPU: kernels merged into busy spans where the
gap between them is under `--merge-us`, with each span's kernel count; "idle" is the call's GPU time
not busy between its first kernel and its end.

    PYTHONPATH=. python -m benchmarks.generate_timeline --out results_generate_timeline.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from benchmarks.profile_decode import traced_events
from benchmarks.speculative import complete_prompts, heldout_texts
from jaxllm import LLM, SamplingParams
from jaxllm.default_model import default_model_dir


def busy_spans(gpu: list[dict], merge_us: float) -> list[list[float]]:
    """[[start, end, kernels], ...] with kernels closer than merge_us joined."""
    spans = []
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in gpu):
        if spans and start - spans[-1][1] < merge_us:
            spans[-1][1] = max(spans[-1][1], stop)
            spans[-1][2] += 1
        else:
            spans.append([start, stop, 1])
    return spans


def timeline(llm: LLM, prompts, params: SamplingParams, min_us: float, merge_us: float) -> dict:
    llm.generate(prompts, params, use_tqdm=False)  # compile
    llm.generate(prompts, params, use_tqdm=False)
    gpu, wall, host = traced_events(llm, prompts, params, with_host=True)
    t0 = min(e["ts"] for e in host + gpu)
    spans = busy_spans(gpu, merge_us)
    busy = sum(b - a for a, b, _ in spans)
    end = max([e["ts"] + e["dur"] for e in host] + [b for _, b, _ in spans]) - t0
    return dict(
        wall_ms=1e3 * wall, traced_ms=end / 1e3, gpu_busy_ms=busy / 1e3, kernels=len(gpu),
        gpu_first_us=spans[0][0] - t0 if spans else -1.0, gpu_last_us=spans[-1][1] - t0 if spans else -1.0,
        gpu_spans=[[round(a - t0, 1), round(b - t0, 1), n] for a, b, n in spans],
        host=[[round(e["ts"] - t0, 1), round(e["ts"] + e["dur"] - t0, 1), e.get("tid"), e.get("name", "")[:120]]
              for e in sorted(host, key=lambda e: e["ts"]) if e["dur"] >= min_us],
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2, 256])
    parser.add_argument("--min-us", type=float, default=40.0)
    parser.add_argument("--merge-us", type=float, default=20.0)
    parser.add_argument("--no-medusa", action="store_true")
    parser.add_argument("--out", default="results_generate_timeline.json")
    args = parser.parse_args(argv)
    if not args.lengths or min(args.lengths) < 1:
        parser.error(f"--lengths must be token counts of at least 1, got {args.lengths}")
    model_dir = default_model_dir()
    methods = {"plain": None}
    if not args.no_medusa:
        methods["medusa"] = {"method": "medusa", "model": str(model_dir / "medusa"), "disable_by_batch_size": None}
    results = {}
    for name, spec in methods.items():
        llm = LLM(progress=False, max_num_seqs=1, speculative_config=spec)
        prompts = complete_prompts(llm.tokenizer, heldout_texts(model_dir, 1))
        for n in args.lengths:
            row = timeline(llm, prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                           args.min_us, args.merge_us)
            results[f"{name} {n}"] = row
            print(f"== {name} {n}: wall {row['wall_ms']:.2f} ms (traced), GPU busy {row['gpu_busy_ms']:.2f} ms, "
                  f"{row['kernels']} kernels, first kernel at {row['gpu_first_us']:.0f} us, last ends "
                  f"{row['gpu_last_us']:.0f} us", flush=True)
            for a, b, k in row["gpu_spans"][:12]:
                print(f"   gpu  {a:9.1f} {b:9.1f}  x{k}")
            for a, b, tid, label in row["host"][:60]:
                print(f"   host {a:9.1f} {b:9.1f}  {tid}  {label[:90]}")
    with open(args.out, "w") as f:
        json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, device=jax.devices()[0].device_kind,
                       method=__doc__, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
