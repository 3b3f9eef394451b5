"""Train jaxllm's bundled demo model: a small Llama on the Python standard library's own source.

The corpus is every `.py` file of the standard library of the interpreter running this script (a
real corpus that every machine has), split by file into train and held-out parts by a hash of the
file's relative path. A byte-level BPE tokenizer is trained on the train files with `tokenizers`;
the model is jaxllm's own Llama forward (models/llama.py), trained with `jax.grad` and optax AdamW.
The result is saved in Hugging Face format, so that `transformers` loads it too.

    python scripts/train_demo_model.py --out jaxllm/demo_model   # about 100 s on one H200

Same seed, same machine: the same loss curve (XLA's deterministic GPU ops are switched on).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true"

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from safetensors.numpy import save_file

from jaxllm.config import ModelConfig, RopeConfig
from jaxllm.kv_cache import AttentionMeta
from models import llama, llama_checkpoint

EOS = "<|endoftext|>"


# -- corpus --------------------------------------------------------------------------------------

def stdlib_files(root: Path) -> list[Path]:
    """Every readable UTF-8 `.py` file under the standard library, in a fixed order."""
    files = []
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages", "__pycache__"} & set(path.parts):
            continue
        try:
            if path.read_text(encoding="utf-8").strip():
                files.append(path)
        except (UnicodeDecodeError, OSError):
            continue
    return files


def is_heldout(relative: str, percent: int) -> bool:
    """File-level split: a fixed hash of the relative path, so every machine splits alike."""
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 100 < percent


def split_corpus(root: Path, percent: int, max_files: int | None) -> tuple[list[Path], list[Path]]:
    files = stdlib_files(root)[:max_files]
    heldout = [f for f in files if is_heldout(f.relative_to(root).as_posix(), percent)]
    train = [f for f in files if not is_heldout(f.relative_to(root).as_posix(), percent)]
    return train, heldout


# -- tokenizer -----------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) trained on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   model_max_length=1 << 30)


def encode_documents(tokenizer, texts: list[str]) -> np.ndarray:
    """All texts as one stream, each preceded by the end-of-text token."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    encoded = tokenizer.backend_tokenizer.encode_batch(texts)
    return np.concatenate([np.array([eos] + e.ids, np.int32) for e in encoded])


# -- model ---------------------------------------------------------------------------------------

def model_config(args, vocab_size: int, eos_id: int) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=vocab_size, hidden_size=args.d_model,
        intermediate_size=args.ffn, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, head_dim=args.d_model // args.heads, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0), max_position_embeddings=args.seq_len,
        tie_word_embeddings=True, bos_token_id=eos_id, eos_token_ids=(eos_id,), dtype="bfloat16",
    )


def init_params(config: ModelConfig, key) -> dict:
    """GPT-2 style: normal(0.02) matrices, residual outputs scaled by 1/sqrt(2L), unit norms."""
    shapes = llama.param_shapes(config)
    leaves, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            out.append(jnp.ones(shape, jnp.float32))
        else:
            std = 0.02 / math.sqrt(2 * config.num_layers) if ("wo" in name or "w_down" in name) else 0.02
            out.append(std * jax.random.normal(k, shape, jnp.float32))
    return jax.tree.unflatten(jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple)), out)


def loss_fn(params, tokens, config: ModelConfig):
    """Mean next-token cross-entropy; weights used in bf16, statistics in float32."""
    p16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch, length = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    meta = AttentionMeta(positions, jnp.zeros((batch, 1), jnp.int32), jnp.full((batch,), length))
    hidden, _ = llama.forward_hidden(p16, inputs, meta, None, config)
    logits = llama.logits(p16, hidden)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(logz - picked)


def make_train_steps(config, optimizer, batch: int, seq_len: int, steps_per_call: int):
    """`steps_per_call` optimizer steps in one jitted call; batches are drawn on the device."""

    def one_step(carry, step):
        params, opt_state, data, key = carry
        starts = jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, data.shape[0] - seq_len - 1)
        tokens = jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (seq_len + 1,)))(starts)
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, config)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, data, key), loss

    @jax.jit
    def run(params, opt_state, data, key, first_step):
        steps = first_step + jnp.arange(steps_per_call)
        (params, opt_state, _, _), losses = jax.lax.scan(one_step, (params, opt_state, data, key), steps)
        return params, opt_state, losses

    return run


def heldout_loss(params, windows: np.ndarray, config, batch: int) -> float:
    fn = jax.jit(lambda p, t: loss_fn(p, t, config))
    losses = [float(fn(params, windows[i:i + batch])) for i in range(0, len(windows) - batch + 1, batch)]
    return float(np.mean(losses))


# -- saving --------------------------------------------------------------------------------------

def save_hf(out: Path, config: ModelConfig, params, tokenizer, extra: dict) -> None:
    """config.json, model.safetensors (bf16), generation_config.json, tokenizer files."""
    from transformers import GenerationConfig, LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    host = jax.tree.map(lambda x: np.asarray(x, np.float32).astype(ml_dtypes.bfloat16), jax.device_get(params))
    save_file(llama_checkpoint.to_hf(config, host), out / "model.safetensors", metadata={"format": "pt"})
    LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope.theta, tie_word_embeddings=True,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_ids[0], dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_ids[0],
                     do_sample=True, temperature=0.7, top_p=0.95).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(extra, indent=1))


# -- main ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files (smoke tests)")
    p.add_argument("--heldout-percent", type=int, default=5)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--steps-per-call", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-windows", type=int, default=256)
    args = p.parse_args(argv)
    if args.steps % args.steps_per_call:
        p.error(f"--steps ({args.steps}) must be a multiple of --steps-per-call ({args.steps_per_call})")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    train_files, heldout_files = split_corpus(args.stdlib, args.heldout_percent, args.max_files)
    train_texts = [f.read_text(encoding="utf-8") for f in train_files]
    heldout_texts = [f.read_text(encoding="utf-8") for f in heldout_files]
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    tokenizer_hash = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
    train_ids = encode_documents(tokenizer, train_texts)
    heldout_ids = encode_documents(tokenizer, heldout_texts)
    print(f"corpus {args.stdlib}: {len(train_files)} train files ({len(train_ids):,} tokens), "
          f"{len(heldout_files)} held-out files ({len(heldout_ids):,} tokens); tokenizer {len(tokenizer)} "
          f"tokens, sha256 {tokenizer_hash}; {time.perf_counter() - start:.1f} s", flush=True)

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = model_config(args, len(tokenizer), eos_id)
    params = init_params(config, jax.random.PRNGKey(args.seed))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, args.lr * 0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay))
    opt_state = optimizer.init(params)
    train_steps = make_train_steps(config, optimizer, args.batch, args.seq_len, args.steps_per_call)
    data = jnp.asarray(train_ids)
    windows = heldout_ids[: (len(heldout_ids) // (args.seq_len + 1)) * (args.seq_len + 1)]
    windows = windows.reshape(-1, args.seq_len + 1)[: args.eval_windows]
    eval_batch = min(args.batch, len(windows))
    key = jax.random.PRNGKey(args.seed + 1)
    print(f"model: {n_params / 1e6:.2f} M parameters; {args.steps} steps of {args.batch} x {args.seq_len} "
          f"tokens ({args.steps * args.batch * args.seq_len / len(train_ids):.1f} epochs)", flush=True)

    curve = []
    train_start = time.perf_counter()
    for first in range(0, args.steps, args.steps_per_call):
        params, opt_state, losses = train_steps(params, opt_state, data, key, jnp.int32(first))
        step = first + args.steps_per_call
        row = {"step": step, "train_loss": round(float(jnp.mean(losses)), 4),
               "seconds": round(time.perf_counter() - train_start, 1)}
        if step % (args.steps_per_call * 5) == 0 or step == args.steps:
            row["heldout_loss"] = round(heldout_loss(params, windows, config, eval_batch), 4)
        curve.append(row)
        print(json.dumps(row), flush=True)
    train_seconds = time.perf_counter() - train_start

    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "python_stdlib": str(args.stdlib), "train_files": len(train_files),
        "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(heldout_ids)),
        "tokenizer_sha256": tokenizer_hash, "parameters": int(n_params),
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - start, 1),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "curve": curve,
        "heldout_files": [f.relative_to(args.stdlib).as_posix() for f in heldout_files],
    }
    save_hf(args.out, config, params, tokenizer, summary)
    print(f"saved to {args.out}; training {train_seconds:.1f} s, total {summary['total_seconds']} s", flush=True)
    return summary


if __name__ == "__main__":
    main()
