"""A batch-1 decode step's weight products in a chain, through the K-major kernels: a proxy for
the products' share of a decode step that needs no model (int8: 96 us a layer here, 94.5 us of
kernels a layer in the decode step's profile, products 75 of them).

Llama-3-8B's four products a layer (qkv 4096x6144, o 4096x4096, gate/up 4096x28672, down 14336x4096)
over `--layers` layers of distinct random weights, each product's input made from the last one's
output (sliced to its K and divided by its RMS: two small XLA kernels between products, as in a
real step). `--configs` sets the kernels' KMajorConfig (block_n:num_stages:num_splits, 0 for the
default), run in the order given, so drift shows between repeats of one config; each row also gives
its output's largest difference from the first config's (configs compute the same values: 0).
(Until 3a326d4 / 6e64a82 this chain measured two reverted tries: the L2 prefetch of the next
weight and early weight loads under programmatic dependent launch.)

    PYTHONPATH=. python -m benchmarks.product_chain --kinds int8 int4 --configs default 256:6:0 --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.quant_matmul_kernels import LAYER_SHAPES, kernel, weight_bytes
from benchmarks.shapes import COPY_BANDWIDTH
from pallas_kernels.quant_matmul_kmajor import MAX_TOKENS, KMajorConfig

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


def parse_config(text: str) -> KMajorConfig | None:
    """'default' or block_n:num_stages:num_splits[:block_k] (0: the default) as a KMajorConfig."""
    if text == "default":
        return None
    parts = text.split(":")
    if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts):
        raise ValueError(f"{text!r} is not 'default' or block_n:num_stages:num_splits[:block_k]")
    bn, st, sp, bk = (int(p) or None for p in parts + ["0"] * (4 - len(parts)))
    return KMajorConfig(block_n=bn, block_k=bk, num_stages=st, num_splits=sp)


def chain_fn(kind: str, config: KMajorConfig | None):
    """f(x, weights) running every product once in order; weights: [layer][product] arrays."""
    product = kernel(kind, config)

    def f(x, weights):
        shapes = [s for _ in weights for s in LAYER_SHAPES]
        flat = [w for layer in weights for w in layer]
        for i, w in enumerate(flat):
            nk = shapes[(i + 1) % len(flat)][0]
            y = product(x, w)[:, :nk].astype(jnp.float32)  # the next product's input
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
    parser.add_argument("--configs", nargs="+", default=["default", "default"],
                        help="'default' or block_n:num_stages:num_splits (0 = default), in order")
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results_product_chain.json")
    args = parser.parse_args(argv)
    if not 1 <= args.m <= MAX_TOKENS:
        parser.error(f"--m {args.m}: the kernels take 1 to {MAX_TOKENS} tokens")
    for name in ("layers", "iters", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: at least 1")
    try:
        configs = [(c, parse_config(c)) for c in args.configs]
    except ValueError as e:
        parser.error(f"--configs: {e}")
    rows = []
    for kind in args.kinds:
        keys = jax.random.split(jax.random.PRNGKey(0), args.layers * len(LAYER_SHAPES))
        weights = [[random_weights(kind, k, n, keys[li * len(LAYER_SHAPES) + pi])
                    for pi, (k, n) in enumerate(LAYER_SHAPES)] for li in range(args.layers)]
        layer_bytes = sum(weight_bytes(kind, k, n) for k, n in LAYER_SHAPES)
        x = jax.random.normal(jax.random.PRNGKey(1), (args.m, LAYER_SHAPES[0][0]), jnp.bfloat16)
        first = None
        for name, config in configs:
            f = chain_fn(kind, config)
            row = dict(kind=kind, m=args.m, config=name, layers=args.layers,
                       **timed(f, x, weights, args.iters, args.repeats))
            out = np.asarray(jax.device_get(f(x, weights)), np.float32)
            first = out if first is None else first
            row["max_abs_diff_vs_first"] = float(np.abs(out - first).max())
            row["us_per_layer"] = row["us"] / args.layers
            row["tb_s"] = layer_bytes / (row["us_per_layer"] * 1e-6) / 1e12
            row["fraction"] = row["tb_s"] * 1e12 / COPY_BANDWIDTH
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as fh:
                json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__,
                               device=jax.devices()[0].device_kind, rows=rows), fh, indent=1)
        del weights
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
