"""One Medusa step in the decode loop: heads propose a candidate tree from the last hidden state, the
target verifies every node in one forward under a tree attention mask, the longest accepted path
is kept and its K/V moved to the slots it now occupies."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from jaxllm import runner
from jaxllm.kv_cache import AttentionMeta, KVCache
from jaxllm.ops.attention import slot_address
from jaxllm.speculative import acceptance, verify
from jaxllm.speculative.medusa import build_tree, medusa_logits, tree_candidates
from models import get_model_spec


@functools.lru_cache(maxsize=None)
def _tree(choices, num_heads):
    return build_tree(choices, num_heads)


def move_kv(cache: KVCache, page_table: Int[Array, "B Pmax"], src: Int[Array, "B M"],
            dst: Int[Array, "B M"]) -> KVCache:
    """Copies every layer's K/V (and scales) at token slot src[b, m] to slot dst[b, m] of row b;
    -1 entries touch only the scratch page."""
    page_size = cache.k.shape[2]
    (sp, so), (dp, do) = slot_address(page_table, src, page_size), slot_address(page_table, dst, page_size)
    move = (lambda x: None if x is None else x.at[:, dp, do].set(x[:, sp, so]))
    return KVCache(*(move(x) for x in cache))


def medusa_step(params, heads, s: runner.DecodeState, sp, st, limits, *, config, plan, logprobs_k,
                sampling_mode: str = "auto", penalties: bool | None = None):
    model = get_model_spec(config.architecture).model
    tree = _tree(plan.tree, plan.k)
    n_nodes, depth = tree.num_nodes, tree.max_depth
    rows = jnp.arange(s.tokens.shape[0])
    n = s.num_generated
    live = ~s.done
    p = s.prompt_lens + n - 1  # the root (last token) goes at slot p; node i at slot p + i
    last = s.tokens[rows, jnp.maximum(n - 1, 0)]
    candidates = tree_candidates(last, medusa_logits(heads, sp.hidden), tree)
    positions = jnp.where(live[:, None], p[:, None] + jnp.asarray(tree.depth)[None], -1)
    meta = AttentionMeta(positions, s.page_table, jnp.where(live, p + n_nodes, 0), jnp.where(live, p, -1),
                         jnp.asarray(tree.ancestor_mask))
    hidden, cache = model.forward_hidden(params, candidates, meta, s.cache, config)
    logits = model.logits(params, hidden)  # [B, N, V]
    seen = tree.ancestor_mask & (np.arange(n_nodes) >= 1)[None, :]  # the root is already output
    scores = verify.penalised(logits, s, st, candidates, seen, penalties)

    def greedy():  # what either rule does with one-hot targets, without the per-child walk
        best = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        return acceptance.accept_greedy_tree(best, candidates, tree.parent, tree.paths)

    def sampled():
        probs = verify.target_probs(scores, st, sampling_mode)
        if plan.acceptance == "typical":
            return acceptance.accept_typical(probs, candidates, tree.parent, tree.paths, st.keys, n,
                                             threshold=plan.typical_threshold, alpha=plan.typical_alpha)
        return acceptance.accept_tree(probs, candidates, tree.parent, tree.rank, depth, st.keys, n)

    verdict = verify.choose_verdict(sampling_mode, st, greedy, sampled)
    path, accepted = verdict.path, verdict.num_accepted

    kept = (jnp.arange(depth)[None] < accepted[:, None]) & live[:, None]
    cache = move_kv(cache, s.page_table, jnp.where(kept, p[:, None] + path[:, 1:], -1),
                    jnp.where(kept, p[:, None] + 1 + jnp.arange(depth), -1))
    emitted = jnp.concatenate([jnp.take_along_axis(candidates, path[:, 1:], axis=1),
                               jnp.zeros_like(last)[:, None]], axis=1)
    emitted = emitted.at[rows, accepted].set(verdict.next_token)
    lp = verify.logprobs(jnp.take_along_axis(logits, path[..., None], axis=1), emitted, logprobs_k)
    s = runner.record(s._replace(cache=cache), emitted, accepted + 1, limits, lp)

    at = jnp.where(live[:, None], p[:, None] + 1 + jnp.arange(depth + 1), sp.history.shape[1])
    positions = jnp.arange(plan.k)[None]
    sp = sp._replace(
        history=sp.history.at[rows[:, None], at].set(emitted, mode="drop"),
        steps=sp.steps + live,
        proposed=sp.proposed + ((positions < depth) & live[:, None]),
        accepted=sp.accepted + ((positions < accepted[:, None]) & live[:, None]),
        hidden=jnp.where(live[:, None], hidden[rows, path[rows, accepted]], sp.hidden),
    )
    return s, sp
