"""Speculative decoding against plain decoding, same run: tokens/s, speedup, mean accepted length.

    PYTHONPATH=. python -m benchmarks.speculative --out results_speculative.json [--skip-8b]

Workloads: "rewrite" (a held-out stdlib file cut to 640 tokens: the bundled model holds 1024, then its first lines again, so
the continuation copies the input: where n-gram lookup should pay), "complete" (held-out files cut
after 256 tokens: Medusa's case), "random" (random prompts: nothing to find, the zero-acceptance
cost). Bundled model and the Llama-3-8B shape with random weights. Greedy, eos ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sysconfig
import time
from pathlib import Path

import jax
import numpy as np

from jaxllm import LLM, SamplingParams
from jaxllm.default_model import default_model_dir


def heldout_texts(model_dir: Path, limit: int) -> list[str]:
    """Held-out files the bundled model's training run lists, read from this Python's stdlib."""
    training = json.loads((model_dir / "training.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for rel in training["heldout_files"]:
        path = root / rel
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            if len(text) > 4000:
                texts.append(text)
        if len(texts) == limit:
            break
    return texts


def rewrite_prompts(tokenizer, texts, n_tokens=640, repeat=48):
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"][:n_tokens]
        out.append({"prompt_token_ids": ids + tokenizer("\n\n")["input_ids"] + ids[:repeat]})
    return out


def complete_prompts(tokenizer, texts, n_tokens=256):
    return [{"prompt_token_ids": tokenizer(t)["input_ids"][:n_tokens]} for t in texts]


def random_prompts(vocab, batch, n_tokens=128, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(0, vocab, n_tokens).tolist()} for _ in range(batch)]


def timed(llm: LLM, prompts, params, repeats: int) -> tuple[float, list]:
    llm.generate(prompts, params, use_tqdm=False)  # compile
    best, outs = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    return best, outs


def compare(name: str, plain: LLM, specs: dict[str, LLM], prompts, max_tokens: int, repeats: int,
            temperature: float = 0.0) -> list[dict]:
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=0)
    base_s, base = timed(plain, prompts, params, repeats)
    tokens = sum(len(o.outputs[0].token_ids) for o in base)
    rows = [dict(workload=name, method="plain", batch=len(prompts), seconds=base_s, tokens=tokens,
                 tokens_per_s=tokens / base_s, temperature=temperature)]
    print(f"{name:28s} plain          {tokens / base_s:9.1f} tok/s", flush=True)
    for method, llm in specs.items():
        s, outs = timed(llm, prompts, params, repeats)
        same = all(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(base, outs))
        st = [o.outputs[0].spec_decode for o in outs]
        st = [x for x in st if x is not None]
        mal = float(np.mean([x.mean_accepted_length for x in st])) if st else None
        per_pos = None
        if st:
            prop = np.sum([x.proposed_per_position for x in st], 0)
            acc = np.sum([x.accepted_per_position for x in st], 0)
            per_pos = (acc / np.maximum(prop, 1)).round(3).tolist()
        rows.append(dict(workload=name, method=method, batch=len(prompts), seconds=s, tokens=tokens,
                         tokens_per_s=tokens / s, speedup=base_s / s, greedy_tokens_equal_plain=same,
                         mean_accepted_length=mal, acceptance_rate_per_position=per_pos,
                         speculated=bool(st), temperature=temperature))
        print(f"{name:28s} {method:14s} {tokens / s:9.1f} tok/s  x{base_s / s:.2f}  accepted/step "
              f"{mal if mal is None else round(mal, 2)}  per position {per_pos}  equal {same}", flush=True)
    return rows


def bundled(args) -> list[dict]:
    model_dir = default_model_dir()
    texts = heldout_texts(model_dir, 16)
    kw = dict(progress=False, max_num_seqs=64)
    plain = LLM(**kw)
    tok = plain.tokenizer
    on = {"disable_by_batch_size": None}  # measured at every batch; "auto" would stop at 8 for this model
    ngram = {f"ngram k{k}": LLM(speculative_config={"method": "ngram", "num_speculative_tokens": k, **on}, **kw)
             for k in args.ngram_k}
    if args.ngram_always_verify:  # no "no proposal in any row" cond (a host round trip a step on GPUs)
        for k in args.ngram_k:
            llm = LLM(speculative_config={"method": "ngram", "num_speculative_tokens": k, **on}, **kw)
            llm.speculator.plan = dataclasses.replace(llm.speculator.plan, skip_when_empty=False)
            ngram[f"ngram k{k} always verify"] = llm
    medusa = {}
    heads = Path(args.medusa or model_dir / "medusa")
    if heads.is_dir():
        medusa["medusa"] = LLM(speculative_config={"method": "medusa", "model": str(heads), **on}, **kw)
    n = args.bundled_prompts
    rows = []
    rows += compare("bundled rewrite b1", plain, ngram, rewrite_prompts(tok, texts[:1]), 256, args.repeats)
    for i in range(n):
        rows += compare(f"bundled complete b1 #{i}", plain, {**ngram, **medusa}, complete_prompts(tok, texts[i:i + 1]),
                        256, args.repeats)
    rows += compare("bundled random b1", plain, {**ngram, **medusa}, random_prompts(plain.config.vocab_size, 1),
                    256, args.repeats)
    rows += compare("bundled complete b16", plain, {**ngram, **medusa}, complete_prompts(tok, texts[:16]), 256,
                    args.repeats)
    return rows


def llama8b(args) -> list[dict]:
    from benchmarks.shapes import llama3_8b
    from jaxllm.checkpoint import random_params
    from jaxllm.sharding import ParallelConfig, make_mesh
    from models.llama import unstack_layers

    config = llama3_8b(max_position_embeddings=2048)
    mesh = make_mesh(ParallelConfig(1))
    params = unstack_layers(random_params(config, mesh))
    kw = dict(max_model_len=2048, max_num_seqs=16)
    plain = LLM.from_params(config, params, mesh, **kw)
    specs = {"ngram k4": LLM.from_params(config, params, mesh,
                                         speculative_config={"method": "ngram", "num_speculative_tokens": 4}, **kw)}
    if args.ngram_always_verify:
        llm = LLM.from_params(config, params, mesh, speculative_config={"method": "ngram", "num_speculative_tokens": 4},
                              **kw)
        llm.speculator.plan = dataclasses.replace(llm.speculator.plan, skip_when_empty=False)
        specs["ngram k4 always verify"] = llm
    rng = np.random.default_rng(0)
    block = rng.integers(0, config.vocab_size, 500).tolist()
    rows = []
    if "greedy" in args.llama_rows:
        rows += compare("8B repeated-block b1", plain, specs, [{"prompt_token_ids": block + block[:480]}], 256,
                        args.repeats)
        rows += compare("8B random b1", plain, specs, random_prompts(config.vocab_size, 1), 256, args.repeats)
        rows += compare("8B random b16", plain, specs, random_prompts(config.vocab_size, 16), 128, args.repeats)
    if "sampled" in args.llama_rows:  # T = 1: the random model's output no longer repeats itself
        rows += compare("8B repeated-block b1 T=1", plain, specs, [{"prompt_token_ids": block + block[:480]}], 256,
                        args.repeats, temperature=1.0)
        rows += compare("8B random b1 T=1", plain, specs, random_prompts(config.vocab_size, 1), 256, args.repeats,
                        temperature=1.0)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results_speculative.json")
    parser.add_argument("--medusa", default=None, help="Medusa heads directory (default: the bundled model's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--skip-bundled", action="store_true")
    parser.add_argument("--ngram-k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--bundled-prompts", type=int, default=3, help="held-out files for batch-1 completion")
    parser.add_argument("--ngram-always-verify", action="store_true",
                        help="also n-gram rows that verify every step (no skip when nothing is proposed)")
    parser.add_argument("--llama-rows", default="greedy,sampled", help="8B rows: greedy, sampled or both")
    args = parser.parse_args(argv)
    rows = []
    if not args.skip_bundled:
        rows += bundled(args)
    if not args.skip_8b:
        rows += llama8b(args)
    result = dict(date=time.strftime("%Y-%m-%d"), jax=jax.__version__, device=jax.devices()[0].device_kind,
                  results=rows)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
