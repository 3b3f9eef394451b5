"""Held-out perplexity of the demo model beside a unigram baseline on the same tokens.

    python scripts/eval_demo_model.py [--model DIR] [--quantization int8] [--out result.json]

The held-out files are the ones the model's `training.json` lists, read from this interpreter's
standard library (the split is by a hash of each file's relative path, so the same Python version
gives the same files). The unigram model is fitted on the train files' tokens (add-one smoothing).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_model import encode_documents, split_corpus  # noqa: E402

from jaxllm import LLM  # noqa: E402
from jaxllm.default_model import bundled_model_dir  # noqa: E402
from jaxllm.evaluate import perplexity  # noqa: E402


def unigram_nll(train_ids: np.ndarray, texts_ids: list[list[int]], vocab_size: int) -> tuple[float, int]:
    """Summed NLL of every token after each text's first under add-one-smoothed unigram counts."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    scored = np.concatenate([np.asarray(ids[1:]) for ids in texts_ids])
    return float(-logp[scored].sum()), int(scored.size)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: the bundled demo model")
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None, help="e.g. int8 (weight-only)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    model_dir = args.model or bundled_model_dir()
    training = json.loads((model_dir / "training.json").read_text())
    percent = training["args"]["heldout_percent"]
    train_files, heldout_files = split_corpus(args.stdlib, percent, training["args"].get("max_files"))
    listed = set(training["heldout_files"])
    found = {f.relative_to(args.stdlib).as_posix() for f in heldout_files}
    if found != listed:
        print(f"note: this Python's held-out split differs from training's ({len(found & listed)} of "
              f"{len(listed)} files in common); scoring this machine's held-out files", file=sys.stderr)

    llm = LLM(model_dir, dtype=args.dtype, max_model_len=args.window, progress=False,
              quantization=args.quantization)
    texts = [f.read_text(encoding="utf-8") for f in heldout_files]
    model = perplexity(llm, texts, window=args.window, stride=args.stride)

    tokenizer = llm.get_tokenizer()
    train_ids = encode_documents(tokenizer, [f.read_text(encoding="utf-8") for f in train_files])
    nll, n = unigram_nll(train_ids, [tokenizer.encode(t) for t in texts], llm.config.vocab_size)
    assert n == model.num_tokens, (n, model.num_tokens)
    result = {
        "model": str(model_dir), "python_stdlib": str(args.stdlib), "heldout_files": len(texts),
        "tokens": model.num_tokens, "window": args.window, "stride": args.stride, "dtype": llm.config.dtype,
        "model_perplexity": model.perplexity, "unigram_perplexity": math.exp(nll / n),
        "model_tokens_per_s": model.tokens_per_s,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
