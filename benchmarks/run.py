"""Entry point: `python -m benchmarks.run --suite decode [--out results.json]`."""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys

import jax

SUITES = ("decode",)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", choices=SUITES, default="decode")
    parser.add_argument("--out", default="benchmark.json")
    parser.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline")

    parser.add_argument("--small", action="store_true", help="a tiny shape, to smoke-test on CPU")
    args = parser.parse_args(argv)

    result = {"date": datetime.date.today().isoformat(), "jax": jax.__version__, "suite": args.suite}
    if not args.skip_hf:  # first, in its own process, so that jax has not taken the GPU memory yet
        proc = subprocess.run([sys.executable, "-m", "benchmarks.hf_baseline"], capture_output=True, text=True)
        result["hf_eager"] = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
    from benchmarks import decode, startup

    if not args.small:  # before this process takes the GPU's memory
        result["startup"] = {layers: startup.run(layers) for layers in ("scan", "unrolled")}
    result["device"] = jax.devices()[0].device_kind
    from benchmarks.shapes import llama3_8b
    from jaxllm.checkpoint import random_params
    from jaxllm.sharding import ParallelConfig, make_mesh

    kwargs = dict(decode.SMALL) if args.small else {}
    config = kwargs.pop("config", llama3_8b())
    params = random_params(config, make_mesh(ParallelConfig(1)))
    result["jaxllm"] = {layers: decode.run(config=config, params=params, layers=layers, **kwargs)
                        for layers in ("scan", "unrolled")}
    tokens = [result["jaxllm"][k].pop("greedy_tokens") for k in ("scan", "unrolled")]
    result["unrolled_equals_scan_greedy_tokens"] = tokens[0] == tokens[1]
    result["first_differing_token"] = next((i for i, (a, b) in enumerate(zip(*tokens)) if a != b), None)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
