"""Train Medusa heads for a jaxllm model by self-distillation, and measure them on held-out text.

Prompts are cut from the Python standard library's train files (the same file-level split as
scripts/train_demo_model.py, so its held-out files stay held out); the base model continues each
prompt itself; the heads learn the base model's own distributions over prompt + continuation
(jaxllm/speculative/medusa_training.py). Measured on greedy continuations of prompts from the
held-out files: each head's top-1 / top-5 accuracy against the base model's greedy tokens, and the
mean tokens per verification step the (truncated) default Medusa tree would accept.

    python scripts/train_medusa.py --out jaxllm/demo_model/medusa   # the bundled heads, CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sysconfig
import time
from pathlib import Path

import jax
import numpy as np

from jaxllm import LLM
from jaxllm.default_model import default_model_dir
from jaxllm.speculative import medusa
from jaxllm.speculative import medusa_training as mt

_SPLIT_SCRIPT = Path(__file__).resolve().parent / "train_demo_model.py"


def _demo_training_script():
    """scripts/train_demo_model.py as a module (its corpus listing and held-out split)."""
    spec = importlib.util.spec_from_file_location("train_demo_model", _SPLIT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _listed_heldout(model_dir: Path) -> set[str]:
    """Held-out files named in the model's training.json (scripts/train_demo_model.py writes them)."""
    path = model_dir / "training.json"
    if not path.is_file():
        return set()
    return set(json.loads(path.read_text()).get("heldout_files", []))


def corpus_files(stdlib: Path, percent: int, max_files: int | None, model_dir: Path) -> tuple[list, list]:
    """Train and held-out files: train_demo_model.py's split; when the model's training.json lists
    its held-out files, those are the held-out set and never trained on."""
    train, heldout = _demo_training_script().split_corpus(stdlib, percent, max_files)
    listed = _listed_heldout(model_dir)
    if listed:
        train = [f for f in train if f.relative_to(stdlib).as_posix() not in listed]
        heldout = [stdlib / name for name in sorted(listed) if (stdlib / name).is_file()]
    return train, heldout


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="base model directory (default: the bundled one)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--batch-rows", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--num-prompts", type=int, default=1024, help="training sequences")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128, help="tokens the base model adds to each prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="for the training continuations")
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", help="stored precision of the heads")
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--heldout-percent", type=int, default=5)
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files (smoke tests)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences generated together")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("num_heads", "steps", "batch_rows", "num_prompts", "prompt_len", "gen_len", "eval_prompts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.num_layers < 0:
        p.error(f"--num-layers must be >= 0, got {args.num_layers}")
    return args


def _sequences(llm, documents, num, args, seed, temperature, progress):
    prompts = mt.cut_prompts(documents, num, args.prompt_len, seed)
    continuations = mt.generate_continuations(llm, prompts, args.gen_len, temperature, seed, use_tqdm=progress)
    return mt.build_distill_data(llm, prompts, continuations, progress=progress)


def evaluate(heads, data: mt.DistillData) -> dict:
    """Per-head top-1/top-5 against the greedy tokens, and the default tree's accepted lengths."""
    K = medusa.config_of(heads).num_heads
    ranks, valid = mt.target_ranks(heads, data)
    acc = mt.topk_accuracy(ranks, valid, (1, 5))
    positions = mt.tree_positions(ranks, valid, K)
    tree = medusa.default_tree(K)
    chain = medusa.build_tree([(0,) * d for d in range(1, K + 1)], K)
    lengths = mt.accepted_lengths(positions, tree)
    return {
        "head_top1": [round(x, 4) for x in acc["top1"]],
        "head_top5": [round(x, 4) for x in acc["top5"]],
        "positions": int(valid[..., 0].sum()),
        "tree_positions": len(positions),
        "tree_nodes": tree.num_nodes,
        "mean_accepted_length": round(float(lengths.mean()), 4),
        "accepted_length_histogram": np.bincount(lengths, minlength=K + 2)[1:].tolist(),
        "chain_mean_accepted_length": round(float(mt.accepted_lengths(positions, chain).mean()), 4),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    progress = not args.no_progress
    start = time.perf_counter()
    model_dir = args.model if args.model is not None else default_model_dir()
    train_files, heldout_files = corpus_files(args.stdlib, args.heldout_percent, args.max_files, model_dir)
    llm = LLM(model_dir, progress=False, max_num_seqs=args.max_num_seqs,
              max_model_len=args.prompt_len + args.gen_len)
    if llm.tokenizer is None:
        raise ValueError("the base model needs a tokenizer to cut prompts from text")
    encode = lambda files: [np.array(e.ids, np.int32) for e in llm.tokenizer.backend_tokenizer.encode_batch(
        [f.read_text(encoding="utf-8") for f in files])]
    train_docs, heldout_docs = encode(train_files), encode(heldout_files)
    print(f"corpus {args.stdlib}: {len(train_files)} train files, {len(heldout_files)} held-out files", flush=True)

    t0 = time.perf_counter()
    train = _sequences(llm, train_docs, args.num_prompts, args, args.seed, args.temperature, progress)
    heldout = _sequences(llm, heldout_docs, args.eval_prompts, args, args.seed + 10**6, 0.0, progress)
    data_seconds = time.perf_counter() - t0
    print(f"data: {len(train.tokens)} train rows ({int(train.lengths.sum()):,} tokens), "
          f"{len(heldout.tokens)} held-out rows; {data_seconds:.1f} s", flush=True)

    config = medusa.MedusaConfig(args.num_heads, args.num_layers, llm.config.hidden_size, llm.config.vocab_size)
    lm_head = mt.lm_head_matrix(llm.params)
    heads = medusa.init_medusa_heads(jax.random.PRNGKey(args.seed), config, "float32", lm_head=lm_head)
    before = evaluate(heads, heldout)
    t0 = time.perf_counter()
    train_config = mt.TrainConfig(steps=args.steps, batch_rows=args.batch_rows, lr=args.lr,
                                  warmup=args.warmup, seed=args.seed)
    heads, curve = mt.train_heads(heads, lm_head, train, train_config, progress=progress)
    train_seconds = time.perf_counter() - t0

    base_name = str(args.model) if args.model is not None else "jaxllm/demo_model"
    medusa.save_medusa_heads(args.out, config, heads, base_model_name_or_path=base_name, dtype=args.dtype)
    _, stored = medusa.load_medusa_heads(args.out, llm.config.replace(dtype=args.dtype))
    after = evaluate(stored, heldout)  # the stored (rounded) heads, as they ship
    summary = {
        "command": "python scripts/train_medusa.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "python_stdlib": str(args.stdlib), "train_files": len(train_files), "heldout_files": len(heldout_files),
        "train_rows": len(train.tokens), "train_positions": int(train.lengths.sum()),
        "heldout_rows": len(heldout.tokens),
        "heldout_file_names": [f.relative_to(args.stdlib).as_posix() for f in heldout_files],
        "data_seconds": round(data_seconds, 1), "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "heldout_before_training": before, "heldout": after, "curve": curve,
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("train_seconds", "total_seconds", "heldout")}, indent=1), flush=True)
    return summary


if __name__ == "__main__":
    main()
