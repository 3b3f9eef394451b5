"""How much faster a decode-shaped bf16 gemm runs when its weight is already in L2.

Question behind it (issue 4): the attention kernel and the small XLA kernels of a decode step leave
DRAM idle for ~16 us a layer. If a kernel that runs in those gaps pulled the next projection's
weight into the 50 MB L2, how much of the gemm's time would go? Per shape and token count, three
jitted loops over `--copies` weight copies (so no iteration finds the previous one's weight in L2):

- cold: x @ W_i;
- read: max(W_i) (an XLA reduction that streams W_i through L2 once);
- read_then_gemm: max(W_i), then x @ W_i on the same weight.

warm gemm = (read_then_gemm - read) / copies; cold gemm = cold / copies. Each time: the median of
`--repeats` runs of 10 calls queued back to back.

    PYTHONPATH=. python -m benchmarks.l2_reuse --out results_l2_reuse.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.shapes import COPY_BANDWIDTH


def _timed(fn, *args, repeats: int, iters: int = 10) -> float:
    """Seconds a call, from `iters` calls queued back to back (so dispatch hides behind the GPU)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [fn(*args) for _ in range(iters)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def measure(m: int, k: int, n: int, copies: int, repeats: int) -> dict:
    keys = jax.random.split(jax.random.key(0), copies + 1)
    ws = [jax.random.normal(kk, (k, n), jnp.bfloat16) for kk in keys[1:]]
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)

    @jax.jit
    def cold(x, ws):
        return [x @ w for w in ws]

    @jax.jit
    def read(ws):
        return [jnp.max(w) for w in ws]

    @jax.jit
    def read_then_gemm(x, ws):
        out = []
        for w in ws:
            top = jnp.max(w)
            out.append((x @ w, top))
        return out

    t_cold = _timed(cold, x, ws, repeats=repeats) / copies
    t_read = _timed(read, ws, repeats=repeats) / copies
    t_both = _timed(read_then_gemm, x, ws, repeats=repeats) / copies
    warm = t_both - t_read
    nbytes = k * n * 2
    return {"m": m, "k": k, "n": n, "copies": copies, "weight_mb": nbytes / 1e6,
            "cold_us": t_cold * 1e6, "read_us": t_read * 1e6, "read_then_gemm_us": t_both * 1e6,
            "warm_us": warm * 1e6, "cold_tb_s": nbytes / t_cold / 1e12, "warm_tb_s": nbytes / warm / 1e12,
            "warm_speedup": t_cold / warm, "cold_fraction_of_copy": nbytes / t_cold / COPY_BANDWIDTH}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x6144", "4096x1024"])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="results_l2_reuse.json")
    args = parser.parse_args(argv)
    rows = []
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        for m in args.m:
            row = measure(m, k, n, args.copies, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
              "device": jax.devices()[0].device_kind, "method": __doc__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
