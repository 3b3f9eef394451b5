"""Issue 5's serving table in one GPU call: each engine_throughput / prefix_reuse run in its own
process (one run's device memory does not crowd the next), under one deadline, into one JSON. Each
run's output is echoed as it comes, prefixed by the run's name, so a run cut short by the deadline
still shows how far it got (warm-up lines included).

    PYTHONPATH=. python -m benchmarks.serving --deadline-s 540 --out benchmarks/results_serving_h200.json
    PYTHONPATH=. python -m benchmarks.serving --runs engine_128 static_128 --deadline-s 300 --out s.json
    PYTHONPATH=. python -m benchmarks.serving --small --out /tmp/serving.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

_SEQS_256 = ["--max-num-seqs", "256", "--gpu-memory-utilization", "0.85"]
RUNS = {
    "prefix_reuse": ["benchmarks.prefix_reuse"],
    "engine_128": ["benchmarks.engine_throughput", "--workloads", "128x128", "--num-prompts", "1024",
                   "--backends", "engine", *_SEQS_256],
    "engine_128_budget_2048": ["benchmarks.engine_throughput", "--workloads", "128x128", "--num-prompts", "1024",
                               "--backends", "engine", "--max-num-batched-tokens", "2048", *_SEQS_256],
    "static_128": ["benchmarks.engine_throughput", "--workloads", "128x128", "--num-prompts", "1024",
                   "--backends", "llm", "llm-inflight", "--max-num-seqs", "256"],
    "engine_128_fp8": ["benchmarks.engine_throughput", "--workloads", "128x128", "--num-prompts", "1024",
                       "--backends", "engine", "--quantization", "fp8", *_SEQS_256],
    "engine_128_fp8_512": ["benchmarks.engine_throughput", "--workloads", "128x128", "--num-prompts", "2048",
                           "--backends", "engine", "--quantization", "fp8", "--max-num-seqs", "512",
                           "--gpu-memory-utilization", "0.85"],
    "engine_1000_fp8": ["benchmarks.engine_throughput", "--workloads", "1000x1000", "--num-prompts", "256",
                        "--backends", "engine", "--quantization", "fp8", *_SEQS_256],
    "engine_1000": ["benchmarks.engine_throughput", "--workloads", "1000x1000", "--num-prompts", "256",
                    "--backends", "engine", *_SEQS_256],
    "static_1000": ["benchmarks.engine_throughput", "--workloads", "1000x1000", "--num-prompts", "256",
                    "--backends", "llm", "--max-num-seqs", "256"],
}
SMALL = {"prefix_reuse": ["--small"], "engine_throughput": ["--small", "--workloads", "24x6", "--num-prompts", "6",
                                                            "--max-num-seqs", "4"]}


def _command(name: str, small: bool) -> list[str]:
    module, *args = RUNS[name]
    if small:  # the tiny model, and sizes that replace the run's own
        args = SMALL[module.split(".")[1]] + [a for a in args if a in ("--backends", "engine", "llm", "llm-inflight")]
    return [sys.executable, "-m", module, *args]


def run_streaming(cmd: list[str], timeout: float, prefix: str = "") -> tuple[int | None, str]:
    """Runs `cmd`, echoing each line of its stdout as it comes (so a run cut short still shows how far
    it got); returns (exit code, or None if killed at `timeout` seconds; the end of its stderr)."""
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                                               text=True) as proc:
        def echo():
            for line in proc.stdout:
                print(prefix + line, end="", flush=True)

        lines = threading.Thread(target=echo)
        lines.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        lines.join()
        err.seek(0)
        return code, err.read()[-20000:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--deadline-s", type=float, default=540.0, help="for all runs together")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default="results_serving.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = dict(date=time.strftime("%Y-%m-%d"), runs={})
    for name in args.runs:
        left = args.deadline_s - (time.perf_counter() - start)
        if left < 30:
            result["runs"][name] = dict(skipped=f"{left:.0f} s left of the deadline")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.json")
            cmd = _command(name, args.small) + ["--out", out]
            t0 = time.perf_counter()
            code, err = run_streaming(cmd, left, prefix=f"  [{name}] ")
            if code is None:
                row = json.load(open(out)) if os.path.exists(out) else {}
                row.update(timed_out_after_s=left, stderr_tail=err[-3000:])
            else:
                row = json.load(open(out)) if code == 0 else dict(error=err[-3000:])
            row.update(command=" ".join(cmd[1:-2]), wall_s=time.perf_counter() - t0)
        result["runs"][name] = row
        print(f"{name}: {row['wall_s']:.0f} s, " + ", ".join(
            f"{r.get('backend')} {r.get('output_tokens_per_s', 0):,.0f} tok/s" for r in row.get("rows", [])
            if "output_tokens_per_s" in r) + (f" ratio {row['ttft_mean_ratio']:.1f}x" if "ttft_mean_ratio" in row else "")
            + (" ERROR" if "error" in row else ""), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
