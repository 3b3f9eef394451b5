"""Is the int4 path bitwise reproducible on the GPU? The K-major w4a16 kernel at several stage
counts, each run three times on the same inputs (8B layer shapes, M = 1 and 13; the first count
also rebuilt after clearing JAX's caches, as another process builds it), and XLA's int4 prefill product (dequantize, then dot: 128 tokens) compiled twice. Written after the nineteenth
session's batch-1 int4 decodes gave different greedy tokens for 8 and 4 stages in one process, and
for the same 8-stage code in three processes, while int8's tokens have not changed in two sessions.

    PYTHONPATH=. python -m benchmarks.int4_determinism --out results.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernel_weights import KMajorInt4Weight, xla_einsum
from pallas_kernels.quant_matmul_kmajor import KMajorConfig, int4_kmajor, w4a16_kmajor

SHAPES = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))  # the 8B layer's four products


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stages", type=int, nargs="+", default=[8, 4, 3])
    parser.add_argument("--out", default="results_int4_determinism.json")
    args = parser.parse_args(argv)
    if any(not 1 <= s <= 8 for s in args.stages):
        parser.error(f"--stages {args.stages}: each must be 1 to 8")
    out, rng = {}, np.random.default_rng(0)
    for k, n in SHAPES:
        packed = jnp.asarray(rng.integers(0, 256, (k // 2, n)), jnp.uint8)
        scale = jnp.asarray(rng.uniform(1e-2, 1e-1, (k // 128, n)), jnp.float32)
        zero = jnp.asarray(rng.integers(0, 16, (k // 128, n)), jnp.uint8)
        q_t = int4_kmajor(packed)
        for m in (1, 13):
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            ys = {}
            for st in args.stages:
                f = jax.jit(lambda x, q, s, z, st=st: w4a16_kmajor(x, q, s, z, config=KMajorConfig(num_stages=st)))
                ys[st] = [np.asarray(f(x, q_t, scale, zero).astype(jnp.float32)) for _ in range(3)]
            first = ys[args.stages[0]][0]
            jax.clear_caches()  # the first variant built again, as another process would build it
            st = args.stages[0]
            rebuilt = jax.jit(lambda x, q, s, z: w4a16_kmajor(x, q, s, z, config=KMajorConfig(num_stages=st)))
            rebuilt = np.asarray(rebuilt(x, q_t, scale, zero).astype(jnp.float32))
            row = {f"stages_{st}_repeats_equal": all(np.array_equal(ys[st][0], y) for y in ys[st]) for st in ys}
            row.update({f"stages_{st}_equals_first": bool(np.array_equal(ys[st][0], first)) for st in ys})
            row.update({f"stages_{st}_max_abs_diff": float(np.max(np.abs(ys[st][0] - first))) for st in ys})
            row[f"stages_{st}_equal_after_recompile"] = bool(np.array_equal(rebuilt, first))
            out[f"{k}x{n}_m{m}"] = row
            print(f"{k}x{n} m={m}", row, flush=True)
        w = KMajorInt4Weight(q_t, scale, zero, None, (k, n))
        x = jnp.asarray(rng.standard_normal((128, k)), jnp.bfloat16)
        res = []
        for _ in range(2):
            jax.clear_caches()
            res.append(np.asarray(jax.jit(lambda x, w: xla_einsum("mk,kn->mn", x, w))(x, w).astype(jnp.float32)))
        out[f"{k}x{n}_xla_prefill_equal_after_recompile"] = bool(np.array_equal(*res))
        print(f"{k}x{n} XLA int4 product equal after recompiling:", out[f"{k}x{n}_xla_prefill_equal_after_recompile"])
    with open(args.out, "w") as f:
        json.dump(dict(jax=jax.__version__, rows=out), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
