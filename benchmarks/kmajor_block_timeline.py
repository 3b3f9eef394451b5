"""Where one launch of a K-major quantized kernel spends its time, block by block.

Runs `pallas_kernels.quant_matmul_kmajor` at decode shapes under Mosaic GPU's in-kernel profiler
(CompilerParams `profile_space` / `profile_dir`: every compute warpgroup records the kernel's named
scopes with the SM's clock) and summarises one launch on weights not in L2:
- `start_us`: when each compute warpgroup began, after the first one (the launch's ramp);
- `first_wait_us`: its first wait for a tile (the first load's latency);
- `step_us`: its mean step after that (wait, load, convert, wgmma);
- `epilogue_us`: writing its output tile;
- `end_us`: when it ended, after the first start; `span_us` the last end;
- `per_warpgroup`: [SM, trace index (block * warpgroups + warpgroup), start, first wait, mean step,
  end] of each compute warpgroup.
Beside it, the same launch's duration under jax.profiler (`kernel_us`, without the in-kernel
profiler). Times are the profiler's: on the H200 under jax 0.11.2 they run 1.98x real time (the
SM clock's 1.98 GHz: with one block an SM, `span_us` / 1.98 came within 0.3-1.6 us of `kernel_us`
on every shape), and with two blocks an SM the profiler's own work slowed the launch about 1.5x
more (`span_us` / 1.98 up to 1.6x `kernel_us`), so read those runs for order, not for time.

    PYTHONPATH=. python -m benchmarks.kmajor_block_timeline --out results.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import tempfile
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.product_chain import parse_config, random_weights
from benchmarks.quant_matmul_kernels import kernel
from pallas_kernels import compat
from pallas_kernels import quant_matmul_kmajor as qm

SHAPES = ("4096x4096", "4096x6144", "14336x4096", "4096x28672")
PROFILE_RANGES = 140  # scopes a warpgroup may record: 4 a step, 32 steps at most here, and the epilogue


def percentiles(values) -> dict:
    v = np.asarray(values, np.float64)
    return dict(min=float(v.min()), p50=float(np.percentile(v, 50)), p90=float(np.percentile(v, 90)),
                max=float(v.max()), mean=float(v.mean()))


def summarise(trace: dict) -> dict:
    """Per-warpgroup timings of one profiled launch (see the module docstring)."""
    by_wg = collections.defaultdict(list)
    for e in trace["traceEvents"]:
        by_wg[e["tid"]].append(e)
    rows = []
    for events in by_wg.values():
        events.sort(key=lambda e: e["ts"])
        spans = collections.defaultdict(list)  # scope -> [(begin, end)]
        open_at = {}
        for e in events:
            if e["ph"] == "B":
                open_at[e["name"]] = e["ts"]
            elif e["name"] in open_at:
                spans[e["name"]].append((open_at.pop(e["name"]), e["ts"]))
        waits = spans.get("wait_ready", [])
        if not waits:
            continue
        last_product = max(end for _, end in spans.get("wgmma", waits))
        epilogue = spans.get("epilogue", [])
        rows.append(dict(sm=events[0]["pid"] - 1, trace=events[0]["tid"] - 1, start=events[0]["ts"],
                         end=events[-1]["ts"], first_wait=waits[0][1] - waits[0][0], steps=len(waits),
                         step=(last_product - waits[0][1]) / len(waits), epilogue=sum(b - a for a, b in epilogue)))
    t0 = min(r["start"] for r in rows)
    return dict(warpgroups=len(rows), span_us=max(r["end"] for r in rows) - t0,
                start_us=percentiles([r["start"] - t0 for r in rows]),
                first_wait_us=percentiles([r["first_wait"] for r in rows]),
                step_us=percentiles([r["step"] for r in rows]),
                steps=percentiles([r["steps"] for r in rows]),
                epilogue_us=percentiles([r["epilogue"] for r in rows]),
                end_us=percentiles([r["end"] - t0 for r in rows]),
                per_warpgroup=[[r["sm"], r["trace"], round(r["start"] - t0, 3), round(r["first_wait"], 3),
                                round(r["step"], 3), round(r["end"] - t0, 3)] for r in rows])


def profiled_launch(kind: str, k: int, n: int, m: int, config=None, copies: int = 4) -> dict:
    """The in-kernel profile of the last of `copies - 1` launches, each on a weight copy of its own."""
    keys = jax.random.split(jax.random.PRNGKey(0), copies)
    ws = [random_weights(kind, k, n, key) for key in keys]
    x = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.bfloat16)
    out_dir = tempfile.mkdtemp()
    params = compat.lane_compiler_params

    def profiled(**kwargs):
        return params(profile_space=PROFILE_RANGES, profile_dir=out_dir, **kwargs)

    qm._build.cache_clear()
    with mock.patch.object(qm.compat, "lane_compiler_params", profiled):
        f = jax.jit(kernel(kind, config))
        for w in ws:
            jax.block_until_ready(f(x, w))
    qm._build.cache_clear()
    time.sleep(1.0)  # the profile is written by a host callback
    paths = sorted(glob.glob(os.path.join(out_dir, "*-trace.json")))
    with open(paths[-1]) as fh:
        return summarise(json.load(fh))


def kernel_us(kind: str, k: int, n: int, m: int, config=None, copies: int = 4) -> float:
    """The kernel's own duration under jax.profiler (median over launches on distinct weights)."""
    from benchmarks.profile_decode import gpu_events, traced

    keys = jax.random.split(jax.random.PRNGKey(0), copies)
    ws = [random_weights(kind, k, n, key) for key in keys]
    x = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.bfloat16)
    product = kernel(kind, config)
    f = jax.jit(lambda x, ws: [product(x, w) for w in ws])
    jax.block_until_ready(f(x, ws))
    trace, _ = traced(lambda: jax.block_until_ready(f(x, ws)))
    durs = [e["dur"] for e in gpu_events(trace) if "mosaic" in e["name"]]
    return float(np.median(durs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kinds", nargs="+", default=["int8"], choices=["int8", "int4"])
    parser.add_argument("--skip-kernel-time", action="store_true", help="only the in-kernel profile")
    parser.add_argument("--skip-profile", action="store_true", help="only the kernel's time (jax.profiler)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=["default"],
                        help="kernel configs to run, each 'default' or block_n:num_stages:num_splits[:block_k] "
                             "(0 = default)")
    parser.add_argument("--out", default="results_kmajor_block_timeline.json")
    args = parser.parse_args(argv)
    if args.skip_kernel_time and args.skip_profile:
        parser.error("--skip-kernel-time and --skip-profile together leave nothing to measure")
    if not 1 <= args.m <= qm.MAX_TOKENS:
        parser.error(f"--m {args.m}: the kernels take 1 to {qm.MAX_TOKENS} tokens")
    shapes = []
    for s in args.shapes:
        try:
            k, n = (int(v) for v in s.split("x"))
        except ValueError:
            parser.error(f"--shapes {s!r}: write KxN, e.g. 4096x14336")
        shapes.append((k, n))
    try:
        configs = [(c, parse_config(c)) for c in args.configs]
    except ValueError as e:
        parser.error(f"--configs: {e}")
    rows = []
    for kind, (k, n), (name, config) in ((a, b, c) for a in args.kinds for b in shapes for c in configs):
        try:
            p = qm.plan(kind, args.m, k, n, config)
        except ValueError as e:
            print(json.dumps(dict(kind=kind, k=k, n=n, config=name, error=str(e))), flush=True)
            continue
        row = dict(kind=kind, k=k, n=n, m=args.m, config=name,
                   plan=dict(block_n=p.block_n, stages=p.num_stages, splits=p.num_splits, steps=p.per_split),
                   kernel_us=None if args.skip_kernel_time else kernel_us(kind, k, n, args.m, config),
                   **({} if args.skip_profile else profiled_launch(kind, k, n, args.m, config)))
        rows.append(row)
        print(json.dumps({key: v for key, v in row.items() if key != "per_warpgroup"}), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, method=__doc__.split("\n\n")[1],
                           rows=rows), f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
