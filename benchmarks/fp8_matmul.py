"""fp8 W8A8 products at prefill shapes on the GPU: the Mosaic GPU kernel (pallas_kernels/fp8_matmul.py)
against XLA's bf16 and fp8 products, same run, same inputs.

    PYTHONPATH=. python -m benchmarks.fp8_matmul --out benchmarks/results_fp8_matmul_h200.json

Sections: `check` (the kernel against its float32 reference at full size), `table` (every path per
shape), `sweep` (kernel tile configurations), `decode` (fp8 weights at 1 to 64 tokens: the
weight-only K-major kernel against XLA), `smoothquant` (int8 W8A8 twins through XLA at prefill shapes). TFLOP/s count 2*M*K*N; DESIGN.md's ceilings: bf16
648 and fp8 814 TFLOP/s through XLA at 8192^3 (the H200's fp8 tensor-core peak is 1979).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.quant_matmul_kernels import LAYER_SHAPES, ROTATE_BYTES, timed
from jaxllm.quantization import W8A8Weight, quantize_tokens, quantize_w8a8
from jaxllm.quantization import einsum as xla_quantized_einsum
from pallas_kernels.fp8_matmul import FP8Config, fp8_matmul, fp8_matmul_reference

# Llama-3-8B's products per layer (qkv, o, gate+up, down) at 2048 tokens, and the ceiling's shape.
SHAPES = ((2048, 4096, 6144), (2048, 4096, 4096), (2048, 4096, 28672), (2048, 14336, 4096), (8192, 8192, 8192))
CONFIGS = (FP8Config(64, 256, 128, 3), FP8Config(128, 128, 128, 3), FP8Config(64, 128, 128, 4),
           FP8Config(64, 128, 128, 5), FP8Config(64, 128, 256, 2), FP8Config(64, 192, 128, 4))
INTERPRET = False  # --interpret: Pallas' interpret mode, to smoke-test this script on a CPU


def inputs(m: int, k: int, n: int, seed: int = 0):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (k, n), jnp.bfloat16) * 0.02
    wq = quantize_w8a8(w, (0,), "fp8")
    return x, w, wq


def kernel_path(config: FP8Config):
    def f(x, w: W8A8Weight):
        xq, sx = quantize_tokens(x, "fp8")
        return fp8_matmul(xq, w.q.T, sx, w.scale.reshape(-1), config=config, interpret=INTERPRET)
    return f


def kernel_on_codes(config: FP8Config):
    return lambda c, w_t: fp8_matmul(c[0], w_t, c[1], jnp.ones((w_t.shape[0],), jnp.float32), config=config,
                                     interpret=INTERPRET)


def check(m: int, k: int, n: int, config: FP8Config) -> dict:
    x, _, wq = inputs(m, k, n, seed=1)
    xq, sx = quantize_tokens(x, "fp8")
    w_t, sw = wq.q.T, wq.scale.reshape(-1)
    y = jax.jit(lambda *a: fp8_matmul(*a, config=config, interpret=INTERPRET))(xq, w_t, sx, sw)
    r = fp8_matmul_reference(xq, w_t, sx, sw)
    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - r.astype(jnp.float32))))
    scale = float(jnp.max(jnp.abs(r.astype(jnp.float32))))
    return dict(shape=[m, k, n], config=str(config), max_abs_err=err, max_abs=scale, ok=err <= 2 ** -6 * scale)  # two bf16 roundings


def table(shapes, iters: int, repeats: int, config: FP8Config) -> list[dict]:
    rows = []
    for m, k, n in shapes:
        x, w, wq = inputs(m, k, n)
        codes = quantize_tokens(x, "fp8")
        w_t = jax.block_until_ready(wq.q.T.copy())
        flops = 2 * m * k * n
        paths = {
            "bf16 XLA": (lambda x, w: jnp.dot(x, w), x, w),
            "fp8 W8A8 XLA (current path, incl. activation quantization)":
                (lambda x, w: xla_quantized_einsum("mk,kn->mn", x, w), x, wq),
            "fp8 codes XLA dot [N,K] (no scales)":
                (lambda c, w_t: jnp.dot(c[0], w_t.T, preferred_element_type=jnp.bfloat16), codes, w_t),
            "fp8 kernel (codes, scales)": (kernel_on_codes(config), codes, w_t),
            "fp8 kernel W8A8 (incl. activation quantization)": (kernel_path(config), x, wq),
        }
        row = dict(shape=[m, k, n], config=str(config))
        for name, (fn, a, b) in paths.items():
            t = timed(fn, a, [b], iters, repeats)
            row[name] = {**t, "tflops": flops / (t["us"] * 1e-6) / 1e12}
        bf = row["bf16 XLA"]["us"]
        for name in paths:
            row[name]["vs_bf16"] = bf / row[name]["us"]
        print(json.dumps(dict(shape=row["shape"], **{n: (round(v["us"], 1), round(v["tflops"]), round(v["vs_bf16"], 2))
                                                   for n, v in row.items() if isinstance(v, dict)})), flush=True)
        rows.append(row)
    return rows


def decode_table(shapes, ms, iters: int, repeats: int, rotate_bytes: float = ROTATE_BYTES) -> list[dict]:
    """Decode-sized products of fp8 weights: the weight-only K-major kernel (fp8 codes to float16 in
    registers) against XLA's fp8 gemm of per-token codes (both K-major) and bf16, per token count;
    each timed call cycles through weight copies of at least ROTATE_BYTES, three times the L2."""
    from jaxllm.kernel_weights import kernel_layout, matmul_kernel, w8a8_matmul

    rows = []
    for k, n in shapes:
        copies = max(1, math.ceil(rotate_bytes / (2 * k * n)))  # so no weight stays in L2 between calls
        weights = [inputs(1, k, n, seed=i)[1:] for i in range(copies)]
        dense = [w for w, _ in weights]
        twins = jax.block_until_ready([kernel_layout(wq) for _, wq in weights])
        for m in ms:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.bfloat16)
            paths = {"bf16 XLA": (lambda x, w: jnp.dot(x, w), dense),
                     "fp8 W8A8 XLA K-major": (w8a8_matmul, twins),
                     "fp8 weight-only kernel": (lambda x, w: matmul_kernel(x, w, interpret=INTERPRET), twins)}
            row = dict(m=m, k=k, n=n, copies=copies)
            for name, (fn, b) in paths.items():
                t = timed(fn, x, b, iters, repeats)
                row[name] = {**t, "tb_s": (k * n * (2 if name.startswith("bf16") else 1)) / (t["us"] * 1e-6) / 1e12}
            for name in paths:
                row[name]["vs_bf16"] = row["bf16 XLA"]["us"] / row[name]["us"]
            print(json.dumps(dict(m=m, k=k, n=n, **{p: (round(v["us"], 1), round(v["vs_bf16"], 2)) for p, v in row.items()
                                                    if isinstance(v, dict)})), flush=True)
            rows.append(row)
    return rows


def smoothquant_table(shapes, iters: int, repeats: int) -> list[dict]:
    """SmoothQuant's int8 W8A8 twins through XLA (int8 x int8 -> int32 gemm of per-token codes)
    against bf16 at prefill shapes, with the error against the product of the dequantized weight."""
    from jaxllm.kernel_weights import kernel_layout, w8a8_matmul

    rows = []
    for m, k, n in shapes:
        x, w, _ = inputs(m, k, n)
        s = jax.random.uniform(jax.random.PRNGKey(1), (k,), jnp.float32, 0.5, 2.0)
        twin = jax.block_until_ready(kernel_layout(quantize_w8a8(w, (0,), "int8", s)))
        got = jax.jit(w8a8_matmul)(x, twin).astype(jnp.float32)
        want = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
        rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        bf = timed(lambda x, w: jnp.dot(x, w), x, [w], iters, repeats)
        sq = timed(w8a8_matmul, x, [twin], iters, repeats)
        rows.append(dict(shape=[m, k, n], bf16_us=bf["us"], int8_w8a8_us=sq["us"], vs_bf16=bf["us"] / sq["us"],
                         tops=2 * m * k * n / (sq["us"] * 1e-6) / 1e12, rel_err=rel))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def sweep(shapes, iters: int, repeats: int) -> list[dict]:
    rows = []
    for m, k, n in shapes:
        x, _, wq = inputs(m, k, n)
        codes = quantize_tokens(x, "fp8")
        w_t = jax.block_until_ready(wq.q.T.copy())
        for config in CONFIGS:
            if n % config.block_n or k % config.block_k:
                continue
            try:
                t = timed(kernel_on_codes(config), codes, [w_t], iters, repeats)
            except Exception as e:  # a configuration Mosaic GPU refuses: record why
                rows.append(dict(shape=[m, k, n], config=str(config), error=str(e)[:300]))
                continue
            tflops = 2 * m * k * n / (t["us"] * 1e-6) / 1e12
            rows.append(dict(shape=[m, k, n], config=str(config), **t, tflops=tflops))
            print(m, k, n, config, round(t["us"], 1), round(tflops), flush=True)
    return rows


def main(argv=None) -> int:
    global INTERPRET
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sections", nargs="+", default=["check", "table", "sweep"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interpret", action="store_true")
    parser.add_argument("--out", default="results_fp8_matmul.json")
    args = parser.parse_args(argv)
    INTERPRET = args.interpret
    shapes = ((128, 256, 256),) if args.interpret else SHAPES
    config = FP8Config(64, 64, 128, 2, num_blocks=2) if args.interpret else FP8Config()
    result = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, device=str(jax.devices()[0]))
    if "check" in args.sections:
        result["check"] = [check(m, k, n, config) for m, k, n in (shapes[:1] if args.interpret else
                                                                  ((2048, 4096, 6144), (300, 4096, 4096)))]
        print(result["check"], flush=True)
    if "table" in args.sections:
        result["table"] = table(shapes, args.iters, args.repeats, config)
    if "decode" in args.sections:
        result["decode"] = (decode_table(((256, 256),), (1,), 1, 1, rotate_bytes=0) if args.interpret else
                            decode_table(LAYER_SHAPES, (1, 4, 16, 32, 64), args.iters, args.repeats))
    if "smoothquant" in args.sections:
        result["smoothquant"] = smoothquant_table(shapes if args.interpret else shapes[:4], args.iters, args.repeats)
    if "sweep" in args.sections and not args.interpret:
        result["sweep"] = sweep(shapes[:4], args.iters, args.repeats)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(dict(check=result.get("check")), default=str), flush=True)
    return 0 if all(c["ok"] for c in result.get("check", [])) else 1


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
