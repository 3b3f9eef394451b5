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
    from benchmarks import decode

    result["device"] = jax.devices()[0].device_kind
    result["jaxllm"] = decode.run(**(decode.SMALL if args.small else {}))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
