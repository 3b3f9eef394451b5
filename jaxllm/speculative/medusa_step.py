"""One Medusa step in the decode loop: heads propose a candidate tree from the last hidden state, the
target verifies every node in one forward under a tree attention mask (storing nothing), and the
longest accepted path is kept: only its K/V (and the root's) are stored, at the slots they now occupy.
Storing every node's K/V and then moving the kept ones cost a Medusa step of the bundled model about
18 more small kernels on an H200."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from jaxllm import ops, runner
from jaxllm.kv_cache import AttentionMeta
from jaxllm.speculative import acceptance, verify
from jaxllm.speculative.medusa import build_tree, medusa_logits, tree_candidates
from models import get_model_spec


@functools.lru_cache(maxsize=None)
def _tree(choices, num_heads):
    return build_tree(choices, num_heads)


def medusa_step(params, heads, s: runner.DecodeState, sp, st, limits, *, config, plan, logprobs_k,
                sampling_mode: str = "auto", penalties: bool | None = None):
    model = get_model_spec(config.architecture).model
    tree = _tree(plan.tree, plan.k)
    n_nodes, depth = tree.num_nodes, tree.max_depth
    rows = jnp.arange(s.tokens.shape[0])
    n = s.num_generated
    live = ~s.done
    p = s.prompt_lens + n - 1  # slot of the root (the last token, not yet cached)
    last = s.tokens[rows, jnp.maximum(n - 1, 0)]
    candidates = tree_candidates(last, medusa_logits(heads, sp.hidden), tree)
    positions = jnp.where(live[:, None], p[:, None] + jnp.asarray(tree.depth)[None], -1)
    meta = AttentionMeta(positions, s.page_table, jnp.where(live, p, 0), jnp.where(live, p, -1),
                         jnp.asarray(tree.ancestor_mask))
    hidden, k_tree, v_tree = model.forward_tree(params, candidates, meta, s.cache, config)
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

    # the root and the accepted nodes, in path order, go to slots p, p + 1, ..., p + accepted
    kept = (jnp.arange(depth + 1)[None] <= accepted[:, None]) & live[:, None]
    pick = lambda x: x[:, rows[:, None], path]  # [L, B, depth + 1, Hkv, D]
    cache = ops.store_kv_layers(s.cache, pick(k_tree), pick(v_tree), s.page_table,
                                jnp.where(kept, p[:, None] + jnp.arange(depth + 1), -1))
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
