"""The speculative decode loop: propose, verify in one target forward, accept, record; on device.

Each iteration of the `lax.while_loop` runs a proposer (n-gram lookup over the row's history, a draft
model with its own paged cache, or Medusa heads over a candidate tree), runs the target model once
over the row's last token and the proposals, keeps the accepted prefix (`acceptance`) and appends it
with the token that follows. Rejected tokens' K/V stay in the pages past the row's length: attention
never reads past a query's own position and the next step overwrites them, so rolling back is
setting the length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxllm import runner, sampling
from jaxllm.config import ModelConfig
from jaxllm.kv_cache import AttentionMeta, KVCache
from jaxllm.speculative import acceptance, ngram
from models import get_model_spec


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static part of a speculative config (what the loop compiles for)."""

    method: str
    k: int  # proposals per step (Medusa: heads used)
    n_max: int = 4
    n_min: int = 1
    skip_when_empty: bool = True  # n-gram: a plain one-token step when no row has a proposal
    tree: tuple[tuple[int, ...], ...] = ()  # Medusa choices
    acceptance: str = "rejection"
    typical_threshold: float = 0.09
    typical_alpha: float = 0.3


class SpecState(NamedTuple):
    """What the speculative loop carries besides the decode state; row b is one request."""

    history: Int[Array, "B H"]  # prompt then output tokens
    steps: Int[Array, "B"]  # target forwards while the row ran
    proposed: Int[Array, "B K"]  # per proposal position: steps with a real proposal there
    accepted: Int[Array, "B K"]  # per proposal position: steps that kept it
    draft_cache: KVCache | None = None
    hidden: Float[Array, "B D"] | None = None  # Medusa: hidden state of the last cached token


def init_spec_state(
    tokens: np.ndarray, prompt_lens: np.ndarray, first: Int[Array, "B"], capacity: int, k: int,
    draft_cache: KVCache | None = None, hidden=None,
) -> SpecState:
    """History = prompts, then each row's first generated token; room for `capacity` tokens."""
    batch = tokens.shape[0]
    history = jnp.zeros((batch, capacity), jnp.int32).at[:, :tokens.shape[1]].set(jnp.asarray(tokens))
    history = history.at[jnp.arange(batch), jnp.asarray(prompt_lens)].set(first, mode="drop")
    return SpecState(history, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, k), jnp.int32),
                     jnp.zeros((batch, k), jnp.int32), draft_cache, hidden)


def _tile(st: sampling.SamplingTensors, t: int) -> sampling.SamplingTensors:
    return jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), t, axis=0), st)


def _flat(x):
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _penalised(logits, state: runner.DecodeState, st, drafts) -> Float[Array, "B T V"]:
    """Logits at each of T positions after penalties, counting the drafts before a position as
    output (as they will be, if accepted); float32."""
    batch, t, vocab = logits.shape

    def apply():
        seen = jnp.cumsum(jax.nn.one_hot(drafts[:, :t - 1], vocab, dtype=jnp.int32), axis=1)
        counts = state.output_counts[:, None] + jnp.concatenate(
            [jnp.zeros((batch, 1, vocab), jnp.int32), seen], axis=1)
        out = sampling.apply_penalties(_flat(logits), jnp.repeat(state.prompt_mask, t, axis=0), _flat(counts),
                                       _tile(st, t))
        return out.reshape(batch, t, vocab)

    neutral = (st.repetition_penalty == 1.0) & (st.presence_penalty == 0.0) & (st.frequency_penalty == 0.0)
    return jax.lax.cond(jnp.all(neutral), lambda: logits.astype(jnp.float32), apply)


def _target_probs(logits, state: runner.DecodeState, st, drafts) -> Float[Array, "B T V"]:
    """The target's sampling distribution at each of T positions (see `_penalised`)."""
    batch, t, vocab = logits.shape
    penalised = _penalised(logits, state, st, drafts).reshape(batch * t, vocab)
    return sampling.target_probs(penalised, _tile(st, t)).reshape(batch, t, vocab)


def _logprobs(logits, tokens, k):
    if k is None:
        return None
    out = sampling.token_logprobs(_flat(logits), tokens.reshape(-1), k)
    return jax.tree.map(lambda x: x.reshape(tokens.shape + x.shape[1:]), out)


def _record_all(state: runner.DecodeState, emitted, num_emitted, limits: runner.Limits, logprobs):
    """Appends emitted[:, :num_emitted] to each running row in one go, cut after the row's first
    stop token or when it reaches its length limit (what recording them one by one would do)."""
    batch, width = emitted.shape
    rows = jnp.arange(batch)[:, None]
    j = jnp.arange(width)[None]
    live = ~state.done
    n = state.num_generated[:, None]
    count = n + j + 1  # output length once token j is appended
    hit_stop = jnp.any(emitted[..., None] == limits.stop_ids[:, None, :], axis=-1)
    too_long = (count >= limits.max_tokens[:, None]) | (state.prompt_lens[:, None] + count >= limits.max_model_len)
    ends = (hit_stop | too_long) & (j < num_emitted[:, None])
    first_end = jnp.argmax(ends, axis=1)
    kept = jnp.where(jnp.any(ends, axis=1), first_end + 1, num_emitted)
    kept = jnp.where(live, kept, 0)
    keep = j < kept[:, None]
    at = jnp.where(keep, n + j, state.tokens.shape[1])  # out of range: dropped
    last = jnp.maximum(kept - 1, 0)
    reason = jnp.where(hit_stop[rows[:, 0], last], runner.FINISHED_STOP,
                       jnp.where(too_long[rows[:, 0], last], runner.FINISHED_LENGTH, runner.RUNNING))
    ended = live & jnp.any(ends & keep, axis=1)
    if logprobs is not None:
        lp, rank, top_ids, top_lps = logprobs
        state = state._replace(
            logprob=state.logprob.at[rows, at].set(lp, mode="drop"),
            rank=state.rank.at[rows, at].set(rank, mode="drop"),
            top_ids=state.top_ids.at[rows, at].set(top_ids, mode="drop"),
            top_lps=state.top_lps.at[rows, at].set(top_lps, mode="drop"),
        )
    return state._replace(
        tokens=state.tokens.at[rows, at].set(emitted, mode="drop"),
        num_generated=state.num_generated + kept,
        output_counts=state.output_counts.at[rows, emitted].add(keep.astype(jnp.int32)),
        finish=jnp.where(ended, reason, state.finish),
        done=state.done | ended,
    )


def _draft_keys(key_data, step, i):
    def row(k, s):
        key = jax.random.fold_in(jax.random.wrap_key_data(k, impl="threefry2x32"), s)
        return jax.random.fold_in(key, 0xD0 + i)

    return jax.vmap(row)(jnp.asarray(key_data, jnp.uint32), step.astype(jnp.uint32))


def _draw(keys, probs):
    logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)


def propose_draft(draft_params, cache: KVCache, history, page_table, last, p, live, st, step, *,
                  draft_config: ModelConfig, k: int):
    """k tokens from the draft model, each sampled from its (temperature, top-k/p) distribution.

    The first forward also (re)writes the token before `last`: the step before may have accepted a
    token the draft never saw. Returns (drafts [B, k], their distributions [B, k, V], cache)."""
    model = get_model_spec(draft_config.architecture).model
    rows = jnp.arange(last.shape[0])
    prev = history[rows, jnp.maximum(p - 1, 0)]
    pos = jnp.where(live[:, None], jnp.stack([p - 1, p], axis=1), -1)
    meta = AttentionMeta(pos, page_table, jnp.where(live, p + 1, 0))
    hidden, cache = model.forward_hidden(draft_params, jnp.stack([prev, last], axis=1), meta, cache, draft_config)
    logits = model.logits(draft_params, hidden[:, 1])
    drafts, dists = [], []
    for i in range(k):
        q = sampling.target_probs(logits, st)
        d = _draw(_draft_keys(st.keys, step, i), q)
        drafts.append(d)
        dists.append(q)
        if i < k - 1:
            pos = jnp.where(live, p + 1 + i, -1)[:, None]
            meta = AttentionMeta(pos, page_table, jnp.where(live, p + 2 + i, 0))
            hidden, cache = model.forward_hidden(draft_params, d[:, None], meta, cache, draft_config)
            logits = model.logits(draft_params, hidden[:, 0])
    return jnp.stack(drafts, axis=1), jnp.stack(dists, axis=1), cache


def _chain_step(params, s: runner.DecodeState, sp: SpecState, st, limits, draft_params, *,
                config, plan: Plan, logprobs_k, draft_config):
    """One propose / verify / accept / record step for a chain of proposals (n-gram, draft model)."""
    model = get_model_spec(config.architecture).model
    rows = jnp.arange(s.tokens.shape[0])
    k = plan.k
    n = s.num_generated
    live = ~s.done
    p = s.prompt_lens + n - 1  # position of the last token, not yet in the cache
    last = s.tokens[rows, jnp.maximum(n - 1, 0)]
    draft_probs, draft_cache = None, sp.draft_cache
    if plan.method == "ngram":
        drafts, proposed = ngram.propose_ngram(sp.history, p + 1, k=k, n_max=plan.n_max, n_min=plan.n_min)
    else:
        drafts, draft_probs, draft_cache = propose_draft(
            draft_params, sp.draft_cache, sp.history, s.page_table, last, p, live, st, n,
            draft_config=draft_config, k=k)
        proposed = jnp.full_like(n, k)
    proposed = jnp.where(live, proposed, 0)

    def verify(cache):
        tokens = jnp.concatenate([last[:, None], drafts], axis=1)
        pos = jnp.where(live[:, None], p[:, None] + jnp.arange(k + 1), -1)
        meta = AttentionMeta(pos, s.page_table, jnp.where(live, p + k + 1, 0))
        hidden, cache = model.forward_hidden(params, tokens, meta, cache, config)
        logits = model.logits(params, hidden)  # [B, k+1, V]

        def greedy():  # one-hot targets make rejection sampling "keep while equal to the argmax"
            best = jnp.argmax(_penalised(logits, s, st, drafts), axis=-1).astype(jnp.int32)
            return acceptance.accept_greedy_chain(best, drafts, proposed)

        def sampled():
            probs = _target_probs(logits, s, st, drafts)
            return acceptance.accept_chain(probs, drafts, proposed, st.keys, n, draft_probs)

        all_greedy = jnp.all(st.temperature < sampling.GREEDY_EPS)
        verdict = jax.lax.cond(all_greedy, greedy, sampled)
        emitted = jnp.concatenate([drafts, jnp.zeros_like(last)[:, None]], axis=1)
        emitted = emitted.at[rows, verdict.num_accepted].set(verdict.next_token)
        return cache, emitted, verdict.num_accepted, _logprobs(logits, emitted, logprobs_k)

    def plain(cache):  # exactly runner.decode's step
        pos = jnp.where(live, p, -1)
        meta = AttentionMeta(pos[:, None], s.page_table, pos + 1)
        hidden, cache = model.forward_hidden(params, last[:, None], meta, cache, config)
        logits = model.logits(params, hidden[:, 0])
        token = sampling.sample(logits, st, n, s.prompt_mask, s.output_counts)
        emitted = jnp.zeros((rows.shape[0], k + 1), jnp.int32).at[:, 0].set(token)
        lp = _logprobs(logits[:, None], token[:, None], logprobs_k)
        if lp is not None:
            lp = jax.tree.map(lambda x: jnp.pad(x, [(0, 0), (0, k)] + [(0, 0)] * (x.ndim - 2)), lp)
        return cache, emitted, jnp.zeros_like(n), lp

    if plan.method == "ngram" and plan.skip_when_empty:
        cache, emitted, accepted, lp = jax.lax.cond(jnp.any(proposed > 0), verify, plain, s.cache)
    else:
        cache, emitted, accepted, lp = verify(s.cache)
    s = _record_all(s._replace(cache=cache), emitted, accepted + 1, limits, lp)
    at = jnp.where(live[:, None], p[:, None] + 1 + jnp.arange(k + 1), sp.history.shape[1])
    positions = jnp.arange(k)[None]
    sp = sp._replace(
        history=sp.history.at[rows[:, None], at].set(emitted, mode="drop"),
        steps=sp.steps + live,
        proposed=sp.proposed + (positions < proposed[:, None]),
        accepted=sp.accepted + (positions < accepted[:, None]),
        draft_cache=draft_cache,
    )
    return s, sp


@functools.partial(
    jax.jit,
    static_argnames=("config", "plan", "logprobs_k", "draft_config"),
    donate_argnames=("state", "spec"),
)
def spec_decode(
    params: dict,
    state: runner.DecodeState,
    spec: SpecState,
    st: sampling.SamplingTensors,
    limits: runner.Limits,
    num_steps: Int[Array, ""],
    draft_params: dict | None = None,
    medusa_heads: dict | None = None,
    *,
    config: ModelConfig,
    plan: Plan,
    logprobs_k: int | None,
    draft_config: ModelConfig | None = None,
) -> tuple[runner.DecodeState, SpecState]:
    """Up to `num_steps` speculative steps (each emits 1 to k+1 tokens per row), stopping once all
    rows are done."""
    capacity = state.tokens.shape[1]

    def cond(carry):
        i, s, _ = carry
        return (i < num_steps) & ~jnp.all(s.done) & (i < capacity)

    def body(carry):
        i, s, sp = carry
        if plan.method == "medusa":
            from jaxllm.speculative.medusa_step import medusa_step

            s, sp = medusa_step(params, medusa_heads, s, sp, st, limits, config=config, plan=plan,
                                logprobs_k=logprobs_k)
        else:
            s, sp = _chain_step(params, s, sp, st, limits, draft_params, config=config, plan=plan,
                                logprobs_k=logprobs_k, draft_config=draft_config)
        return i + 1, s, sp

    _, state, spec = jax.lax.while_loop(cond, body, (jnp.int32(0), state, spec))
    return state, spec
