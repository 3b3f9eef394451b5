"""What one `LLM.generate` call costs besides its decode steps: bundled model, batch 1, plain
decoding against Medusa and n-gram speculation, each timed at several `max_tokens` (best of five
calls after a warm-up), then again with the call's parts timed one by one (init_cache, prefill, the
speculative state's start, the decode loop; each waited for, so the parts add a little).

The fixed cost is what a call of one token takes; the per-step cost the slope between the longest
two lengths. Speculative steps come from each call's `spec_decode` statistics.

    PYTHONPATH=. python -m benchmarks.generate_fixed_cost --out results_generate_fixed_cost.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax

from benchmarks.speculative import complete_prompts, heldout_texts
from jaxllm import LLM, SamplingParams, runner
from jaxllm import llm as llm_module
from jaxllm.default_model import default_model_dir
from jaxllm.speculative import speculator as speculator_module

PARTS = {}


def _timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        jax.block_until_ready(out)
        PARTS[name] = PARTS.get(name, 0.0) + time.perf_counter() - start
        return out
    return wrapper


def _instrument():
    runner.prefill = _timed("prefill", runner.prefill)
    runner.decode = _timed("decode", runner.decode)
    llm_module.init_cache = _timed("init_cache", llm_module.init_cache)
    speculator_module.Speculator.start = _timed("start", speculator_module.Speculator.start)
    speculator_module.Speculator.decode = _timed("spec_decode", speculator_module.Speculator.decode)


def measure(llm: LLM, prompts, n: int, repeats: int = 5) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    out = llm.generate(prompts, params, use_tqdm=False)
    best = None
    for _ in range(repeats):
        PARTS.clear()
        start = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        if best is None or seconds < best[0]:
            best = (seconds, dict(PARTS))
    stats = out[0].outputs[0].spec_decode
    steps = (n - 1) / stats.mean_accepted_length if stats is not None and stats.mean_accepted_length else n - 1
    return dict(ms=1e3 * best[0], steps=steps, parts_ms={k: 1e3 * v for k, v in best[1].items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 64, 256])
    parser.add_argument("--out", default="results_generate_fixed_cost.json")
    args = parser.parse_args(argv)
    if sorted(args.lengths) != args.lengths or len(args.lengths) < 2 or args.lengths[0] < 1:
        parser.error("--lengths must be at least two increasing token counts >= 1")
    model_dir = default_model_dir()
    on = {"disable_by_batch_size": None}
    methods = {"plain": None, "medusa": {"method": "medusa", "model": str(model_dir / "medusa"), **on},
               "ngram": {"method": "ngram", "num_speculative_tokens": 4, **on}}
    results = {}
    for instrumented in (False, True):
        if instrumented:
            _instrument()
        for name, spec in methods.items():
            llm = LLM(progress=False, max_num_seqs=1, speculative_config=spec)
            prompts = complete_prompts(llm.tokenizer, heldout_texts(model_dir, 1))
            lengths = args.lengths if not instrumented else [args.lengths[0], args.lengths[-1]]
            rows = {n: measure(llm, prompts, n) for n in lengths}
            key = name + (" instrumented" if instrumented else "")
            if not instrumented:
                (n1, a), (n2, b) = list(rows.items())[-2:]
                slope = (b["ms"] - a["ms"]) / max(b["steps"] - a["steps"], 1e-9)
                rows["summary"] = dict(fixed_ms=rows[args.lengths[0]]["ms"], us_per_step=1e3 * slope)
            results[key] = rows
            print(key, json.dumps(rows), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, device=jax.devices()[0].device_kind,
                       method=__doc__, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
