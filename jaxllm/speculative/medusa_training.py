"""Training Medusa heads by self-distillation, and measuring them offline.

The base model writes its own training data: continuations of prompts cut from text. One cache-less
forward over prompt + continuation gives the final hidden states h_t. Head k, fed h_t, is trained
towards the base model's own next-token distribution at position t + k + 1 (the distribution of
the token at t + k + 2) with a KL loss, as in the Medusa paper's self-distillation; the base model
stays frozen. The teacher's distribution is recomputed from the stored hidden states each step
(one matmul with the base lm_head), so no [positions, vocabulary] table is ever stored.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from jaxllm.config import ModelConfig
from jaxllm.kv_cache import AttentionMeta
from jaxllm.speculative.medusa import Heads, MedusaTree, config_of, medusa_logits
from models import get_model_spec


@dataclasses.dataclass(frozen=True)
class DistillData:
    """Token rows (prompt, then the base model's continuation, then 0 padding) and their hidden states."""

    tokens: Int[np.ndarray, "S T"]
    lengths: Int[np.ndarray, "S"]  # prompt + continuation
    prompt_lens: Int[np.ndarray, "S"]
    hidden: Float[np.ndarray, "S T D"]  # the base model's final (normed) hidden states

    def __post_init__(self):
        S, T = self.tokens.shape
        if self.hidden.shape[:2] != (S, T) or self.lengths.shape != (S,) or self.prompt_lens.shape != (S,):
            raise ValueError(f"DistillData shapes disagree: tokens {self.tokens.shape}, hidden "
                             f"{self.hidden.shape}, lengths {self.lengths.shape}, prompt_lens "
                             f"{self.prompt_lens.shape}")
        if np.any(self.prompt_lens < 1) or np.any(self.lengths < self.prompt_lens) or np.any(self.lengths > T):
            raise ValueError("DistillData needs 1 <= prompt_lens <= lengths <= the row width "
                             f"{T}; got prompt_lens {self.prompt_lens.tolist()[:8]}..., lengths "
                             f"{self.lengths.tolist()[:8]}...")


# -- data ----------------------------------------------------------------------------------------

def cut_prompts(documents: Sequence[np.ndarray], num: int, length: int, seed: int) -> list[list[int]]:
    """`num` spans of `length` tokens from random places of `documents` (chosen by their length)."""
    for name, value in (("num", num), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    usable = [np.asarray(d) for d in documents if len(d) > length]
    if not usable:
        raise ValueError(f"no document is longer than the prompt length {length} tokens")
    rng = np.random.default_rng(seed)
    sizes = np.array([len(d) - length for d in usable], np.float64)
    picks = rng.choice(len(usable), size=num, p=sizes / sizes.sum())
    return [usable[i][(s := int(rng.integers(len(usable[i]) - length))): s + length].tolist() for i in picks]


def generate_continuations(llm, prompts: Sequence[Sequence[int]], max_tokens: int, temperature: float,
                           seed: int, use_tqdm: bool = True) -> list[list[int]]:
    """The base model's own continuation of each prompt (`jaxllm.LLM.generate`)."""
    from jaxllm.sampling_params import SamplingParams

    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i)
              for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=use_tqdm)
    return [list(o.outputs[0].token_ids) for o in outs]


@functools.partial(jax.jit, static_argnames=("config",))
def _forward_hidden(params, tokens, lengths, *, config: ModelConfig):
    t = jnp.arange(tokens.shape[1])[None, :]
    positions = jnp.where(t < lengths[:, None], t, -1)
    meta = AttentionMeta(positions, jnp.zeros((tokens.shape[0], 1), jnp.int32), lengths)
    hidden, _ = get_model_spec(config.architecture).model.forward_hidden(params, tokens, meta, None, config)
    return hidden


def final_hidden(params: dict, config: ModelConfig, tokens: Int[np.ndarray, "S T"],
                 lengths: Int[np.ndarray, "S"], batch: int = 16, progress: bool = False) -> np.ndarray:
    """The base model's final hidden states [S, T, D] (model dtype) from a cache-less forward."""
    rows = []
    for i in tqdm(range(0, len(tokens), batch), desc="hidden states", disable=not progress, leave=False):
        chunk, lens = tokens[i:i + batch], lengths[i:i + batch]
        pad = batch - len(chunk)  # one compiled shape
        chunk = np.pad(chunk, ((0, pad), (0, 0)))
        lens = np.pad(lens, (0, pad), constant_values=1)
        out = _forward_hidden(params, jnp.asarray(chunk, jnp.int32), jnp.asarray(lens, jnp.int32), config=config)
        rows.append(np.asarray(out)[: batch - pad])
    return np.concatenate(rows)


def build_distill_data(llm, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                       progress: bool = False) -> DistillData:
    """Rows of prompt + continuation with the base model's hidden states over them."""
    if len(prompts) != len(continuations) or not prompts:
        raise ValueError(f"need as many continuations as prompts (at least one), got {len(prompts)} "
                         f"prompts and {len(continuations)} continuations")
    rows = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    hidden = final_hidden(llm.params, llm.config, tokens, lengths, progress=progress)
    return DistillData(tokens, lengths, np.array([len(p) for p in prompts], np.int32), hidden)


def lm_head_matrix(params: dict) -> Float[Array, "D V"]:
    """The base model's output projection [D, V] (the transposed embedding when tied)."""
    from jaxllm.quantization import is_quantized

    w = params["lm_head"] if "lm_head" in params else params["embed"].T
    if is_quantized(w):
        raise ValueError("the base model's lm_head is quantized; load the model unquantized to train heads")
    return w


# -- loss and training ---------------------------------------------------------------------------

def distill_loss(heads: Heads, lm_head: Float[Array, "D V"], hidden: Float[Array, "B T D"],
                 lengths: Int[Array, "B"]) -> tuple[Float[Array, ""], Float[Array, "K"]]:
    """Sum over heads of the mean KL(base at t+k+1 || head k at t) over positions with a target."""
    K = heads["w_out"].shape[0]
    h = hidden.astype(jnp.float32)
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(h @ lm_head.astype(jnp.float32)), axis=-1)
    student = jax.nn.log_softmax(medusa_logits(heads, h), axis=-1)  # [B, T, K, V]
    t = jnp.arange(h.shape[1])[None, :]
    per_head = []
    for k in range(K):
        shift = k + 1
        target = teacher[:, shift:]  # position t + k + 1, aligned with t
        pred = student[:, : h.shape[1] - shift, k]
        mask = (t[:, : h.shape[1] - shift] + shift < lengths[:, None]).astype(jnp.float32)
        kl = jnp.sum(jnp.exp(target) * (target - pred), axis=-1)
        per_head.append(jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0))
    per_head = jnp.stack(per_head)
    return jnp.sum(per_head), per_head


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings for `train_heads`."""

    steps: int = 400
    batch_rows: int = 8
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig {name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup < self.steps:
            raise ValueError(f"TrainConfig warmup must be an integer in [0, steps={self.steps}), got {self.warmup!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig weight_decay must be >= 0, got {self.weight_decay!r}")


def train_heads(heads: Heads, lm_head: Float[Array, "D V"], data: DistillData, config: TrainConfig,
                progress: bool = True, log_every: int = 10) -> tuple[Heads, list[dict]]:
    """AdamW (cosine schedule) on `distill_loss` over random rows of `data`; heads trained in float32.

    Returns the trained heads (in their original dtype) and a curve of mean losses every `log_every` steps.
    """
    medusa = config_of(heads)
    if data.hidden.shape[-1] != medusa.hidden_size or tuple(lm_head.shape) != (medusa.hidden_size, medusa.vocab_size):
        raise ValueError(f"hidden states of size {data.hidden.shape[-1]} and lm_head {tuple(lm_head.shape)} "
                         f"do not fit heads of hidden size {medusa.hidden_size}, vocabulary {medusa.vocab_size}")
    if config.batch_rows > len(data.tokens):
        raise ValueError(f"batch_rows {config.batch_rows} exceeds the {len(data.tokens)} rows of data")
    dtype = heads["w_out"].dtype
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup, config.steps, config.lr * 0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, weight_decay=config.weight_decay))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), heads)
    opt_state = optimizer.init(params)
    lm_head = jnp.asarray(lm_head)

    @jax.jit
    def step(params, opt_state, hidden, lengths):
        (loss, per_head), grads = jax.value_and_grad(distill_loss, has_aux=True)(params, lm_head, hidden, lengths)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, per_head

    rng = np.random.default_rng(config.seed)
    curve, window = [], []
    for i in tqdm(range(config.steps), desc="training Medusa heads", disable=not progress):
        rows = rng.choice(len(data.tokens), config.batch_rows, replace=False)
        params, opt_state, _, per_head = step(params, opt_state, jnp.asarray(data.hidden[rows]),
                                                 jnp.asarray(data.lengths[rows]))
        window.append(np.asarray(per_head))
        if (i + 1) % log_every == 0 or i + 1 == config.steps:
            mean = np.mean(window, axis=0)
            curve.append({"step": i + 1, "loss": round(float(mean.sum()), 4),
                          "per_head": [round(float(x), 4) for x in mean]})
            window = []
    return jax.tree.map(lambda x: x.astype(dtype), params), curve


# -- offline measurements ------------------------------------------------------------------------

@jax.jit
def _target_ranks(heads, hidden, targets):
    logits = medusa_logits(heads, hidden)  # [B, T, K, V]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    return jnp.sum(logits > picked, axis=-1).astype(jnp.int32)


def target_ranks(heads: Heads, data: DistillData, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """rank[s, t, k]: how many tokens head k, fed h_t, scores above the token at t + k + 2 (0 = its
    top-1); and valid[s, t, k]: that t is in the continuation (t >= prompt_len - 1) and t + k + 2 < length.
    """
    K = config_of(heads).num_heads
    S, T = data.tokens.shape
    t = np.arange(T)[None, :, None]
    k = np.arange(K)[None, None, :]
    index = np.minimum(t + k + 2, T - 1)
    targets = np.take_along_axis(np.broadcast_to(data.tokens[:, :, None], (S, T, K)),
                                 np.broadcast_to(index, (S, T, K)), axis=1)
    valid = (t >= data.prompt_lens[:, None, None] - 1) & (t + k + 2 < data.lengths[:, None, None])
    ranks = []
    for i in range(0, S, batch):
        ranks.append(np.asarray(_target_ranks(heads, jnp.asarray(data.hidden[i:i + batch]),
                                              jnp.asarray(targets[i:i + batch]))))
    return np.concatenate(ranks), valid


def topk_accuracy(ranks: np.ndarray, valid: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, list[float]]:
    """Per head, the share of valid positions whose target is within the head's top k."""
    out = {}
    for k in ks:
        hits = (ranks < k) & valid
        out[f"top{k}"] = [float(x) for x in hits.sum(axis=(0, 1)) / np.maximum(valid.sum(axis=(0, 1)), 1)]
    return out


def accepted_lengths(ranks: Int[np.ndarray, "M K"], tree: MedusaTree) -> np.ndarray:
    """Tokens per verification step along `tree` under greedy acceptance, for each position: the
    base model's token plus the longest tree path whose node at depth d holds head d-1's rank of
    the true token at that depth."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] < tree.max_depth:
        raise ValueError(f"ranks must be [positions, heads >= the tree's depth {tree.max_depth}], "
                         f"got shape {ranks.shape}")
    children = np.full((tree.num_nodes, tree.top_k), -1, np.int64)
    children[tree.parent[1:], tree.rank[1:]] = np.arange(1, tree.num_nodes)
    node = np.zeros(len(ranks), np.int64)
    alive = np.ones(len(ranks), bool)
    accepted = np.ones(len(ranks), np.int64)
    for d in range(tree.max_depth):
        r = ranks[:, d]
        nxt = np.where(r < tree.top_k, children[node, np.minimum(r, tree.top_k - 1)], -1)
        alive &= nxt >= 0
        accepted += alive
        node = np.where(alive, nxt, node)
    return accepted


def tree_positions(ranks: np.ndarray, valid: np.ndarray, depth: int) -> np.ndarray:
    """ranks [M, depth] of the positions whose first `depth` head targets all exist."""
    full = valid[:, :, :depth].all(axis=-1)
    return ranks[..., :depth][full]
