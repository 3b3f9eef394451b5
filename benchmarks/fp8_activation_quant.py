"""The fp8 prefill's per-token activation quantization of the down projection's input, alone: from the
gate/up product [T, 2, F] (bf16) to e4m3 codes of silu(gate) * up and one scale per token (issue 6).

Variants (each one jitted function; GPU kernel time per call from jax.profiler over `--iters` calls
after a warm-up, with the bytes it must move at least, read once and written once, as TB/s):
- "current": `quantize_tokens(silu(g) * u)` as the model writes it (XLA recomputes the product in its
  row-max fusion and again in its convert fusion);
- "blocked max": the row maximum taken over [T, F/128, 128] blocks, then over the blocks;
- "hidden kept": the product rounded to bf16 once and kept (an optimization barrier), then quantized;
- "divided by ones": as the K-major fp8 weights did before the fifteenth session, the product
  divided by an all-ones input scale (an argument, so XLA cannot fold it) before the codes;
- "bf16 max": the row maximum of |product| taken in bf16 (exact: a maximum rounds nothing), then the
  codes from the float32 product as before.

    PYTHONPATH=. python -m benchmarks.fp8_activation_quant --out results_fp8_activation_quant.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from benchmarks.profile_decode import gpu_events, per_name, traced
from jaxllm.quantization import quantize_tokens


def current(gate_up, ones):
    hidden = jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]
    return quantize_tokens(hidden, "fp8")


def blocked_max(gate_up, ones):
    hidden = (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]).astype(jnp.float32)
    t, f = hidden.shape
    amax = jnp.max(jnp.max(jnp.abs(hidden).reshape(t, f // 128, 128), axis=2), axis=1)
    sx = jnp.where(amax > 0, amax / 448.0, 1.0)
    return jnp.clip(hidden / sx[:, None], -448.0, 448.0).astype(jnp.float8_e4m3fn), sx


def hidden_kept(gate_up, ones):
    hidden = jax.lax.optimization_barrier(jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1])
    return quantize_tokens(hidden, "fp8")


def bf16_max(gate_up, ones):
    hidden = jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]
    amax = jnp.max(jnp.abs(hidden), axis=-1).astype(jnp.float32)
    sx = jnp.where(amax > 0, amax / 448.0, 1.0)
    return jnp.clip(hidden.astype(jnp.float32) / sx[:, None], -448.0, 448.0).astype(jnp.float8_e4m3fn), sx


def divided(gate_up, ones):
    hidden = jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]
    return quantize_tokens(hidden.astype(jnp.float32) / ones[None, :], "fp8")


VARIANTS = {"current": current, "divided by ones": divided, "blocked max": blocked_max, "hidden kept": hidden_kept,
            "bf16 max": bf16_max}


def timed(fn, x, ones, iters: int) -> tuple[float, dict[str, float]]:
    """Seconds per call: GPU kernel time from the profiler (wall time where no GPU is traced), and
    microseconds per call by kernel name."""
    jax.block_until_ready(fn(x, ones))

    def run():
        for _ in range(iters):
            jax.block_until_ready(fn(x, ones))

    trace, wall = traced(run)
    wall /= iters
    events = gpu_events(trace)
    names = {n: t / iters for n, (t, _) in per_name(events).items()}
    return (sum(names.values()) / 1e6 if events else wall), names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default="results_fp8_activation_quant.json")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.ffn < 128 or args.ffn % 128 or args.iters < 1:
        parser.error("--tokens and --iters must be at least 1, --ffn a positive multiple of 128 "
                     f"(got {args.tokens}, {args.ffn}, {args.iters})")
    t, f = args.tokens, args.ffn
    x = jax.random.normal(jax.random.key(0), (t, 2, f), jnp.float32).astype(jnp.bfloat16)
    least = t * 2 * f * 2 + t * f + t * 4  # read gate/up once, write codes and scales
    ones = jnp.ones((f,), jnp.float32)
    ref_codes, ref_scale = jax.jit(current)(x, ones)
    rows = []
    for name, fn in VARIANTS.items():
        jitted = jax.jit(fn)
        codes, scale = jitted(x, ones)
        same = bool(jnp.all(codes.astype(jnp.float32) == ref_codes.astype(jnp.float32))) and bool(
            jnp.all(scale == ref_scale))
        seconds, kernels = timed(jitted, x, ones, args.iters)
        rows.append(dict(variant=name, us=1e6 * seconds, tb_s=least / seconds / 1e12, same_as_current=same,
                         kernels_us=kernels))
        print(f"{name:12s} {1e6 * seconds:8.1f} us  {least / seconds / 1e12:5.2f} TB/s  same {same}  "
              + ", ".join(f"{n[:40]} {t:.1f}" for n, t in kernels.items()), flush=True)
    with open(args.out, "w") as fh:
        json.dump(dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, device=jax.devices()[0].device_kind,
                       tokens=t, ffn=f, least_bytes=least, method=__doc__, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
