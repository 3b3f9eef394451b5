"""A decode step's weight products in a chain, with and without the L2 prefetch of the next weight
(`pallas_kernels.quant_matmul_kmajor.Prefetch`).

Llama-3-8B's four products a layer (qkv 4096x6144, o 4096x4096, gate/up 4096x28672, down 14336x4096)
over `--layers` layers of distinct random weights, each product's input made from the last one's
output (sliced to its K and divided by its RMS: two small XLA kernels between products, as in a
real step), through the K-major kernels at `--m` tokens. Variant "0" runs without prefetch; "s"
makes every product ask the L2 for the first s tiles of each block of the next product (the last
for the first, which the next iteration runs). Variants alternate in the order given, so drift
shows as a difference between repeats of one variant. Each row also gives the largest difference
of its chain's output from the first variant's (a prefetch must change no value: 0).

    PYTHONPATH=. python -m benchmarks.prefetch_chain --kinds int8 int4 --steps 0 2 0 2 --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.quant_matmul_kernels import LAYER_SHAPES, weight_bytes
from benchmarks.shapes import COPY_BANDWIDTH
from pallas_kernels.quant_matmul_kmajor import Prefetch, plan, w4a16_kmajor, w8a16_kmajor

KINDS = ("int8", "int4")


def random_weights(kind: str, k: int, n: int, key) -> tuple:
    """K-major arrays of one random weight: int8 (codes, channel scales) or int4 (codes, group
    scales, zero points). Random codes suffice: the kernels' time does not depend on the values."""
    kc, ks, kz = jax.random.split(key, 3)
    if kind == "int8":
        return (jax.random.randint(kc, (n, k), -127, 128, jnp.int8),
                jax.random.uniform(ks, (n,), jnp.float32, 1e-3, 2e-3))
    return (jax.random.randint(kc, (n, k), -8, 8, jnp.int8).astype(jnp.int4),
            jax.random.uniform(ks, (k // 128, n), jnp.float32, 1e-3, 2e-3),
            jax.random.randint(kz, (k // 128, n), 0, 16, jnp.uint8))


def product(kind: str, x, w, prefetch):
    if kind == "int8":
        return w8a16_kmajor(x, *w, prefetch=prefetch)
    return w4a16_kmajor(x, *w, prefetch=prefetch)


def chain_fn(kind: str, m: int, steps: int):
    """f(x, weights) running every product once in order; weights: [layer][product] arrays."""
    def f(x, weights):
        flat = [w for layer in weights for w in layer]
        shapes = [s for _ in weights for s in LAYER_SHAPES]
        for i, (w, (k, n)) in enumerate(zip(flat, shapes)):
            j = (i + 1) % len(flat)
            nk, nn = shapes[j]
            ahead = Prefetch(flat[j][0], plan(kind, m, nk, nn), steps) if steps else None
            y = product(kind, x, w, ahead)
            y = y[:, :nk].astype(jnp.float32)  # the next product's input, normalised
            x = (y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6)).astype(jnp.bfloat16)
        return x
    return jax.jit(f)


def timed(f, x, weights, iters: int, repeats: int) -> dict:
    jax.block_until_ready(f(x, weights))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        y = x
        for _ in range(iters):
            y = f(y, weights)
        jax.block_until_ready(y)
        runs.append((time.perf_counter() - start) / iters * 1e6)
    return dict(us=statistics.median(runs), us_min=min(runs), us_max=max(runs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 1, 2, 4, 0, 2],
                        help="tiles a block of the next product to prefetch; 0: no prefetch")
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results_prefetch_chain.json")
    args = parser.parse_args(argv)
    for s in args.steps:
        if s < 0:
            parser.error(f"--steps {s}: tile counts are 0 (no prefetch) or more")
    if args.layers < 1:
        parser.error(f"--layers {args.layers}: at least 1")
    rows = []
    for kind in args.kinds:
        keys = jax.random.split(jax.random.PRNGKey(0), args.layers * len(LAYER_SHAPES))
        weights = [[random_weights(kind, k, n, keys[li * len(LAYER_SHAPES) + pi])
                    for pi, (k, n) in enumerate(LAYER_SHAPES)] for li in range(args.layers)]
        layer_bytes = sum(weight_bytes(kind, k, n) for k, n in LAYER_SHAPES)
        x = jax.random.normal(jax.random.PRNGKey(1), (args.m, LAYER_SHAPES[0][0]), jnp.bfloat16)
        first = None
        for steps in args.steps:
            f = chain_fn(kind, args.m, steps)
            row = dict(kind=kind, m=args.m, steps=steps, layers=args.layers,
                       **timed(f, x, weights, args.iters, args.repeats))
            out = jax.device_get(f(x, weights)).astype("float32")
            first = out if first is None else first
            row["max_abs_diff_vs_first"] = float(abs(out - first).max())  # a prefetch changes no value
            row["us_per_layer"] = row["us"] / args.layers
            row["tb_s"] = layer_bytes / (row["us_per_layer"] * 1e-6) / 1e12
            row["fraction"] = row["tb_s"] * 1e12 / COPY_BANDWIDTH
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__,
                               device=jax.devices()[0].device_kind, rows=rows), f, indent=1)
        del weights
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
