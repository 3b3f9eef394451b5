"""Batch-1 decode and 2048-token prefill of the 8B shape per quantization method, bf16 first, one
process, same random weights (Pallas attention kernels on).

A method is "none" or one of `jaxllm.quantization.METHODS` needing no calibration (int8, int4, fp8,
nvfp4, mxfp4). One named with a "/nmajor" suffix (int8/nmajor, int4/nmajor, nvfp4/nmajor) keeps the
weights in their stored [K, N] layout instead of the K-major kernels' one, so its products run
through XLA (until the eighth session they ran in N-major Mosaic GPU kernels, since removed: the
K-major ones replaced them; fp4 there means dequantizing before each product).

    PYTHONPATH=. python -m benchmarks.quant_decode --methods none int8 int4 int8/nmajor --out results.json
    PYTHONPATH=. python -m benchmarks.quant_decode --methods none nvfp4 mxfp4 nvfp4/nmajor --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from unittest import mock

import jax

from benchmarks import decode
from benchmarks.shapes import llama3_8b
from jaxllm.checkpoint import random_params
from jaxllm.sharding import ParallelConfig, make_mesh


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["none", "fp8", "int4"])
    parser.add_argument("--out", default="results_quant_decode.json")
    args = parser.parse_args(argv)
    from jaxllm.quantization import METHODS
    for method in args.methods:
        name, _, layout = method.partition("/")
        if name != "none" and name not in METHODS:
            parser.error(f"--methods {method!r}: choose none or one of {sorted(METHODS)}")
        if layout not in ("", "nmajor"):
            parser.error(f"--methods {method!r}: the only suffix is /nmajor")
    variants = []
    for method in args.methods:
        name, _, layout = method.partition("/")
        keep = [mock.patch("jaxllm.llm._in_kernel_layout", lambda p: p)] if layout == "nmajor" else []
        variants.append((f"{method:6s}", None if name == "none" else name, keep, dict(method=method)))
    ab_rows(variants, args.out)
    return 0


def ab_rows(variants, out: str) -> list[dict]:
    """`batch1_row`s of the 8B shape in one process, same random weights. Each variant is (label,
    method, patches, fields): its row runs under the context managers `patches` and gets `fields`;
    rows are printed, and the JSON rewritten, as they come."""
    config = llama3_8b()
    params = random_params(config, make_mesh(ParallelConfig(1)))
    rows = []
    for label, method, patches, fields in variants:
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            row = batch1_row(config, params, method)
        row.update(fields)
        rows.append(row)
        print(f"{label} decode {row['decode_tokens_per_s']:7.1f} tok/s ({row['ms_per_step']:.3f} ms/step, "
              f"{row['weight_bytes'] / 1e9:.2f} GB) prefill 2048 {row['prefill_s'] * 1e3:.1f} ms "
              f"compile {row['compile_and_first_run_s']:.0f} s tokens {row['greedy_tokens_digest']}", flush=True)
        write_rows(out, rows)
    return rows


def batch1_row(config, params, quantization: str | None) -> dict:
    """One batch-1 decode after a 2048-token prefill, its greedy tokens kept as a digest (variants of
    one method must agree). JAX's caches are cleared first: a variant patched in must not reuse the
    last one's compiled step (the kernel plans are fixed when a step is traced)."""
    jax.clear_caches()
    row = decode.run(batch=1, config=config, params=params, layers="unrolled", prefill_len=2048, repeats=1,
                     quantization=quantization)
    tokens = row.pop("greedy_tokens")
    row["greedy_tokens_digest"] = hashlib.sha256(json.dumps(tokens, default=int).encode()).hexdigest()[:16]
    return row


def write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
