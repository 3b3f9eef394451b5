"""Decode sweeps on the 8B shape, unrolled layers: greedy vs sampled, XLA flag variants (one process
each) and batch sizes.

    PYTHONPATH=. python -m benchmarks.sweep --out sweep.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

FLAG_VARIANTS = {
    "default": "",
    "no_command_buffers": "--xla_gpu_enable_command_buffer=",
    "command_buffers_with_while": "--xla_gpu_enable_command_buffer=+FUSION,+CUBLAS,+CUBLASLT,+CUSTOM_CALL,"
                                  "+CUDNN,+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1",
}
BATCHES = (1, 8, 32, 64)

SAMPLING = """
import json
from benchmarks import decode
from benchmarks.shapes import llama3_8b
from jaxllm.checkpoint import random_params
from jaxllm.sharding import ParallelConfig, make_mesh
config = llama3_8b()
params = random_params(config, make_mesh(ParallelConfig(1)))
out = {}
for batch in (1, 64):
    for temperature in (0.0, 0.7):
        r = decode.run(batch=batch, prefill_len=None, config=config, params=params, layers="unrolled",
                       temperature=temperature)
        r.pop("greedy_tokens")
        out[f"batch{batch}_T{temperature}"] = r
print("RESULT " + json.dumps(out))
"""

CHILD = """
import json, sys
from benchmarks import decode
from benchmarks.shapes import llama3_8b
from jaxllm.checkpoint import random_params
from jaxllm.sharding import ParallelConfig, make_mesh
config = llama3_8b()
params = random_params(config, make_mesh(ParallelConfig(1)))
out = {}
for batch in json.loads(sys.argv[1]):
    r = decode.run(batch=batch, prefill_len=None, config=config, params=params, layers="unrolled", repeats=3)
    r["first_tokens"] = r.pop("greedy_tokens")[:64]
    out[batch] = r
print("RESULT " + json.dumps(out))
"""


def child(flags: str, batches, script: str = CHILD) -> dict:
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
           "JAXLLM_COMPILATION_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(list(batches))], capture_output=True,
                          text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": proc.stderr[-3000:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="sweep.json")
    parser.add_argument("--only", choices=("flags", "sampling"), default=None)
    args = parser.parse_args(argv)
    result = {"date": datetime.date.today().isoformat(), "flags": FLAG_VARIANTS, "runs": {}}
    if args.only != "flags":
        result["sampling"] = child("", (), SAMPLING)
        print("sampling", json.dumps({k: round(v["decode_tokens_per_s"], 1) for k, v in result["sampling"].items()}
                                     if "error" not in result["sampling"] else result["sampling"]), flush=True)
    for name, flags in ({} if args.only == "sampling" else FLAG_VARIANTS).items():
        batches = BATCHES if name == "default" else (1,)
        result["runs"][name] = child(flags, batches)
        print(name, json.dumps({b: round(r["decode_tokens_per_s"], 1) for b, r in result["runs"][name].items()}
                               if "error" not in result["runs"][name] else result["runs"][name]), flush=True)
    import jax

    result["jax"], result["device"] = jax.__version__, jax.devices()[0].device_kind
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
