"""Cold and warm start: process start to first generated token, twice, sharing one compile cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import time
start = time.perf_counter()
import json, sys
from benchmarks.shapes import llama3_8b
from jaxllm import LLM, SamplingParams
from jaxllm.checkpoint import random_params
from jaxllm.sharding import ParallelConfig, make_mesh
from models.llama import unstack_layers
config = llama3_8b()
mesh = make_mesh(ParallelConfig(1))
params = random_params(config, mesh)
if sys.argv[1] == "unrolled":
    params = unstack_layers(params)
llm = LLM.from_params(config, params, mesh, max_model_len=512)
ready = time.perf_counter()
llm.generate([{"prompt_token_ids": list(range(1, 129))}], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
first = time.perf_counter()
llm.generate([{"prompt_token_ids": list(range(1, 129))}], SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
print(json.dumps({"setup_s": ready - start, "first_token_s": first - start, "both_buckets_s": time.perf_counter() - start}))
"""


def run(layers: str = "scan") -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        out = {}
        for name in ("cold", "warm"):
            proc = subprocess.run([sys.executable, "-c", CHILD, layers], capture_output=True, text=True, env=env)
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
                "error": proc.stderr[-2000:]}
    return out
