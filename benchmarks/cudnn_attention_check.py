"""The XLA attention path's two ways on a GPU, cuDNN's fused attention against XLA's ops, on random
bf16 inputs at the bundled model's head shape (4 KV heads, 2 queries each, head_dim 32): max abs
difference of each from a float32 evaluation, for one query (decode), five (n-gram verify) and 62
(a Medusa tree), with a causal-style mask. Also whether cuDNN's call is in the lowered program.

    PYTHONPATH=. python -m benchmarks.cudnn_attention_check --out results_cudnn_attention_check.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.ops import attention

CASES = ((1, 576), (5, 1029), (62, 638))  # (queries, keys)


def check(t: int, s: int) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(t), 3)
    q = jax.random.normal(keys[0], (1, t, 4, 2, 32), jnp.bfloat16)
    k, v = (jax.random.normal(x, (1, s, 4, 32), jnp.bfloat16) for x in keys[1:])
    visible = jnp.arange(s)[None, None, :] < (s - 100 + jnp.arange(t))[None, :, None]
    attend = jax.jit(lambda q, k, v, m: attention._attend(q, k, v, m, 32 ** -0.5))
    exact = np.asarray(attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), visible))
    saved = attention.CUDNN_ATTENTION, attention.CUDNN_MIN_QUERIES
    out = {}
    try:
        for name, on in (("cudnn", True), ("xla", False)):
            attention.CUDNN_ATTENTION, attention.CUDNN_MIN_QUERIES = on, 1
            jax.clear_caches()
            got = np.asarray(attend(q, k, v, visible), np.float32)
            out[f"{name}_max_abs_err_vs_f32"] = float(np.abs(got - exact).max())
            out[f"{name}_lowered_with_cudnn"] = "cudnn" in attend.lower(q, k, v, visible).as_text().lower()
    finally:
        attention.CUDNN_ATTENTION, attention.CUDNN_MIN_QUERIES = saved
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results_cudnn_attention_check.json")
    args = parser.parse_args(argv)
    results = {f"T{t}_S{s}": check(t, s) for t, s in CASES}
    for name, row in results.items():
        print(name, row, flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(jax=jax.__version__, device=jax.devices()[0].device_kind, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
