"""Weight-only int8 matmul through XLA (jaxllm.ops.einsum on a QuantizedWeight) against bf16, at
decode shapes: x [M, 4096] @ W [4096, 14336] for M = 1..64. XLA fuses the int8 -> bf16 convert into
its gemm fusion when it can; this measures whether it does, before writing a Pallas kernel.

    PYTHONPATH=. python -m benchmarks.quant_matmul --out results_quant_matmul.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from benchmarks.attention import time_ms
from benchmarks.shapes import COPY_BANDWIDTH
from jaxllm.ops import einsum
from jaxllm.quantization import quantize_int8

K, N = 4096, 14336
COPIES = 4  # weights rotated so that no call finds its weight in the 50 MB L2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--out", default="results_quant_matmul.json")
    args = parser.parse_args(argv)
    keys = jax.random.split(jax.random.PRNGKey(0), COPIES)
    dense = [jax.random.normal(k, (K, N), jnp.bfloat16) for k in keys]
    quant = [quantize_int8(w, (0,)) for w in dense]
    rows = []
    for m in args.m:
        x = jax.random.normal(jax.random.PRNGKey(m), (m, K), jnp.bfloat16)
        f = jax.jit(lambda x, ws: [einsum("md,dn->mn", x, w) for w in ws])
        row = dict(m=m)
        for name, ws, nbytes in (("bf16", dense, K * N * 2), ("int8", quant, K * N + N * 4)):
            ms = time_ms(f, x, ws, iters=10) / COPIES
            row[name] = dict(ms=ms, tb_s=nbytes / ms / 1e9, fraction=nbytes / (ms / 1e3) / COPY_BANDWIDTH)
        row["int8_speedup"] = row["bf16"]["ms"] / row["int8"]["ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    hlo = jax.jit(lambda x, w: einsum("md,dn->mn", x, w)).lower(x[:1], quant[0]).compile().as_text()
    fused = [line.strip()[:200] for line in hlo.splitlines() if "fusion" in line and "s8" in line][:6]
    with open(args.out, "w") as f:
        json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, shape=[K, N], rows=rows,
                       int8_fusions=fused), f, indent=1)
    print("\n".join(fused))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
