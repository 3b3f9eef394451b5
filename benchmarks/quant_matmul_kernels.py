"""Weight-only int8 / int4 / fp4 matmul kernels (pallas_kernels/quant_matmul_kmajor.py,
pallas_kernels/fp4_matmul_kmajor.py) against XLA at decode shapes: x [M, K] @ W [K, N] for M = 1..64
on 4096x14336 (gate/up), 14336x4096 (down) and 4096x6144 (qkv). Per point: our K-major w8a16, w4a16
and NVFP4 kernels (codes re-laid once beforehand, as `LLM` does at load), XLA's bf16 dot (weight
stored [K, N], and K-major [N, K]), our K-major kernel on the bf16 weight, and XLA's paths for the
same quantized weights in their stored layout (jaxllm.quantization.einsum: int8 convert fused into
the gemm, int4 and fp4 dequantized before it). First a full-size correctness check of each kernel
against a float32 reference, with a negative control; last a prediction of batch-1 decode tokens/s
for Llama-3-8B. `--kinds` picks the quantized kinds (e.g. `--kinds fp4` alone); `--sections lower`
only compiles the fp4 kernel for the GPU at every shape (no GPU needed).

Times (`--timing device`, the default since the twentieth session): one jitted function multiplies
by several weight copies in turn (so no call finds its weight in the 50 MB L2); each of `--repeats`
calls runs under jax.profiler, and a product's time is the GPU kernels' summed durations divided by
the copies (its small XLA prologue and epilogue included, launch gaps not; `span_us` is the first
kernel's start to the last one's end, gaps included), median over the repeats. `--timing wall` is
the older method, the median of `--repeats` runs of `--iters` back-to-back calls timed on the host,
which the nineteenth session found up to 1.9x apart between repeats of one row. TB/s counts the
weight bytes (codes, scales, zero points) once. Results go to --out after every section.

    PYTHONPATH=. python -m benchmarks.quant_matmul_kernels --out results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.shapes import COPY_BANDWIDTH
from jaxllm.kernel_weights import fp4_twin
from jaxllm.quantization import dequantize_fp4, quantize_fp4, quantize_int4, quantize_int8
from jaxllm.quantization import einsum as xla_quantized_einsum
from pallas_kernels.fp4_matmul_kmajor import FP4Config, w4a16_fp4_kmajor
from pallas_kernels.quant_matmul_kmajor import (
    KMajorConfig,
    bf16_kmajor,
    dequantize_int4,
    int4_kmajor,
    int8_kmajor,
    w4a16_kmajor,
    w8a16_kmajor,
)
from pallas_kernels.quant_matmul_kmajor import plan as kmajor_plan

SHAPES = ((4096, 14336), (14336, 4096), (4096, 6144))
# Llama-3-8B's products per layer at batch 1 (qkv, o, gate+up, down) and the lm_head.
LAYER_SHAPES = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))
LM_HEAD = (4096, 128256)
NUM_LAYERS = 32
# Batch-1 decode time outside the weight products: the profile of issue 4 (NOTES.md) measured
# 4.49 ms of kernels a step with 3.70 ms in the matmuls, so about 0.79 ms of everything else.
OTHER_MS = 0.79
ROTATE_BYTES = 150e6  # weight copies per timed call: at least this many bytes, three times the L2
KINDS = ("int8", "int4", "fp4")  # fp4: NVFP4 weights
FP4_FORMAT = "nvfp4"


def weight_bytes(kind: str, k: int, n: int, group: int = 128) -> int:
    if kind == "bf16":
        return 2 * k * n
    if kind == "int8":
        return k * n + 4 * n
    # fp4: e2m1 codes, an 8-bit scale per 16 inputs (the K-major twin's), a float32 per channel; the
    # stored FP4Weight that fp4_xla reads has float32 scales (4x), so its TB/s undercounts
    if kind == "fp4":
        return k * n // 2 + (k // 16) * n + 4 * n
    return k * n // 2 + 5 * (k // group) * n + 4 * k


def make_weights(k: int, n: int, copies: int, seed: int = 0, kinds=KINDS):
    """Random bf16 weights and their int8, int4 and FP4 (FP4Weight, NVFP4) quantizations (empty
    lists for the kinds not asked for)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), copies)
    dense = [jax.random.normal(key, (k, n), jnp.bfloat16) * 0.02 for key in keys]
    int8 = [quantize_int8(w, (0,)) for w in dense] if "int8" in kinds else []
    int4 = [quantize_int4(w, (0,), 128) for w in dense] if "int4" in kinds else []
    fp4 = [quantize_fp4(w, (0,), FP4_FORMAT) for w in dense] if "fp4" in kinds else []
    return dense, int8, int4, fp4


def kmajor_arrays(kind: str, w) -> tuple:
    """A stored quantized weight's arrays in its K-major kernel's layout (fp4: the K-major twin's)."""
    if kind == "int8":
        return int8_kmajor(w.q), w.scale.reshape(-1)
    if kind == "int4":
        return int4_kmajor(w.packed), w.scale, w.zero, w.input_scale
    twin = fp4_twin(w)
    return twin.q_t, twin.block_scale, twin.channel_scale


def kmajor_weights(int8, int4, fp4=()):
    """The same weights in the K-major kernels' layout."""
    return ([kmajor_arrays("int8", w) for w in int8], [kmajor_arrays("int4", w) for w in int4],
            [kmajor_arrays("fp4", w) for w in fp4])


def device_times(events: list[dict], products: int) -> tuple[float, float]:
    """(busy, span) microseconds per product of one traced call: the GPU kernels' summed durations,
    and first start to last end, each divided by the products."""
    if not events:
        raise ValueError("no GPU kernels in the trace: --timing device needs a GPU (use --timing wall)")
    busy = sum(e["dur"] for e in events)
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    return busy / products, span / products


def timed(fn, x, ws, iters: int, repeats: int) -> dict:
    """Median microseconds per product, with the spread of the repeats (see the module docstring)."""
    f = jax.jit(lambda x, ws: [fn(x, w) for w in ws])
    jax.block_until_ready(f(x, ws))
    if TIMING == "device":
        from benchmarks.profile_decode import gpu_events, traced

        busy, span = zip(*(device_times(gpu_events(traced(lambda: jax.block_until_ready(f(x, ws)))[0]), len(ws))
                           for _ in range(repeats)))
        return dict(us=statistics.median(busy), us_min=min(busy), us_max=max(busy), span_us=statistics.median(span))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = f(x, ws)
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - start) / (iters * len(ws)) * 1e6)
    return dict(us=statistics.median(runs), us_min=min(runs), us_max=max(runs))


def rate(entry: dict, nbytes: int) -> dict:
    tb_s = nbytes / (entry["us"] * 1e-6) / 1e12
    return {**entry, "tb_s": tb_s, "fraction": tb_s * 1e12 / COPY_BANDWIDTH}


INTERPRET = False  # --interpret: Pallas' interpret mode, to smoke-test this script on a CPU
TIMING = "device"  # --timing


def int8_reference(x, w):
    """x @ an int8 QuantizedWeight [K, N] in float32, returned in x's dtype."""
    y = jnp.dot(x.astype(jnp.float32), w.q.astype(jnp.float32), precision="highest")
    return (y * w.scale.reshape(1, -1)).astype(x.dtype)


def int4_reference(x, packed, scale, zero, input_scale):
    """x @ the weight an Int4Weight's stored arrays stand for, in float32, returned in x's dtype."""
    w = dequantize_int4(packed, scale, zero, input_scale)
    return jnp.dot(x.astype(jnp.float32), w, precision="highest").astype(x.dtype)


def fp4_reference(x, w):
    """x @ the weight an FP4Weight's stored arrays stand for, in float32, returned in x's dtype."""
    return jnp.dot(x.astype(jnp.float32), dequantize_fp4(w), precision="highest").astype(x.dtype)


def kmajor_kernels(config8=None, config4=None, config_fp4=None):
    """The K-major kernels as functions of (x, weight arrays in their layout)."""
    def int8(x, w):
        return w8a16_kmajor(x, *w, config=config8, interpret=INTERPRET)

    def int4(x, w):
        return w4a16_kmajor(x, *w, config=config4, interpret=INTERPRET)

    def fp4(x, w):
        return w4a16_fp4_kmajor(x, *w, config=config_fp4, interpret=INTERPRET)

    return int8, int4, fp4


def xla_paths():
    def bf16(x, w):
        return jnp.dot(x, w)

    def bf16_kmajor(x, w_t):  # the same product with the weight stored [N, K], as cuBLAS's "TN" gemv reads it
        return jax.lax.dot_general(x, w_t, (((1,), (1,)), ((), ())))

    def quantized(x, w):  # jaxllm's XLA path for quantized weights, never the kernels
        return xla_quantized_einsum("mk,kn->mn", x, w)

    return bf16, quantized, bf16_kmajor


def _weights_by_kind(k: int, n: int, copies: int, kinds, seed: int = 0):
    """dense bf16 copies, {kind: stored quantized copies}, {kind: K-major kernel arrays}."""
    dense, int8, int4, fp4 = make_weights(k, n, copies, seed, kinds)
    int8k, int4k, fp4k = kmajor_weights(int8, int4, fp4)
    stored = {"int8": int8, "int4": int4, "fp4": fp4}
    kmajor = {"int8": int8k, "int4": int4k, "fp4": fp4k}
    return dense, {kd: stored[kd] for kd in kinds}, {kd: kmajor[kd] for kd in kinds}


def reference(kind: str, x, w):
    """x @ a stored quantized weight in float32 (in x's dtype)."""
    if kind == "int8":
        return int8_reference(x, w)
    if kind == "int4":
        return int4_reference(x, w.packed, w.scale, w.zero, w.input_scale)
    return fp4_reference(x, w)


def control(kind: str, x, w):
    """The reference with an error the check must see: one K tile of x missing (int8), zero points
    off by one (int4), each block's scale on its neighbour's inputs (fp4)."""
    if kind == "int8":
        return int8_reference(x.at[:, :128].set(0), w)
    if kind == "int4":
        return int4_reference(x, w.packed, w.scale, (w.zero + 1) % 16, w.input_scale)
    return fp4_reference(x, dataclasses.replace(w, block_scale=jnp.roll(w.block_scale, 1, axis=0)))


def kernel(kind: str, config=None):
    """The K-major kernel of a kind as a function of (x, weight arrays in its layout)."""
    kk8, kk4, kkf = kmajor_kernels(config, config, config)
    return {"int8": kk8, "int4": kk4, "fp4": kkf}[kind]


def check_cases(kinds):
    """(name, kind, kernel config, FP4Weight format) of each kernel the check runs."""
    cases = [(f"{kd}_kmajor", kd, None, None) for kd in kinds if kd != "fp4"]
    if "fp4" in kinds:
        cases += [("fp4_kmajor", "fp4", None, FP4_FORMAT),
                  ("fp4_kmajor_products", "fp4", FP4Config(scale_at="products"), FP4_FORMAT),
                  ("fp4_mxfp4_kmajor", "fp4", None, "mxfp4")]
    return cases


def check(k: int, n: int, ms, kinds=KINDS, seed: int = 1) -> list[dict]:
    """Relative and max errors of each kernel against its float32 reference on random data, and
    of the `control` (a relative error the check must see). fp4 runs NVFP4 weights with both ways
    of applying the block scales, and MXFP4 weights."""
    dense, stored, _ = _weights_by_kind(k, n, 1, kinds, seed)
    out = []
    for name, kind, config, fmt in check_cases(kinds):
        w = quantize_fp4(dense[0], (0,), fmt) if fmt not in (None, FP4_FORMAT) else stored[kind][0]
        arrays = kmajor_arrays(kind, w)
        f = jax.jit(kernel(kind, config))
        for m in ms:
            x = jax.random.normal(jax.random.PRNGKey(seed + m), (m, k), jnp.bfloat16)
            entry = dict(kind=name, k=k, n=n, m=m)
            try:
                got, want, ctl = (np.asarray(a, np.float32) for a in (f(x, arrays), reference(kind, x, w),
                                                                       control(kind, x, w)))
                norm = np.linalg.norm(want)
                entry.update(rel_err=float(np.linalg.norm(got - want) / norm),
                             max_abs_err=float(np.abs(got - want).max()), max_abs_ref=float(np.abs(want).max()),
                             finite=bool(np.all(np.isfinite(got))),
                             control_rel_err=float(np.linalg.norm(ctl - want) / norm))
            except Exception as e:  # report and go on: one failing kernel must not hide the rest
                entry["error"] = f"{type(e).__name__}: {str(e)[:1000]}"
            out.append(entry)
            print(json.dumps(entry), flush=True)
    return out


def table(shapes, ms, iters: int, repeats: int, kinds=KINDS) -> list[dict]:
    rows = []
    bf16, xq, bf16k = xla_paths()
    bf16_kernel = lambda x, w: bf16_kmajor(x, w, interpret=INTERPRET)
    fp4_products = kernel("fp4", FP4Config(scale_at="products"))
    for k, n in shapes:
        copies = int(np.clip(math.ceil(ROTATE_BYTES / weight_bytes("int4", k, n)), 2, 12))
        dense, stored, kmajor = _weights_by_kind(k, n, copies, kinds)
        dense_t = [jnp.asarray(w.T) for w in dense]
        paths = [("bf16_xla", bf16, dense, "bf16"), ("bf16_kmajor_xla", bf16k, dense_t, "bf16"),
                 ("bf16_kmajor", bf16_kernel, dense_t, "bf16")]
        paths += [(f"{kd}_xla", xq, stored[kd], kd) for kd in kinds]
        paths += [(f"{kd}_kmajor", kernel(kd), kmajor[kd], kd) for kd in kinds]
        if "fp4" in kinds:
            paths.append(("fp4_kmajor_products", fp4_products, kmajor["fp4"], "fp4"))
        for m in ms:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.bfloat16)
            row = dict(m=m, k=k, n=n, copies=copies)
            for name, fn, ws, kind in paths:
                try:
                    row[name] = rate(timed(fn, x, ws, iters, repeats), weight_bytes(kind, k, n))
                except Exception as e:  # report and go on: one failing path must not hide the rest
                    row[name] = dict(error=f"{type(e).__name__}: {str(e)[:500]}")
            for name in ("bf16_kmajor_xla", "bf16_kmajor") + (("fp4_kmajor_products",) if "fp4" in kinds else ()):
                if "us" in row.get(name, {}) and "us" in row["bf16_xla"]:
                    row[f"{name}_speedup_vs_bf16"] = row["bf16_xla"]["us"] / row[name]["us"]
            for kind in kinds:
                pk = kmajor_plan(kind, m, k, n)
                row[f"{kind}_kmajor_plan"] = dict(block_n=pk.block_n, block_k=pk.block_k, stages=pk.num_stages,
                                                  splits=pk.num_splits)
                if "us" in row.get(f"{kind}_kmajor", {}) and "us" in row["bf16_xla"]:
                    row[f"{kind}_kmajor_speedup_vs_bf16"] = row["bf16_xla"]["us"] / row[f"{kind}_kmajor"]["us"]
                    if "us" in row.get(f"{kind}_xla", {}):
                        row[f"{kind}_kmajor_speedup_vs_xla"] = row[f"{kind}_xla"]["us"] / row[f"{kind}_kmajor"]["us"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


SWEEP = {  # kind: K-major kernel configs tried on the sweep shapes
    "int8": [KMajorConfig(block_n=bn, block_k=bk, num_splits=sp, num_stages=st)
             for bn, bk, sp, st in ((128, 128, None, None), (128, 256, None, None), (256, 128, None, None),
                                    (256, 256, None, None), (128, 128, None, 8), (128, 128, 1, None),
                                    (128, 128, 2, None), (64, 128, None, None))],
    "int4": [KMajorConfig(block_n=bn, num_splits=sp, num_stages=st)
             for bn, sp, st in ((128, None, None), (256, None, None))],
    "fp4": [FP4Config(block_n=bn, scale_at=at, num_splits=sp)
            for bn, at, sp in ((128, "operand", None), (256, "operand", None), (128, "products", None),
                               (256, "products", None), (128, "operand", 1))],
}


def lower(shapes, ms) -> list[dict]:
    """Compiles the fp4 kernel for the GPU (Mosaic GPU lowering, shared-memory fit included) at each
    shape, token count, way of scaling and block-scale dtype; needs no GPU."""
    out = []
    S = jax.ShapeDtypeStruct
    for k, n in shapes:
        for m in ms:
            for scale_at in ("operand", "products"):
                for dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float16):
                    cfg = FP4Config(scale_at=scale_at)
                    f = lambda x, q, bs, cs: w4a16_fp4_kmajor(x, q, bs, cs, config=cfg)
                    p = kmajor_plan("fp4", m, k, n, cfg)
                    entry = dict(k=k, n=n, m=m, scale_at=scale_at, block_scale=jnp.dtype(dtype).name,
                                 plan=dict(block_n=p.block_n, stages=p.num_stages, splits=p.num_splits,
                                           smem=p.smem_bytes()))
                    try:
                        jax.jit(f).trace(S((m, k), jnp.bfloat16), S((n, k), jnp.int4), S((k // 16, n), dtype),
                                         S((n,), jnp.float32)).lower(lowering_platforms=("cuda",))
                        entry["lowered"] = True
                    except Exception as e:
                        entry.update(lowered=False, error=f"{type(e).__name__}: {str(e)[:1000]}")
                    print(json.dumps(entry), flush=True)
                    out.append(entry)
    return out


def profile(k: int, n: int, m: int = 1, kinds=KINDS) -> dict:
    """GPU time per kernel (jax.profiler) of one call of each path: the kernels' own time apart
    from their XLA prologue and epilogue."""
    import glob
    import gzip
    import os
    import tempfile

    from benchmarks.profile_decode import gpu_events, per_name

    dense, _, kmajor = _weights_by_kind(k, n, 1, kinds)
    bf16 = xla_paths()[0]
    x = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.bfloat16)
    out = {}
    paths = [("bf16_xla", bf16, dense[0])] + [(f"{kd}_kmajor", kernel(kd), kmajor[kd][0]) for kd in kinds]
    for name, fn, w in paths:
        f = jax.jit(fn)
        jax.block_until_ready(f(x, w))
        log_dir = tempfile.mkdtemp()
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(5):
                y = f(x, w)
            jax.block_until_ready(y)
        path = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as fh:
            events = per_name(gpu_events(json.load(fh)))
        out[name] = {ev[:80]: dict(us=t / c, calls=c / 5) for ev, (t, c) in events.items()}
        print(json.dumps({name: out[name]}), flush=True)
    return dict(k=k, n=n, m=m, per_kernel=out)


def sweep(shapes, ms, iters: int, repeats: int, kinds=KINDS) -> list[dict]:
    out = []
    for k, n in shapes:
        copies = int(np.clip(math.ceil(ROTATE_BYTES / weight_bytes("int4", k, n)), 2, 12))
        _, stored, kmajor = _weights_by_kind(k, n, copies, kinds)
        for m in ms:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.bfloat16)
            for kind in kinds:
                for cfg in SWEEP[kind]:
                    fn, ws = kernel(kind, cfg), kmajor[kind]
                    entry = dict(kind=kind, m=m, k=k, n=n, config=str(cfg))
                    try:
                        p = kmajor_plan(kind, m, k, n, cfg)
                        entry["plan"] = dict(block_n=p.block_n, block_k=p.block_k, stages=p.num_stages,
                                             splits=p.num_splits, smem=p.smem_bytes())
                        entry.update(rate(timed(fn, x, ws, iters, repeats), weight_bytes(kind, k, n)))
                        got, want = (np.asarray(a, np.float32)
                                     for a in (jax.jit(fn)(x, ws[0]), reference(kind, x, stored[kind][0])))
                        entry["rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                    except Exception as e:
                        entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(json.dumps(entry), flush=True)
                    out.append(entry)
    return out


def decode_prediction(iters: int, repeats: int, kinds=KINDS) -> dict:
    """Batch-1 tokens/s if every weight product of a Llama-3-8B step ran at the measured speed,
    plus OTHER_MS for the rest of the step."""
    bf16 = xla_paths()[0]
    per_shape = {}
    for k, n in LAYER_SHAPES + (LM_HEAD,):
        copies = int(np.clip(math.ceil(ROTATE_BYTES / weight_bytes("int4", k, n)), 2, 12))
        dense, _, kmajor = _weights_by_kind(k, n, copies, kinds)
        x = jax.random.normal(jax.random.PRNGKey(0), (1, k), jnp.bfloat16)
        paths = [("bf16", bf16, dense)] + [(kd, kernel(kd), kmajor[kd]) for kd in kinds]
        per_shape[f"{k}x{n}"] = {name: timed(fn, x, ws, iters, repeats)["us"] for name, fn, ws in paths}
        del dense, kmajor, paths
        print(json.dumps({f"{k}x{n}": per_shape[f"{k}x{n}"]}), flush=True)
    out = dict(per_shape_us=per_shape, other_ms=OTHER_MS)
    for name in ("bf16",) + tuple(kinds):
        layer_us = sum(per_shape[f"{k}x{n}"][name] for k, n in LAYER_SHAPES)
        step_ms = (NUM_LAYERS * layer_us + per_shape[f"{LM_HEAD[0]}x{LM_HEAD[1]}"][name]) / 1e3 + OTHER_MS
        out[name] = dict(weight_ms=step_ms - OTHER_MS, step_ms=step_ms, tokens_per_s=1e3 / step_ms)
    return out


def summary(result: dict) -> str:
    rows = result.get("rows", [])
    kinds = [kd for kd in KINDS if rows and f"{kd}_kmajor" in rows[0]]
    lines = ["  M  shape        bf16 us" + "".join(f" | {kd} us  TB/s  frac  x bf16" for kd in kinds)]

    def cell(row, name):
        e = row.get(name, {})
        return f"{e['us']:7.1f} {e['tb_s']:5.2f} {e['fraction']:5.2f}" if "us" in e else "  error           "

    for r in rows:
        lines.append(f"{r['m']:3d}  {r['k']:5d}x{r['n']:<5d} {r['bf16_xla'].get('us', float('nan')):7.1f}" +
                     "".join(f" | {cell(r, f'{kd}_kmajor')} {r.get(f'{kd}_kmajor_speedup_vs_bf16', float('nan')):6.2f}"
                             for kd in kinds))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                        help="quantized kinds to check and time (fp4: NVFP4, MXFP4 too in the check)")
    parser.add_argument("--sections", nargs="+", default=["check", "table", "predict"],
                        choices=["check", "table", "sweep", "predict", "profile", "lower"],
                        help="lower: compile the fp4 kernel for the GPU at --shapes x --m (no GPU needed)")
    parser.add_argument("--sweep-m", type=int, nargs="+", default=[1])
    parser.add_argument("--check-m", type=int, nargs="+", default=[1, 13, 64])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results_quant_matmul_kernels.json")
    parser.add_argument("--interpret", action="store_true", help="CPU smoke test (tiny --shapes)")
    parser.add_argument("--timing", default="device", choices=["device", "wall"],
                        help="device: GPU kernel time under jax.profiler; wall: host-timed back-to-back calls")
    args = parser.parse_args(argv)
    global INTERPRET, TIMING
    INTERPRET, TIMING = args.interpret, args.timing
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    kinds = tuple(kd for kd in KINDS if kd in args.kinds)
    result = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, device=jax.devices()[0].device_kind,
                  copy_bandwidth=COPY_BANDWIDTH, method=__doc__.split("\n\n")[1], kinds=kinds, timing=args.timing)

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    sections = {"check": lambda: [e for k, n in shapes for e in check(k, n, args.check_m, kinds)],
                "table": lambda: table(shapes, args.m, args.iters, args.repeats, kinds),
                "sweep": lambda: sweep(shapes[:2], args.sweep_m, args.iters, args.repeats, kinds),
                "predict": lambda: decode_prediction(args.iters, args.repeats, kinds),
                "profile": lambda: [profile(k, n, kinds=kinds) for k, n in shapes],
                "lower": lambda: lower(shapes, args.m)}
    key = {"check": "correctness", "table": "rows", "sweep": "sweep", "predict": "decode_prediction",
           "profile": "profile", "lower": "lowering"}
    for name in args.sections:
        start = time.perf_counter()
        try:
            result[key[name]] = sections[name]()
        except Exception as e:  # keep what the other sections measured
            result[key[name]] = dict(error=f"{type(e).__name__}: {str(e)[:2000]}")
        result.setdefault("section_seconds", {})[name] = time.perf_counter() - start
        save()
    print(summary(result))
    if isinstance(result.get("decode_prediction"), dict) and "bf16" in result["decode_prediction"]:
        print({k: round(v["tokens_per_s"], 1) for k, v in result["decode_prediction"].items()
               if isinstance(v, dict) and "tokens_per_s" in v})
    if isinstance(result.get("lowering"), list):
        print(f"lowered {sum(e['lowered'] for e in result['lowering'])} of {len(result['lowering'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
