"""Where a step of the 8-bit-page decode kernel goes: its named scopes under Mosaic GPU's profiler.

Runs `pallas_kernels.paged_decode_attention_8bit` over random fp8 / int8 pages with the profiler on
(CompilerParams `profile_space` / `profile_dir`: each warpgroup records its scopes with the SM's
clock) and reports, per warpgroup role (compute; convert+copy, the memory warpgroup) and scope, the
median over warpgroups of its mean time a step, with the launch's span. Beside it, the kernel's time without the profiler and
its largest error against the reference.
Profiled times run in SM clocks / 1000 (1.98x real time on the H200 at 1.98 GHz) and the
profiler's own work slows a launch, so read them for shares, not for time.

The twentieth session's A/B variants (a separate copying warpgroup, copies from one warp, Mosaic GPU
compiler settings) ran through a `--variants` option of this script at commit 47da675; the variants
lost and were removed with it (NOTES.md).

    PYTHONPATH=. python -m benchmarks.decode_attention_timeline --out results.json
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

from benchmarks.attention import COPY_BANDWIDTH, D, HKV, KV_DTYPES, make_inputs, time_ms
from jaxllm.ops.kv_quant import quantize
from pallas_kernels import paged_decode_attention_8bit as pda8
from pallas_kernels.paged_decode_attention import DecodeConfig, paged_decode_attention, paged_decode_attention_reference

PROFILE_SPACE = 1200  # scopes a warpgroup may record


def scope_means(trace: dict) -> dict:
    """{role: {scope: median over warpgroups of the mean time a step}}, role by the scopes seen."""
    by_wg = collections.defaultdict(list)
    for e in trace["traceEvents"]:
        by_wg[(e["pid"], e["tid"])].append(e)
    per_role = collections.defaultdict(lambda: collections.defaultdict(list))
    for events in by_wg.values():
        events.sort(key=lambda e: e["ts"])
        totals, counts, open_at = collections.Counter(), collections.Counter(), {}
        for e in events:
            if e["ph"] == "B":
                open_at[e["name"]] = e["ts"]
            elif e["name"] in open_at:
                totals[e["name"]] += e["ts"] - open_at.pop(e["name"])
                counts[e["name"]] += 1
        roles = [r for r, scope in (("compute", "scores"), ("convert", "convert_v"), ("copy", "issue")) if scope in totals]
        if not roles:
            continue
        role = "+".join(roles)
        steps = max(counts.values())
        for name, total in totals.items():
            per_role[role][name].append(total / steps)
        per_role[role]["span"].append(events[-1]["ts"] - events[0]["ts"])
    return {role: {name: float(np.median(v)) for name, v in scopes.items()} for role, scopes in per_role.items()}


def run(kind: str, batch: int, context: int, page_size: int, config: DecodeConfig) -> dict:
    q, k, v, table, lens = make_inputs(batch, context, page_size)
    (k8, ks), (v8, vs) = quantize(k, kind), quantize(v, kind)
    scale = D**-0.5

    def make_fn():  # a new function each time, so that it is traced (and the kernel built) again
        return jax.jit(lambda q, k, v, ks, vs, t, n: paged_decode_attention(
            q, k, v, 0, t, n, scale=scale, k_scale=ks, v_scale=vs, config=config))

    fn = make_fn()
    args = (q, k8, v8, ks, vs, table, lens)
    kv_bytes = 2 * batch * context * HKV * (D + 4)
    ms = time_ms(fn, *args)
    want = paged_decode_attention_reference(q, k8, v8, 0, table, lens, scale=scale, k_scale=ks, v_scale=vs)
    err = float(jnp.max(jnp.abs(fn(*args).astype(jnp.float32) - want.astype(jnp.float32))))
    row = dict(ms=ms, fraction=kv_bytes / (ms / 1e3) / COPY_BANDWIDTH, max_abs_err=err)
    out_dir = tempfile.mkdtemp()
    params = pda8.compat.lane_compiler_params

    def profiled(**kwargs):
        return params(profile_space=PROFILE_SPACE, profile_dir=out_dir, **kwargs)

    pda8.build.cache_clear()
    with mock.patch.object(pda8.compat, "lane_compiler_params", profiled):
        f = make_fn()
        for _ in range(2):
            jax.block_until_ready(f(*args))
    pda8.build.cache_clear()
    time.sleep(1.0)  # the profile is written by a host callback
    paths = sorted(glob.glob(os.path.join(out_dir, "*-trace.json")))
    with open(paths[-1]) as fh:
        row["scopes"] = scope_means(json.load(fh))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kinds", nargs="+", default=["fp8"], choices=[k for k in KV_DTYPES if k != "bf16"])
    parser.add_argument("--case", default="64x4096x16", help="BATCHxCONTEXTxPAGE_SIZE")
    parser.add_argument("--stages", type=int, nargs="+", default=[pda8.NUM_STAGES])
    parser.add_argument("--out", default="results_decode_attention_timeline.json")
    args = parser.parse_args(argv)
    try:
        batch, context, page_size = (int(x) for x in args.case.split("x"))
    except ValueError:
        parser.error(f"--case {args.case!r}: write BATCHxCONTEXTxPAGE_SIZE, e.g. 64x4096x16")
    rows = []
    for kind in args.kinds:
        for stages in args.stages:
            jax.clear_caches()
            row = dict(kind=kind, case=args.case, stages=stages,
                       **run(KV_DTYPES[kind], batch, context, page_size, DecodeConfig(64, stages)))
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
