"""Which proposed tokens the target model accepts: speculative rejection sampling.

A proposal d_i drawn from q_i is kept with probability min(1, p_i(d_i) / q_i(d_i)); at the first
rejection the token is drawn from the residual max(p_i - q_i, 0) (renormalised), and when every
proposal is kept a bonus token comes from p_{k+1}. The emitted tokens are then distributed exactly as
tokens sampled one at a time from p (Leviathan et al. 2023, Chen et al. 2023). Deterministic proposers
(n-gram lookup, greedy drafts, Medusa tree nodes) have one-hot q. Greedy rows have one-hot p, which turns
the rule into "keep while the proposal is the argmax", so greedy output equals plain greedy decoding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, UInt32


class Verdict(NamedTuple):
    """Per row: how many leading proposals were kept, and the token emitted right after them."""

    num_accepted: Int[Array, "B"]
    next_token: Int[Array, "B"]


def row_keys(key_data: UInt32[Array, "B 2"], step: Int[Array, "B"], salt: int, num: int):
    """[B, num] independent keys per row, from the request's seed, its output length and `salt` (each
    use its own salt, all apart from the plain sampler's stream, which folds in the step alone)."""
    def row(k, s):
        key = jax.random.fold_in(jax.random.wrap_key_data(k, impl="threefry2x32"), s)
        return jax.random.split(jax.random.fold_in(key, salt), num)

    return jax.vmap(row)(jnp.asarray(key_data, jnp.uint32), step.astype(jnp.uint32))


def draw(keys, probs: Float[Array, "B V"]) -> Int[Array, "B"]:
    """One token per row from `probs` (zero entries never drawn)."""
    logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)


_ACCEPT_SALT = 0x5EC


def accept_chain(
    target: Float[Array, "B K1 V"],
    drafts: Int[Array, "B K"],
    num_proposed: Int[Array, "B"],
    key_data: UInt32[Array, "B 2"],
    step: Int[Array, "B"],
    draft_probs: Float[Array, "B K V"] | None = None,
) -> Verdict:
    """Rejection sampling over a chain of proposals (K1 = K + 1 target distributions).

    `target[b, i]` is the target distribution of the token after drafts[b, :i]; only the first
    `num_proposed[b]` drafts are real. `draft_probs` None means one-hot proposals.
    """
    batch, k = drafts.shape
    if target.shape[:2] != (batch, k + 1):
        raise ValueError(f"target must have shape (B, K+1, V) = ({batch}, {k + 1}, V), got {target.shape}")
    keys = row_keys(key_data, step, _ACCEPT_SALT, 2)
    p_d = jnp.take_along_axis(target[:, :k], drafts[..., None], axis=-1)[..., 0]
    if draft_probs is None:
        ratio = p_d
    else:
        q_d = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
        ratio = jnp.where(q_d > 0, p_d / jnp.maximum(q_d, 1e-38), 0.0)
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(keys[:, 0])
    keep = (u < ratio) & (jnp.arange(k)[None] < num_proposed[:, None])
    num_accepted = jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1)

    rows = jnp.arange(batch)
    p_n = target[rows, num_accepted]
    rejected = num_accepted < num_proposed
    d_n = drafts[rows, jnp.minimum(num_accepted, k - 1)]
    if draft_probs is None:
        q_n = jax.nn.one_hot(d_n, target.shape[-1], dtype=p_n.dtype)
    else:
        q_n = draft_probs[rows, jnp.minimum(num_accepted, k - 1)]
    residual = jnp.maximum(p_n - q_n, 0.0)
    # p == q leaves no residual mass; a rejection is then impossible, but guard the division.
    use_residual = rejected & (jnp.sum(residual, axis=-1) > 0)
    dist = jnp.where(use_residual[:, None], residual, p_n)
    return Verdict(num_accepted, draw(keys[:, 1], dist))


def accept_greedy_chain(best: Int[Array, "B K1"], drafts: Int[Array, "B K"], num_proposed: Int[Array, "B"]) -> Verdict:
    """`accept_chain` for greedy rows: keep drafts while each equals the target's argmax `best`."""
    k = drafts.shape[1]
    keep = (drafts == best[:, :k]) & (jnp.arange(k)[None] < num_proposed[:, None])
    num = jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1)
    return Verdict(num, best[jnp.arange(best.shape[0]), num])


def accept_greedy_tree(best: Int[Array, "B N"], tokens: Int[Array, "B N"], parent: np.ndarray,
                       paths: np.ndarray) -> "TreeVerdict":
    """`accept_tree` for greedy rows: the longest path whose every node is its parent's argmax."""
    batch = tokens.shape[0]
    par = np.maximum(parent, 0)
    passes = (tokens == best[:, par]).at[:, 0].set(True)
    paths = jnp.asarray(paths)
    ok = jnp.where(paths[None, :, 1:] >= 0, passes[:, jnp.maximum(paths[:, 1:], 0)], False)
    lengths = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1)
    choice = jnp.argmax(lengths, axis=-1)
    num = jnp.max(lengths, axis=-1)
    path = jnp.maximum(paths[choice], 0)
    path = jnp.where(jnp.arange(paths.shape[1])[None] <= num[:, None], path, 0)
    last = path[jnp.arange(batch), num]
    return TreeVerdict(path, num, best[jnp.arange(batch), last])


class TreeVerdict(NamedTuple):
    """Per row: the accepted root-to-node path (node indices, root first, then padding), how many
    nodes past the root it keeps, and the token emitted after its last node."""

    path: Int[Array, "B D1"]
    num_accepted: Int[Array, "B"]
    next_token: Int[Array, "B"]


def children_table(parent: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """[N, C]: each node's children in rank order, -1 padded (static, from the tree)."""
    n = len(parent)
    kids = [sorted((int(rank[j]), j) for j in range(n) if parent[j] == i) for i in range(n)]
    width = max(1, max(len(c) for c in kids))
    table = np.full((n, width), -1, np.int32)
    for i, c in enumerate(kids):
        table[i, :len(c)] = [j for _, j in c]
    return table


def accept_tree(
    target: Float[Array, "B N V"],
    tokens: Int[Array, "B N"],
    parent: np.ndarray,
    rank: np.ndarray,
    max_depth: int,
    key_data: UInt32[Array, "B 2"],
    step: Int[Array, "B"],
) -> TreeVerdict:
    """Exact rejection sampling down a tree of one-hot proposals (node 0 the root).

    At the current node each child, in rank order, is kept with probability r(child) / sum(r), r the
    target distribution there with the children rejected so far removed; the first kept child becomes
    the current node. When none is kept (or at a leaf) the next token is drawn from r. Each test is
    the chain rule with q one-hot, so the emitted tokens follow the target exactly (greedy rows: the
    argmax path).
    """
    batch, n, vocab = target.shape
    table = jnp.asarray(children_table(parent, rank))
    width = table.shape[1]
    keys = row_keys(key_data, step, _ACCEPT_SALT, 2)
    u = jax.vmap(lambda key: jax.random.uniform(key, (max_depth, width)))(keys[:, 0])
    rows = jnp.arange(batch)
    vocab_ids = jnp.arange(vocab)[None]
    cur = jnp.zeros((batch,), jnp.int32)
    searching = jnp.ones((batch,), bool)
    num = jnp.zeros((batch,), jnp.int32)
    path = jnp.zeros((batch, max_depth + 1), jnp.int32)
    r = target[:, 0]
    for d in range(max_depth):
        found = jnp.zeros((batch,), bool)
        nxt = cur
        for c in range(width):
            child = table[cur, c]
            valid = (child >= 0) & searching & ~found
            tok = tokens[rows, jnp.maximum(child, 0)]
            r_tok = r[rows, tok]
            keep = valid & (u[:, d, c] * jnp.sum(r, axis=-1) < r_tok)
            found |= keep
            nxt = jnp.where(keep, child, nxt)
            r = jnp.where((valid & ~keep)[:, None] & (vocab_ids == tok[:, None]), 0.0, r)
        cur = jnp.where(found, nxt, cur)
        num = num + found
        path = path.at[:, d + 1].set(jnp.where(found, nxt, 0))
        r = jnp.where(found[:, None], target[rows, cur], r)
        searching &= found
    return TreeVerdict(path, num, draw(keys[:, 1], r))


def accept_typical(
    target: Float[Array, "B N V"],
    tokens: Int[Array, "B N"],
    parent: np.ndarray,
    paths: np.ndarray,
    key_data: UInt32[Array, "B 2"],
    step: Int[Array, "B"],
    *,
    threshold: float,
    alpha: float,
) -> TreeVerdict:
    """Medusa's typical acceptance (approximate for temperature > 0): a node passes when the target's
    probability of its token at its parent exceeds min(threshold, alpha * exp(-entropy)); the longest
    passing path wins. Greedy rows (one-hot targets) keep exactly the argmax path."""
    batch, n, _ = target.shape
    par = jnp.asarray(np.maximum(parent, 0))
    at_parent = target[:, par]  # [B, N, V]
    p_tok = jnp.take_along_axis(at_parent, tokens[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.where(at_parent > 0, at_parent * jnp.log(jnp.maximum(at_parent, 1e-38)), 0.0), axis=-1)
    passes = p_tok > jnp.minimum(threshold, alpha * jnp.exp(-entropy))
    passes = passes.at[:, 0].set(True)
    paths = jnp.asarray(paths)  # [P, D1], -1 padded
    ok = jnp.where(paths[None, :, 1:] >= 0, passes[:, jnp.maximum(paths[:, 1:], 0)], False)  # [B, P, D]
    lengths = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1)  # [B, P]
    best = jnp.argmax(lengths, axis=-1)
    num = jnp.max(lengths, axis=-1)
    path = jnp.maximum(paths[best], 0)
    path = jnp.where(jnp.arange(paths.shape[1])[None] <= num[:, None], path, 0)
    last = path[jnp.arange(batch), num]
    keys = row_keys(key_data, step, _ACCEPT_SALT, 2)
    return TreeVerdict(path, num, draw(keys[:, 1], target[jnp.arange(batch), last]))
