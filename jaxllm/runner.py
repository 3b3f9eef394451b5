"""Jitted device steps: prefill of a padded batch, and the on-device decode loop.

The host calls `prefill` once per batch and `decode` one or more times; between calls nothing
per token crosses to the host. Shapes are bucketed by the caller so that these compile once per
(batch, prompt, output) bucket.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxllm import sampling
from jaxllm.config import ModelConfig
from jaxllm.kv_cache import AttentionMeta, KVCache
from models import get_model_spec

RUNNING, FINISHED_LENGTH, FINISHED_STOP = 0, 1, 2


class Limits(NamedTuple):
    """Per-request stop conditions."""

    stop_ids: Int[Array, "B S"]  # token ids that end the request, -1 padding
    max_tokens: Int[Array, "B"]
    max_model_len: Int[Array, ""]


class DecodeState(NamedTuple):
    """Everything the decode loop carries; row b is one request."""

    cache: KVCache
    page_table: Int[Array, "B Pmax"]
    prompt_lens: Int[Array, "B"]
    num_generated: Int[Array, "B"]
    done: Bool[Array, "B"]
    finish: Int[Array, "B"]
    tokens: Int[Array, "B N"]
    logprob: Float[Array, "B N"]
    rank: Int[Array, "B N"]
    top_ids: Int[Array, "B N K"]
    top_lps: Float[Array, "B N K"]
    prompt_mask: Bool[Array, "B V"]
    output_counts: Int[Array, "B V"]


def new_decode_state(cache: KVCache, page_table, prompt_lens, num_generated, done, tokens: Int[Array, "B N"],
                     prompt_mask, output_counts, logprobs_k: int | None) -> DecodeState:
    """A DecodeState whose finish codes and logprob buffers start empty, sized like `tokens`."""
    batch, width = tokens.shape
    k = logprobs_k or 0
    return DecodeState(
        cache=cache, page_table=page_table, prompt_lens=prompt_lens, num_generated=num_generated, done=done,
        finish=jnp.zeros(batch, jnp.int32), tokens=tokens,
        logprob=jnp.zeros((batch, width), jnp.float32), rank=jnp.zeros((batch, width), jnp.int32),
        top_ids=jnp.zeros((batch, width, k), jnp.int32), top_lps=jnp.zeros((batch, width, k), jnp.float32),
        prompt_mask=prompt_mask, output_counts=output_counts,
    )


class PromptLogprobs(NamedTuple):
    """Row b, index t: logprob of prompt token t+1 given tokens <= t, its rank, and the top k."""

    logprob: Float[Array, "B T"]
    rank: Int[Array, "B T"]
    top_ids: Int[Array, "B T K"]
    top_lps: Float[Array, "B T K"]


def finish_reason(tokens: Int[Array, "B T"], lengths: Int[Array, "B T"], prompt_lens: Int[Array, "B"],
                  limits: Limits) -> Int[Array, "B T"]:
    """Whether row b stops at tokens[b, t], with its output then `lengths[b, t]` long: a stop token,
    its length limit, or RUNNING."""
    hit_stop = jnp.any(tokens[..., None] == limits.stop_ids[:, None, :], axis=-1)
    too_long = ((lengths >= limits.max_tokens[:, None])
                | (prompt_lens[:, None] + lengths >= limits.max_model_len))
    return jnp.where(hit_stop, FINISHED_STOP, jnp.where(too_long, FINISHED_LENGTH, RUNNING))


def record(state: DecodeState, tokens: Int[Array, "B T"], num_tokens: Int[Array, "B"], limits: Limits,
           logprobs: tuple | None = None) -> DecodeState:
    """Appends tokens[b, :num_tokens[b]] to each running row, cut after its first stop token or where
    it reaches its length limit; `logprobs` is `sampling.token_logprobs`' tuple per token, [B, T, ...]."""
    batch, width = tokens.shape
    rows = jnp.arange(batch)[:, None]
    j = jnp.arange(width)[None]
    live = ~state.done
    n = state.num_generated[:, None]
    reason = finish_reason(tokens, n + j + 1, state.prompt_lens, limits)
    ends = (reason != RUNNING) & (j < num_tokens[:, None])
    kept = jnp.where(jnp.any(ends, axis=1), jnp.argmax(ends, axis=1) + 1, num_tokens)
    kept = jnp.where(live, kept, 0)
    keep = j < kept[:, None]
    at = jnp.where(keep, n + j, state.tokens.shape[1])  # past the output: dropped
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
        tokens=state.tokens.at[rows, at].set(tokens, mode="drop"),
        num_generated=state.num_generated + kept,
        output_counts=state.output_counts.at[rows, tokens].add(keep.astype(jnp.int32)),
        finish=jnp.where(ended, reason[rows[:, 0], jnp.maximum(kept - 1, 0)], state.finish),
        done=state.done | ended,
    )


def _record(state: DecodeState, logits, token, limits: Limits, logprobs_k: int | None,
            active: Bool[Array, "B"] | None = None) -> DecodeState:
    """Appends `token` to every running row (of those `active`, when given) and updates its stop state."""
    logprobs = None
    if logprobs_k is not None:
        logprobs = jax.tree.map(lambda x: x[:, None], sampling.token_logprobs(logits, token, logprobs_k))
    num_tokens = jnp.ones_like(token) if active is None else active.astype(jnp.int32)
    return record(state, token[:, None], num_tokens, limits, logprobs)


def check_steps(check_every: int) -> None:
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")


def steps_while(step, carry, num_steps: Int[Array, ""], capacity: int, all_done, check_every: int):
    """carry = step(i, carry) for i = 0, 1, ... while i < num_steps, i < capacity and not
    all_done(carry), looked at every `check_every` steps (so up to check_every - 1 steps more run:
    `step` must leave rows unchanged past num_steps). XLA's GPU runtime reads a while-loop predicate
    back to the host and the device idles while the host launches the next iteration, so rarer
    checks cost less; the inner loop's trip count is static, so nothing is read back inside it.
    Callers check `check_every` (`check_steps`) before tracing their loops."""

    def cond(c):
        i, x = c
        return (i < num_steps) & ~all_done(x) & (i < capacity)

    def body(c):
        i, x = c
        if check_every == 1:
            return i + 1, step(i, x)
        return i + check_every, jax.lax.fori_loop(0, check_every, lambda j, x: step(i + j, x), x)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), carry))[1]


# XLA's command buffers (CUDA graphs) are updated on the host before each call whose buffers moved,
# as a static prefill's do (a new cache and prompt every call): on the H200 that idled the GPU for
# 10 ms of a 63 ms 8B prefill of 2048 tokens (BENCHMARKS.md). Kernel launches overlap the GPU's
# work instead; the decode loops, whose steps are short, keep the graphs.
PREFILL_COMPILER_OPTIONS = {"xla_gpu_enable_command_buffer": ""}


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new", "logprobs_k", "prompt_logprobs_k", "return_hidden", "sampling_mode"),
    donate_argnames=("cache",),
    compiler_options=PREFILL_COMPILER_OPTIONS,
)
def prefill(
    params: dict,
    cache: KVCache,
    tokens: Int[Array, "B T"],
    prompt_lens: Int[Array, "B"],
    page_table: Int[Array, "B Pmax"],
    st: sampling.SamplingTensors,
    limits: Limits,
    *,
    config: ModelConfig,
    max_new: int,
    logprobs_k: int | None,
    prompt_logprobs_k: int | None,
    return_hidden: bool = False,
    sampling_mode: str = "auto",
):
    """Caches every prompt's K/V and samples each request's first token (`sampling.sample`'s `mode`).

    Returns (DecodeState, PromptLogprobs or None), plus each row's last hidden state [B, D] when
    `return_hidden` (Medusa heads read it)."""
    model = get_model_spec(config.architecture).model
    batch, length = tokens.shape
    t = jnp.arange(length)[None, :]
    positions = jnp.where(t < prompt_lens[:, None], t, -1)
    meta = AttentionMeta(positions, page_table, prompt_lens)
    hidden, cache = model.forward_hidden(params, tokens, meta, cache, config)
    rows = jnp.arange(batch)
    last = jnp.maximum(prompt_lens - 1, 0)
    logits = model.logits(params, hidden[rows, last])

    prompt_lp = None
    if prompt_logprobs_k is not None:
        all_logits = model.logits(params, hidden[:, :-1]).reshape(batch * (length - 1), -1)
        lp, rank, top_ids, top_lps = sampling.token_logprobs(
            all_logits, tokens[:, 1:].reshape(-1), prompt_logprobs_k)
        shape = (batch, length - 1)
        prompt_lp = PromptLogprobs(lp.reshape(shape), rank.reshape(shape),
                                   top_ids.reshape(*shape, -1), top_lps.reshape(*shape, -1))

    vocab = config.vocab_size
    valid = positions >= 0
    prompt_mask = jnp.zeros((batch, vocab), bool).at[rows[:, None], tokens].max(valid)
    state = new_decode_state(
        cache, page_table, prompt_lens, num_generated=jnp.zeros(batch, jnp.int32),
        done=prompt_lens <= 0,  # padding rows of the batch bucket
        tokens=jnp.zeros((batch, max_new), jnp.int32), prompt_mask=prompt_mask,
        output_counts=jnp.zeros((batch, vocab), jnp.int32), logprobs_k=logprobs_k,
    )
    token = sampling.sample(logits, st, state.num_generated, prompt_mask, state.output_counts, sampling_mode)
    state = _record(state, logits, token, limits, logprobs_k)
    if return_hidden:
        return state, prompt_lp, hidden[rows, last]
    return state, prompt_lp


@functools.partial(jax.jit, static_argnames=("config", "logprobs_k", "sampling_mode", "trip_count", "check_every"),
                   donate_argnames=("state",))
def decode(
    params: dict,
    state: DecodeState,
    st: sampling.SamplingTensors,
    limits: Limits,
    num_steps: Int[Array, ""],
    *,
    config: ModelConfig,
    logprobs_k: int | None,
    sampling_mode: str = "auto",
    trip_count: int | None = None,
    check_every: int = 1,
) -> DecodeState:
    """Up to `num_steps` decode steps, sampling with `sampling.sample`'s `mode`; rows done, or past
    `num_steps`, are left unchanged. `state.prompt_mask`/`output_counts` None (no row has a
    penalty) are zeros made on the device.

    With `trip_count` None, the steps stop once all rows are done or `num_steps` is reached, looked
    at every `check_every` steps (`steps_while`). With `trip_count`, exactly that many steps and no
    predicate on the host: the call returns before the loop runs."""
    model = get_model_spec(config.architecture).model
    rows = jnp.arange(state.tokens.shape[0])
    capacity = state.tokens.shape[1]
    if state.prompt_mask is None:  # no row has a penalty: the counts start here, nothing crosses
        shape = (state.tokens.shape[0], config.vocab_size)
        state = state._replace(prompt_mask=jnp.zeros(shape, bool), output_counts=jnp.zeros(shape, jnp.int32))
    if trip_count is not None and not 1 <= trip_count < capacity:
        raise ValueError(f"trip_count must be in [1, {capacity - 1}] (the output buffer's width - 1), "
                         f"got {trip_count}")
    check_steps(check_every)

    def step(i, s):
        frozen = s.done | (i >= num_steps) | (s.num_generated >= capacity)
        last = s.tokens[rows, jnp.maximum(s.num_generated - 1, 0)]
        position = jnp.where(frozen, -1, s.prompt_lens + s.num_generated - 1)
        meta = AttentionMeta(position[:, None], s.page_table, position + 1)
        hidden, cache = model.forward_hidden(params, last[:, None], meta, s.cache, config)
        s = s._replace(cache=cache)
        logits = model.logits(params, hidden[:, 0])
        token = sampling.sample(logits, st, s.num_generated, s.prompt_mask, s.output_counts, sampling_mode)
        return _record(s, logits, token, limits, logprobs_k, active=~frozen)

    if trip_count is not None:
        return jax.lax.fori_loop(0, trip_count, step, state)
    return steps_while(step, state, num_steps, capacity, lambda s: jnp.all(s.done), check_every)


@functools.partial(jax.jit, donate_argnames=("cache",))
def next_decode_state(
    cache: KVCache,
    state: DecodeState,
    st: sampling.SamplingTensors,
    limits: Limits,
    page_table: Int[Array, "B Pmax"],
    keep: Bool[Array, "B"],
) -> tuple[DecodeState, sampling.SamplingTensors, Limits]:
    """The inputs of a decode call that continues `state`'s rows where it left them (each row's
    output restarting from its last token, as the engine's decode visits begin), over `cache` and a
    grown `page_table`; rows not in `keep` (or done) sit it out. Penalty inputs None stay None
    (`decode` makes them). For async scheduling: built on the device before the host reads `state`."""
    rows = jnp.arange(state.tokens.shape[0])
    n = state.num_generated
    taken = jnp.maximum(n - 1, 0)  # tokens the last call added after its first
    k = state.top_ids.shape[2]
    new = new_decode_state(
        cache, page_table, state.prompt_lens + taken, num_generated=jnp.minimum(n, 1), done=state.done | ~keep,
        tokens=jnp.zeros_like(state.tokens).at[:, 0].set(state.tokens[rows, taken]),
        prompt_mask=state.prompt_mask, output_counts=state.output_counts, logprobs_k=k)
    return (new, st._replace(step_offset=st.step_offset + taken),
            limits._replace(max_tokens=limits.max_tokens - taken))


@functools.partial(jax.jit, static_argnames=("config",))
def score(
    params: dict, tokens: Int[Array, "B T"], lengths: Int[Array, "B"], *, config: ModelConfig
) -> Float[Array, "B T-1"]:
    """log p(tokens[b, t+1] | tokens[b, :t+1]) for every row, without a KV cache (0 past a row's length)."""
    model = get_model_spec(config.architecture).model
    t = jnp.arange(tokens.shape[1])[None, :]
    positions = jnp.where(t < lengths[:, None], t, -1)
    meta = AttentionMeta(positions, jnp.zeros((tokens.shape[0], 1), jnp.int32), lengths)
    hidden, _ = model.forward_hidden(params, tokens, meta, None, config)
    logp = jax.nn.log_softmax(model.logits(params, hidden[:, :-1]), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(t[:, 1:] < lengths[:, None], picked, 0.0)


@functools.partial(jax.jit, static_argnames=("config", "logprobs_k", "sampling_mode"), donate_argnames=("cache",))
def engine_step(
    params: dict,
    cache: KVCache,
    tokens: Int[Array, "B T"],
    meta: AttentionMeta,
    last: Int[Array, "B"],
    st: sampling.SamplingTensors,
    steps: Int[Array, "B"],
    prompt_mask: Bool[Array, "B V"] | None,
    output_counts: Int[Array, "B V"] | None,
    *,
    config: ModelConfig,
    logprobs_k: int | None,
    sampling_mode: str = "auto",
):
    """One engine step over a ragged batch: row b computes tokens at `meta.positions[b]` (prefill
    chunks and decodes alike, -1 padding), then samples a token from its position `last[b]`.
    `prompt_mask`/`output_counts` None (no row has penalties) are zeros made on the device.

    Returns (tokens [B], (logprob, rank, top_ids, top_lps) or None, cache).
    """
    model = get_model_spec(config.architecture).model
    hidden, cache = model.forward_hidden(params, tokens, meta, cache, config)
    logits = model.logits(params, hidden[jnp.arange(tokens.shape[0]), last])
    if prompt_mask is None:
        prompt_mask = jnp.zeros(logits.shape, bool)
        output_counts = jnp.zeros(logits.shape, jnp.int32)
    token = sampling.sample(logits, st, steps, prompt_mask, output_counts, sampling_mode)
    logprobs = sampling.token_logprobs(logits, token, logprobs_k) if logprobs_k is not None else None
    return token, logprobs, cache
