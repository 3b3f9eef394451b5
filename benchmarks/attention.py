"""Paged attention on the GPU: our Mosaic GPU kernels beside the XLA gather path, jax's bundled
kernels and cuDNN (contiguous K/V). Decode: one query token per sequence. Prefill: a causal chunk
over its cached prefix.

    PYTHONPATH=. python -m benchmarks.attention --out results_attention.json
    PYTHONPATH=. python -m benchmarks.attention --prefill --out results_prefill_attention.json
    PYTHONPATH=. python -m benchmarks.attention --kv-dtypes bf16,fp8,int8 --out results_quantized_kv.json

`--append` times the decode kernel that also stores the new token against storing it through XLA
first (both donating the pages), and checks both outputs and the stored pages against the reference.

`--kv-dtypes` runs only our decode kernel, over the same random K/V stored as bf16 pages and as
int8 / fp8 (e4m3) pages with per-token scales, at the first two decode cases.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.shapes import COPY_BANDWIDTH
from jaxllm.kv_cache import KVCache
from jaxllm.ops.attention import paged_attention
from jaxllm.ops.kv_quant import quantize
from jaxllm.ops.attention import write_kv
from pallas_kernels.paged_decode_attention import (DecodeConfig, paged_decode_attention, paged_decode_attention_append,
                                                   paged_decode_attention_append_reference,
                                                   paged_decode_attention_reference)
from pallas_kernels.paged_prefill_attention import (PrefillConfig, paged_prefill_attention,
                                                    paged_prefill_attention_reference)

PREFILL_CASES = [  # batch, prefix already cached, new tokens
    (1, 0, 4096),
    (1, 2048, 2048),
    (4, 0, 1024),
]
PREFILL_CONFIGS = [PrefillConfig(64, 2), PrefillConfig(64, 3), PrefillConfig(128, 2)]

CASES = [  # batch, context, page size
    (64, 4096, 16),
    (8, 16384, 16),
    (64, 384, 16),
    (1, 384, 16),
    (1, 4096, 16),
]
CONFIGS = [DecodeConfig(64, 2), DecodeConfig(64, 3), DecodeConfig(64, 4), DecodeConfig(128, 2), DecodeConfig(128, 3)]
HQ, HKV, D = 32, 8, 128
KV_DTYPES = {"bf16": None, "fp8": "fp8_e4m3", "int8": "int8"}  # name -> kv_cache_dtype
QUANTIZED_CONFIGS = [DecodeConfig(64, 2), DecodeConfig(64, 3), DecodeConfig(64, 4)]


def time_ms(fn, *args, iters: int = 20) -> float:
    """Mean time of `iters` back-to-back calls (dispatch overlaps execution), after a warm-up."""
    jax.block_until_ready(fn(*args))
    best = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best.append((time.perf_counter() - start) / iters * 1e3)
    return float(np.median(best))


def make_inputs(batch: int, context: int, page_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pages_per_seq = context // page_size
    num_pages = batch * pages_per_seq + 1
    table = (1 + rng.permutation(batch * pages_per_seq)).reshape(batch, pages_per_seq).astype(np.int32)
    key = jax.random.PRNGKey(seed)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, HKV, HQ // HKV, D), jnp.bfloat16)
    k = jax.random.normal(kk, (1, num_pages, page_size, HKV, D), jnp.bfloat16)
    v = jax.random.normal(kv, (1, num_pages, page_size, HKV, D), jnp.bfloat16)
    lens = np.full((batch,), context, np.int32)
    return q, k, v, jnp.asarray(table), jnp.asarray(lens)


def run_case(batch: int, context: int, page_size: int) -> dict:
    q, k, v, table, lens = make_inputs(batch, context, page_size)
    scale = D**-0.5
    kv_bytes = 2 * batch * context * HKV * D * 2
    row = dict(batch=batch, context=context, page_size=page_size, kv_bytes=kv_bytes)
    ref = jax.jit(lambda q, k, v, t, n: paged_decode_attention_reference(q, k, v, 0, t, n, scale=scale))
    expect = np.asarray(ref(q, k, v, table, lens), np.float32)

    def record(name, fn, *args):
        try:
            ms = time_ms(fn, *args)
            got = np.asarray(fn(*args), np.float32).reshape(expect.shape)
            err = float(np.max(np.abs(got - expect)))
            row[name] = dict(ms=ms, tb_s=kv_bytes / ms / 1e9, fraction=kv_bytes / (ms / 1e3) / COPY_BANDWIDTH,
                             max_abs_err=err)
        except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
            row[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        print(batch, context, page_size, name, row[name], flush=True)

    record("xla_gather", ref, q, k, v, table, lens)
    for cfg in CONFIGS:
        fn = jax.jit(lambda q, k, v, t, n, cfg=cfg: paged_decode_attention(q, k, v, 0, t, n, scale=scale, config=cfg))
        record(config_key(cfg, False), fn, q, k, v, table, lens)

    from jax.experimental.pallas.ops.gpu import paged_attention as triton_paged
    k_t = jnp.transpose(k[0], (2, 0, 1, 3))  # [Hkv, P, S, D], the bundled kernel's layout
    v_t = jnp.transpose(v[0], (2, 0, 1, 3))
    pages_per_seq = table.shape[1]
    for splits in (16, 4, 1):
        if pages_per_seq % splits or (pages_per_seq // splits) % 8:
            continue
        fn = jax.jit(lambda q, k, v, t, n, s=splits: triton_paged.paged_attention(
            q.reshape(batch, HQ, D) * scale, k, v, t, n, k_splits=s))
        record(f"jax_triton_paged_splits{splits}", fn, q, k_t, v_t, table, lens)

    k_c = k[0][table].reshape(batch, context, HKV, D)  # contiguous K/V for cuDNN
    v_c = v[0][table].reshape(batch, context, HKV, D)
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q.reshape(batch, 1, HQ, D), k, v, scale=scale, implementation="cudnn"))
    record("cudnn_contiguous", fn, q, k_c, v_c)
    return row


def run_prefill_case(batch: int, prefix: int, new: int, page_size: int = 16) -> dict:
    context = prefix + new
    _, k, v, table, lens = make_inputs(batch, context, page_size)
    key = jax.random.PRNGKey(1)
    q = jax.random.normal(key, (batch, new, HKV, HQ // HKV, D), jnp.bfloat16)
    positions = jnp.broadcast_to(prefix + jnp.arange(new, dtype=jnp.int32), (batch, new))
    scale = D**-0.5
    # Causal FLOPs: each new token sees its prefix and the chunk up to itself.
    flops = 4 * batch * HQ * D * (new * prefix + new * (new + 1) / 2)
    row = dict(batch=batch, prefix=prefix, new_tokens=new, page_size=page_size, flops=flops)
    ref = jax.jit(lambda q, k, v, t, p, n: paged_prefill_attention_reference(q, k, v, 0, t, p, n, scale=scale))
    expect = np.asarray(ref(q, k, v, table, positions, lens), np.float32)

    def record(name, fn, *args):
        try:
            ms = time_ms(fn, *args, iters=10)
            got = np.asarray(fn(*args), np.float32).reshape(expect.shape)
            row[name] = dict(ms=ms, tflops=flops / ms / 1e9, max_abs_err=float(np.max(np.abs(got - expect))))
        except Exception as e:
            row[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        print(batch, prefix, new, name, row[name], flush=True)

    record("xla_gather", ref, q, k, v, table, positions, lens)
    for cfg in PREFILL_CONFIGS:
        fn = jax.jit(lambda q, k, v, t, p, n, cfg=cfg: paged_prefill_attention(
            q, k, v, 0, t, p, n, scale=scale, config=cfg))
        record(f"ours_kv{cfg.block_kv}_st{cfg.num_stages}", fn, q, k, v, table, positions, lens)
    k_c = k[0][table].reshape(batch, context, HKV, D)
    v_c = v[0][table].reshape(batch, context, HKV, D)
    if prefix == 0:  # cuDNN's causal mask is top-left aligned: only whole prompts compare
        fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q.reshape(batch, new, HQ, D), k, v, scale=scale, is_causal=True, implementation="cudnn"))
        record("cudnn_contiguous", fn, q, k_c, v_c)
    return row


def run_kv_dtype_case(batch: int, context: int, page_size: int, kv_dtypes, configs) -> dict:
    """Our decode kernel over one set of random K/V stored as each of `kv_dtypes`: time, bytes read
    (values and scales) per second, and errors against the reference on the same pages."""
    q, k, v, table, lens = make_inputs(batch, context, page_size)
    scale = D**-0.5
    row = dict(batch=batch, context=context, page_size=page_size)
    exact = np.asarray(paged_decode_attention_reference(q, k, v, 0, table, lens, scale=scale), np.float32)
    for name in kv_dtypes:
        kind = KV_DTYPES[name]
        if kind is None:
            pages, scales, cfgs = (k, v), {}, [DecodeConfig(), DecodeConfig(128, 2)]
            kv_bytes = 2 * batch * context * HKV * D * 2
        else:
            (k8, ks), (v8, vs) = quantize(k, kind), quantize(v, kind)
            pages, scales, cfgs = (k8, v8), dict(k_scale=ks, v_scale=vs), configs
            kv_bytes = 2 * batch * context * HKV * (D * k8.dtype.itemsize + 4)
        ref = jax.jit(lambda q, k, v, t, n, s: paged_decode_attention_reference(q, k, v, 0, t, n, scale=scale, **s))
        expect = np.asarray(ref(q, *pages, table, lens, scales), np.float32)
        entry = dict(kv_bytes=kv_bytes, quantization_rel_err=_rel(expect, exact))
        if kind is not None:  # the runtime's XLA path on the same cache, as a second reference
            cache = KVCache(*pages, scales["k_scale"], scales["v_scale"])
            xla = jax.jit(lambda q, c, t, n: paged_attention(q[:, None], c, 0, t, (n - 1)[:, None], n, scale=scale))
            entry["xla_vs_reference_max_abs_err"] = float(np.max(np.abs(
                np.asarray(xla(q, cache, table, lens), np.float32)[:, 0] - expect)))
        for cfg in cfgs:
            fn = jax.jit(lambda q, k, v, t, n, s, cfg=cfg: paged_decode_attention(
                q, k, v, 0, t, n, scale=scale, config=cfg, **s))
            key = config_key(cfg, kind is not None)
            try:
                ms = time_ms(fn, q, *pages, table, lens, scales)
                got = np.asarray(fn(q, *pages, table, lens, scales), np.float32)
                entry[key] = dict(ms=ms, tb_s=kv_bytes / ms / 1e9, fraction=kv_bytes / (ms / 1e3) / COPY_BANDWIDTH,
                                  max_abs_err=float(np.max(np.abs(got - expect))), rel_err=_rel(got, expect),
                                  all_finite=bool(np.all(np.isfinite(got))))
            except Exception as e:  # a config that cannot run (shared memory) is reported, not fatal
                entry[key] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            print(batch, context, name, key, entry[key], flush=True)
        row[name] = entry
    bf16 = row.get("bf16", {}).get(config_key(DecodeConfig(), False), {})
    for name in kv_dtypes:  # speedup of each config over the bf16 kernel's default, same run
        for key, r in row[name].items():
            if isinstance(r, dict) and "ms" in r and "ms" in bf16:
                r["speedup_vs_bf16_default"] = bf16["ms"] / r["ms"]
    return row


def run_append_case(batch: int, context: int, page_size: int, iters: int = 20) -> dict:
    """The new token stored by the kernel vs. by XLA then read by the kernel: ms per call (pages
    donated and threaded through the calls), errors against the reference, pages compared exactly."""
    q, k, v, table, lens = make_inputs(batch, context, page_size)
    kn, vn = (jax.random.normal(jax.random.PRNGKey(s), (batch, HKV, D), jnp.bfloat16) for s in (7, 8))
    scale = D**-0.5
    want, want_k, want_v = (np.asarray(x, np.float32) for x in jax.jit(
        lambda *a: paged_decode_attention_append_reference(*a, 0, table, lens, scale=scale))(q, kn, vn, k, v))

    def unfused(q, kn, vn, k, v):
        pos = (lens - 1)[:, None]
        k, v = (write_kv(p, 0, x[:, None], table, pos) for p, x in ((k, kn), (v, vn)))
        return paged_decode_attention(q, k, v, 0, table, lens, scale=scale), k, v

    fused = lambda q, kn, vn, k, v: paged_decode_attention_append(q, kn, vn, k, v, 0, table, lens, scale=scale)
    row = dict(batch=batch, context=context, page_size=page_size)
    for name, fn in (("xla_store_then_kernel", unfused), ("kernel_stores", fused)):
        fn = jax.jit(fn, donate_argnums=(3, 4))
        out, k2, v2 = fn(q, kn, vn, jnp.copy(k), jnp.copy(v))
        entry = dict(max_abs_err=float(np.max(np.abs(np.asarray(out, np.float32) - want))),
                     pages_equal=bool(np.array_equal(np.asarray(k2, np.float32), want_k)
                                      and np.array_equal(np.asarray(v2, np.float32), want_v)))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(iters):
                out, k2, v2 = fn(q, kn, vn, k2, v2)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - start) / iters * 1e3)
        entry["ms"] = float(np.median(times))
        row[name] = entry
        print(batch, context, page_size, name, entry, flush=True)
    return row


def _rel(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def summary(rows) -> str:
    """One line per (case, dtype, config): the table the report quotes."""
    lines = [f"{'case':>12} {'pages':>5} {'config':>11} {'ms':>7} {'TB/s':>6} {'of 4.27':>7} {'x bf16':>6} {'max err':>8}"]
    for row in rows:
        for name in KV_DTYPES:
            for key, r in row.get(name, {}).items():
                if isinstance(r, dict) and "ms" in r:
                    lines.append(f"{row['batch']:>4}x{row['context']:<7} {name:>5} {key[5:]:>11} {r['ms']:7.3f} "
                                 f"{r['tb_s']:6.2f} {r['fraction']:7.1%} {r.get('speedup_vs_bf16_default', 0):6.2f} "
                                 f"{r['max_abs_err']:8.1e}")
    return "\n".join(lines)


def config_key(cfg: DecodeConfig, quantized: bool) -> str:
    """'ours_kv64_st3': a decode config's name in the JSON, with the stages it resolves to."""
    return f"ours_kv{cfg.block_kv}_st{cfg.stages(quantized)}"


def parse_config(text: str) -> DecodeConfig:
    """'128x2' -> DecodeConfig(block_kv=128, num_stages=2)."""
    parts = text.split("x")
    if len(parts) != 2 or not all(x.isdigit() for x in parts):
        raise ValueError(f"decode config {text!r}: expected BLOCKxSTAGES, e.g. 128x2")
    block, stages = map(int, parts)
    return DecodeConfig(block, stages)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results_attention.json")
    parser.add_argument("--quick", action="store_true", help="first two cases only")
    parser.add_argument("--prefill", action="store_true", help="the prefill kernel's cases instead")
    parser.add_argument("--append", action="store_true", help="the decode kernel storing the new token, vs. XLA")
    parser.add_argument("--kv-dtypes", default=None,
                        help=f"comma-separated subset of {','.join(KV_DTYPES)}: our decode kernel over those pages")
    parser.add_argument("--page-size", type=int, default=None,
                        help="with --kv-dtypes: tokens per page instead of each case's (a TMA copy moves one page)")
    parser.add_argument("--configs", default=None,
                        help="with --kv-dtypes: comma-separated BLOCKxSTAGES decode configs for the quantized "
                             "pages (e.g. 64x3,128x2) instead of the default list")
    args = parser.parse_args(argv)
    result = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, device=str(jax.devices()[0]),
                  copy_bandwidth=COPY_BANDWIDTH, heads=(HQ, HKV, D))
    if args.kv_dtypes:
        names = args.kv_dtypes.split(",")
        if not names or any(n not in KV_DTYPES for n in names):
            raise ValueError(f"--kv-dtypes {args.kv_dtypes!r}: choose from {','.join(KV_DTYPES)}")
        configs = QUANTIZED_CONFIGS if args.configs is None else [parse_config(c) for c in args.configs.split(",")]
        rows = []
        for batch, context, page_size in CASES[:2]:
            rows.append(run_kv_dtype_case(batch, context, args.page_size or page_size, names, configs))
            with open(args.out, "w") as f:  # after each case: a run cut short keeps what it measured
                json.dump({**result, "rows": rows}, f, indent=1)
        print(summary(rows))
        return 0
    if args.prefill:
        rows = [run_prefill_case(*case) for case in PREFILL_CASES]
    elif args.append:
        rows = [run_append_case(*case) for case in (CASES[:2] if args.quick else CASES)]
    else:
        rows = [run_case(*case) for case in (CASES[:2] if args.quick else CASES)]
    result["rows"] = rows
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
