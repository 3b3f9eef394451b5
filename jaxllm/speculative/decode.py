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
from jaxllm.speculative import acceptance, ngram, verify
from jaxllm.speculative.medusa_step import medusa_step
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


@functools.partial(jax.jit, static_argnames=("capacity", "k"))
def init_spec_state(
    tokens: np.ndarray, prompt_lens: np.ndarray, generated: Int[Array, "B T"], capacity: int, k: int,
    draft_cache: KVCache | None = None, hidden=None,
) -> SpecState:
    """History = prompts, then each row's first generated token (`generated[:, 0]`); room for
    `capacity` tokens. One compiled call: op by op, its six small ops cost a GPU generate call
    milliseconds (the slice of `generated` too, so it is taken here)."""
    batch = tokens.shape[0]
    first = generated[:, 0]
    history = jnp.zeros((batch, capacity), jnp.int32).at[:, :tokens.shape[1]].set(jnp.asarray(tokens))
    history = history.at[jnp.arange(batch), jnp.asarray(prompt_lens)].set(first, mode="drop")
    return SpecState(history, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, k), jnp.int32),
                     jnp.zeros((batch, k), jnp.int32), draft_cache, hidden)


def _chain_seen(k: int) -> np.ndarray:
    """[k+1, k+1]: position t of [last, d_1..d_k] has d_1..d_t as output before it (last already is)."""
    t = np.arange(k + 1)
    return (t[None, :] >= 1) & (t[None, :] <= t[:, None])


_DRAFT_SALT = 0xD0


def propose_draft(draft_params, cache: KVCache, history, page_table, last, p, live, st, step, *,
                  draft_config: ModelConfig, k: int, sampling_mode: str = "auto"):
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
        q = sampling.target_probs(logits, st, sampling_mode)
        d = acceptance.draw(acceptance.row_keys(st.keys, step, _DRAFT_SALT + i, 1)[:, 0], q)
        drafts.append(d)
        dists.append(q)
        if i < k - 1:
            pos = jnp.where(live, p + 1 + i, -1)[:, None]
            meta = AttentionMeta(pos, page_table, jnp.where(live, p + 2 + i, 0))
            hidden, cache = model.forward_hidden(draft_params, d[:, None], meta, cache, draft_config)
            logits = model.logits(draft_params, hidden[:, 0])
    return jnp.stack(drafts, axis=1), jnp.stack(dists, axis=1), cache


def _chain_step(params, s: runner.DecodeState, sp: SpecState, st, limits, draft_params, *,
                config, plan: Plan, logprobs_k, draft_config, sampling_mode, penalties):
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
            draft_config=draft_config, k=k, sampling_mode=sampling_mode)
        proposed = jnp.full_like(n, k)
    proposed = jnp.where(live, proposed, 0)

    def check(cache):
        tokens = jnp.concatenate([last[:, None], drafts], axis=1)
        pos = jnp.where(live[:, None], p[:, None] + jnp.arange(k + 1), -1)
        meta = AttentionMeta(pos, s.page_table, jnp.where(live, p + k + 1, 0))
        hidden, cache = model.forward_hidden(params, tokens, meta, cache, config)
        logits = model.logits(params, hidden)  # [B, k+1, V]
        scores = verify.penalised(logits, s, st, tokens, _chain_seen(k), penalties)

        def greedy():  # one-hot targets make rejection sampling "keep while equal to the argmax"
            best = jnp.argmax(scores, axis=-1).astype(jnp.int32)
            return acceptance.accept_greedy_chain(best, drafts, proposed)

        def sampled():
            probs = verify.target_probs(scores, st, sampling_mode)
            return acceptance.accept_chain(probs, drafts, proposed, st.keys, n, draft_probs)

        verdict = verify.choose_verdict(sampling_mode, st, greedy, sampled)
        emitted = jnp.concatenate([drafts, jnp.zeros_like(last)[:, None]], axis=1)
        emitted = emitted.at[rows, verdict.num_accepted].set(verdict.next_token)
        return cache, emitted, verdict.num_accepted, verify.logprobs(logits, emitted, logprobs_k)

    def plain(cache):  # exactly runner.decode's step
        pos = jnp.where(live, p, -1)
        meta = AttentionMeta(pos[:, None], s.page_table, pos + 1)
        hidden, cache = model.forward_hidden(params, last[:, None], meta, cache, config)
        logits = model.logits(params, hidden[:, 0])
        token = sampling.sample(logits, st, n, s.prompt_mask, s.output_counts, sampling_mode)
        emitted = jnp.zeros((rows.shape[0], k + 1), jnp.int32).at[:, 0].set(token)
        lp = verify.logprobs(logits[:, None], token[:, None], logprobs_k)
        if lp is not None:
            lp = jax.tree.map(lambda x: jnp.pad(x, [(0, 0), (0, k)] + [(0, 0)] * (x.ndim - 2)), lp)
        return cache, emitted, jnp.zeros_like(n), lp

    if plan.method == "ngram" and plan.skip_when_empty:
        cache, emitted, accepted, lp = jax.lax.cond(jnp.any(proposed > 0), check, plain, s.cache)
    else:
        cache, emitted, accepted, lp = check(s.cache)
    s = runner.record(s._replace(cache=cache), emitted, accepted + 1, limits, lp)
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
    static_argnames=("config", "plan", "logprobs_k", "draft_config", "sampling_mode", "penalties", "check_every"),
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
    sampling_mode: str = "auto",
    penalties: bool | None = None,
    check_every: int = 1,
) -> tuple[runner.DecodeState, SpecState]:
    """Up to `num_steps` speculative steps (each emits 1 to k+1 tokens per row), stopping once all
    rows are done, looked at every `check_every` steps (`runner.steps_while`). `sampling_mode` as in
    `sampling.sample`; `penalties`: whether some row has one (None: looked at on the device)."""
    runner.check_steps(check_every)

    def one_step(i, carry):
        # past num_steps (the last check's remainder) every row sits out this step, as if done
        s, sp = carry
        done = s.done
        s = s._replace(done=done | (i >= num_steps))
        if plan.method == "medusa":
            s, sp = medusa_step(params, medusa_heads, s, sp, st, limits, config=config, plan=plan,
                                logprobs_k=logprobs_k, sampling_mode=sampling_mode, penalties=penalties)
        else:
            s, sp = _chain_step(params, s, sp, st, limits, draft_params, config=config, plan=plan,
                                logprobs_k=logprobs_k, draft_config=draft_config, sampling_mode=sampling_mode,
                                penalties=penalties)
        return s._replace(done=jnp.where(i >= num_steps, done, s.done)), sp

    state, spec = runner.steps_while(one_step, (state, spec), num_steps, state.tokens.shape[1],
                                     lambda c: jnp.all(c[0].done), check_every)
    return state, spec
