"""Held-out perplexity of the bundled model for each weight quantization method, one run.

    python scripts/eval_quantization.py [--out result.json]

The held-out files are those of `scripts/eval_demo_model.py` (this interpreter's standard library,
split by path hash); AWQ and GPTQ calibrate on rows of the *train* files, so nothing scored is calibrated on.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_model import split_corpus  # noqa: E402

from jaxllm import LLM  # noqa: E402
from jaxllm.calibration import awq_scales, gptq_params, smoothquant_scales  # noqa: E402
from jaxllm.default_model import bundled_model_dir  # noqa: E402
from jaxllm.evaluate import perplexity  # noqa: E402
from jaxllm.quantization import quantize_params  # noqa: E402
from models.llama import INPUT_AXES  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--calib-rows", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    model_dir = bundled_model_dir()
    training = json.loads((model_dir / "training.json").read_text())
    train_files, heldout_files = split_corpus(args.stdlib, training["args"]["heldout_percent"],
                                              training["args"].get("max_files"))
    llm = LLM(model_dir, dtype=args.dtype, max_model_len=args.window, progress=False)
    texts = [f.read_text(encoding="utf-8") for f in heldout_files]
    tok = llm.get_tokenizer()
    rows = []
    for f in train_files[::7]:  # spread over the train split
        ids = tok.encode(f.read_text(encoding="utf-8"))
        rows += [ids[i:i + 512] for i in range(0, len(ids), 512) if len(ids[i:i + 512]) >= 64]
        if len(rows) >= args.calib_rows:
            break
    rows = rows[:args.calib_rows]
    dense = llm.params
    start = time.perf_counter()
    scales, report = awq_scales(dense, llm.config, rows, INPUT_AXES)
    calib_s = time.perf_counter() - start
    results = {}
    start = time.perf_counter()
    gptq = gptq_params(dense, llm.config, rows, INPUT_AXES)
    gptq_s = time.perf_counter() - start
    sq_scales, sq_report = smoothquant_scales(dense, llm.config, rows, INPUT_AXES)
    methods = (("bf16", None), ("int8", {}), ("fp8", {}), ("smoothquant", dict(input_scales=sq_scales)),
               ("int4", {}), ("awq", dict(input_scales=scales)), ("gptq", None))
    for name, kw in methods:
        if name == "gptq":
            llm.params = gptq
        else:
            llm.params = dense if kw is None else quantize_params(dense, INPUT_AXES, name, **kw)
        r = perplexity(llm, texts, window=args.window, stride=args.stride)
        results[name] = dict(perplexity=r.perplexity, tokens=r.num_tokens)
        print(name, f"{r.perplexity:.4f}", flush=True)
    base = results["bf16"]["perplexity"]
    for v in results.values():
        v["vs_bf16_percent"] = 100 * (v["perplexity"] / base - 1)
    out = dict(date=time.strftime("%Y-%m-%d"), python_stdlib=str(args.stdlib), heldout_files=len(texts),
               window=args.window, stride=args.stride, dtype=args.dtype, calibration_rows=len(rows),
               calibration_tokens=sum(map(len, rows)), awq_search_s=calib_s, gptq_s=gptq_s,
               mean_awq_alpha=sum(r["alpha"] for r in report.values()) / len(report),
               mean_smoothquant_alpha=sum(r["alpha"] for r in sq_report.values()) / len(sq_report),
               results=results)
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
