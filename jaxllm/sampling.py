"""On-device batched sampling: penalties, temperature, top-k/top-p/min-p, logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, UInt32

from jaxllm.sampling_params import GREEDY_EPS, SEED_MAX, SEED_MIN, SamplingParams

# The static sampling paths a jitted step compiles for, chosen on the host from the batch's params
# (`sampling_mode`): "greedy" takes the argmax; "unsorted" also draws the rows that neither top-k
# nor top-p restricts, without sorting the vocabulary; "sorted" draws every kind of row. "auto"
# picks among them on the device with `lax.cond`, whose predicate XLA's GPU runtime copies to the
# host: a host-device round trip per call (or per loop iteration) that keeps dispatch synchronous.
SAMPLING_MODES = ("greedy", "unsorted", "sorted")


class SamplingTensors(NamedTuple):
    """Per-row sampling parameters; one row per request, padded rows are greedy."""

    temperature: Float[Array, "B"]
    top_k: Int[Array, "B"]  # vocab_size when off
    top_p: Float[Array, "B"]
    min_p: Float[Array, "B"]
    repetition_penalty: Float[Array, "B"]
    presence_penalty: Float[Array, "B"]
    frequency_penalty: Float[Array, "B"]
    keys: UInt32[Array, "B 2"]  # raw threefry key data, jax.random.PRNGKey(seed)
    step_offset: Int[Array, "B"]  # added to the step that picks a row's key (a loop resumed mid-output)


def seed_key_data(seed: int) -> np.ndarray:
    """Threefry key data for `seed`: [high 32 bits, low 32 bits] of seed mod 2**64.

    Equals jax.random.PRNGKey(seed) for 0 <= seed < 2**32 (and for every int64 seed under x64).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {seed!r}")
    s = int(seed) % 2**64
    return np.array([s >> 32, s & 0xFFFFFFFF], dtype=np.uint32)


def make_sampling_tensors(
    params: Sequence[SamplingParams], seeds: Sequence[int], batch_size: int, vocab_size: int,
    step_offsets: Sequence[int] | None = None,
) -> SamplingTensors:
    """Pack per-request params and seeds into host (numpy) arrays padded to `batch_size` rows.

    `step_offsets[i]` (default 0) is added to the step numbers that row i is sampled with, so a
    loop that counts steps from its own start draws what one counting from the output's start would.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer at least 1, got {batch_size!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an integer at least 1, got {vocab_size!r}")
    if len(params) > batch_size:
        raise ValueError(f"len(params) must be at most batch_size={batch_size}, got {len(params)}")
    if len(seeds) != len(params):
        raise ValueError(f"len(seeds) must equal len(params)={len(params)}, got {len(seeds)}")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
    step_offsets = [0] * len(params) if step_offsets is None else list(step_offsets)
    if len(step_offsets) != len(params):
        raise ValueError(f"len(step_offsets) must equal len(params)={len(params)}, got {len(step_offsets)}")

    def col(values, pad, dtype):
        out = np.full((batch_size,), pad, dtype=dtype)
        out[: len(values)] = values
        return out

    top_k = [vocab_size if p.top_k <= 0 else min(p.top_k, vocab_size) for p in params]
    keys = np.zeros((batch_size, 2), dtype=np.uint32)
    for i, s in enumerate(seeds):
        keys[i] = seed_key_data(s)
    f32 = np.float32
    return SamplingTensors(
        temperature=col([p.temperature for p in params], 0.0, f32),
        top_k=col(top_k, vocab_size, np.int32),
        top_p=col([p.top_p for p in params], 1.0, f32),
        min_p=col([p.min_p for p in params], 0.0, f32),
        repetition_penalty=col([p.repetition_penalty for p in params], 1.0, f32),
        presence_penalty=col([p.presence_penalty for p in params], 0.0, f32),
        frequency_penalty=col([p.frequency_penalty for p in params], 0.0, f32),
        keys=keys,
        step_offset=col(step_offsets, 0, np.int32),
    )


def _filters(p: SamplingParams, vocab_size: int) -> bool:
    return p.temperature >= GREEDY_EPS and (0 < p.top_k < vocab_size or p.top_p < 1.0)


def sampling_mode(params: Sequence[SamplingParams], vocab_size: int, greedy: bool = True) -> str:
    """The cheapest of SAMPLING_MODES that samples every row of `params` right; `greedy=False`
    answers "unsorted" for an all-greedy batch (one executable fewer to compile)."""
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
    if any(_filters(p, vocab_size) for p in params):
        return "sorted"
    if greedy and all(p.greedy for p in params):
        return "greedy"
    return "unsorted"


def check_mode(mode: str) -> None:
    if mode not in SAMPLING_MODES + ("auto",):
        raise ValueError(f"sampling mode must be one of {SAMPLING_MODES + ('auto',)}, got {mode!r}")


def _check_batch(logits, st: SamplingTensors, **arrays) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, V), got shape {tuple(logits.shape)}")
    b, v = logits.shape
    for name, x in arrays.items():
        want = (b,) if name == "step" or name == "tokens" else (b, v)
        if tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got shape {tuple(x.shape)}")
    if st is not None:
        for name, x in st._asdict().items():
            want = (b, 2) if name == "keys" else (b,)
            got = tuple(np.shape(x))
            if got != want:
                raise ValueError(f"SamplingTensors.{name} must have shape {want}, got shape {got}")


def apply_penalties(
    logits: Float[Array, "B V"],
    prompt_mask: Bool[Array, "B V"],
    output_counts: Int[Array, "B V"],
    st: SamplingTensors,
) -> Float[Array, "B V"]:
    """Repetition (prompt and output tokens), presence and frequency (output tokens) penalties."""
    _check_batch(logits, st, prompt_mask=prompt_mask, output_counts=output_counts)
    logits = logits.astype(jnp.float32)
    counts = output_counts.astype(jnp.float32)
    in_output = output_counts > 0
    rep = st.repetition_penalty.astype(jnp.float32)[:, None]
    # HF RepetitionPenaltyLogitsProcessor: shrink positive logits, push non-positive ones down.
    penalised = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(prompt_mask | in_output, penalised, logits)
    logits = logits - st.presence_penalty.astype(jnp.float32)[:, None] * in_output
    return logits - st.frequency_penalty.astype(jnp.float32)[:, None] * counts


def _kept_sorted(logits, temperature, top_k, top_p, min_p):
    """One row's logits / temperature sorted descending, their vocabulary ids, and which of them
    top-k, top-p and min-p keep (the most likely token always)."""
    v = logits.shape[-1]
    scaled = logits / temperature
    order = jnp.argsort(-scaled)
    srt = scaled[order]
    rank = jnp.arange(v)
    k = jnp.where(top_k <= 0, v, jnp.minimum(top_k, v))
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, srt, -jnp.inf))
    cum = jnp.cumsum(probs)
    before = jnp.concatenate([jnp.zeros((1,), cum.dtype), cum[:-1]])
    # Keep the smallest prefix whose mass reaches top_p; top_p >= 1 is off (avoids cumsum rounding).
    keep &= (before < top_p) | (top_p >= 1.0)
    # min-p is a ratio to the max prob, so it is the same before or after renormalisation.
    keep &= srt >= srt[0] + jnp.log(min_p)
    return order, srt, keep.at[0].set(True)


def _row_key(key, step):
    return jax.random.fold_in(jax.random.wrap_key_data(key, impl="threefry2x32"), step)


def _sample_row(logits, temperature, top_k, top_p, min_p, key, step):
    """Draw one token from one row of already-penalised, non-greedy logits."""
    order, srt, keep = _kept_sorted(logits, temperature, top_k, top_p, min_p)
    choice = jax.random.categorical(_row_key(key, step), jnp.where(keep, srt, -jnp.inf))
    return order[choice]


def _sample_row_unsorted(logits, temperature, min_p, key, step):
    """Draw one token from a row that neither top-k nor top-p restricts: no sort of the vocabulary
    (min-p compares with the maximum). Such a row always takes this path, whatever its batch."""
    scaled = logits / temperature
    keep = scaled >= jnp.max(scaled) + jnp.log(min_p)
    return jax.random.categorical(_row_key(key, step), jnp.where(keep, scaled, -jnp.inf))


def _probs_row(logits, temperature, top_k, top_p, min_p):
    order, srt, keep = _kept_sorted(logits, temperature, top_k, top_p, min_p)
    probs = jax.nn.softmax(jnp.where(keep, srt, -jnp.inf))
    return jnp.zeros_like(probs).at[order].set(probs)


def _probs_row_unsorted(logits, temperature, min_p):
    scaled = logits / temperature
    return jax.nn.softmax(jnp.where(scaled >= jnp.max(scaled) + jnp.log(min_p), scaled, -jnp.inf))


def target_probs(logits: Float[Array, "B V"], st: SamplingTensors, mode: str = "auto") -> Float[Array, "B V"]:
    """The distribution `sample` draws from, for already-penalised logits: one-hot on the argmax for
    greedy rows, else softmax(logits / temperature) restricted by top-k, top-p and min-p. `mode` as
    in `sample`."""
    check_mode(mode)
    _check_batch(logits, st)
    logits = logits.astype(jnp.float32)
    temperature = st.temperature.astype(jnp.float32)
    greedy = temperature < GREEDY_EPS
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    safe_t, min_p = jnp.where(greedy, 1.0, temperature), st.min_p.astype(jnp.float32)

    def mixed():
        if mode == "unsorted":
            probs = jax.vmap(_probs_row_unsorted)(logits, safe_t, min_p)
        else:
            probs = jax.vmap(_probs_row)(logits, safe_t, st.top_k.astype(jnp.int32), st.top_p.astype(jnp.float32),
                                         min_p)
        return jnp.where(greedy[:, None], one_hot, probs)

    if mode == "auto":
        return jax.lax.cond(jnp.all(greedy), lambda: one_hot, mixed)
    return one_hot if mode == "greedy" else mixed()


def sample(
    logits: Float[Array, "B V"],
    st: SamplingTensors,
    step: Int[Array, "B"],
    prompt_mask: Bool[Array, "B V"],
    output_counts: Int[Array, "B V"],
    mode: str = "auto",
) -> Int[Array, "B"]:
    """Apply penalties, then greedy (temperature < 1e-5) or seeded top-k/top-p/min-p sampling per row.

    `mode` is one of SAMPLING_MODES, chosen on the host by `sampling_mode` (a mode too small for a
    row samples it wrongly), or "auto": the same result, chosen on the device."""
    check_mode(mode)
    step = jnp.asarray(step)
    _check_batch(logits, st, step=step, prompt_mask=prompt_mask, output_counts=output_counts)
    logits = apply_penalties(logits, prompt_mask, output_counts, st)
    temperature = st.temperature.astype(jnp.float32)
    greedy = temperature < GREEDY_EPS
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    v = logits.shape[-1]
    top_k, top_p, min_p = st.top_k.astype(jnp.int32), st.top_p.astype(jnp.float32), st.min_p.astype(jnp.float32)
    safe_t = jnp.where(greedy, 1.0, temperature)
    keys = jnp.asarray(st.keys, dtype=jnp.uint32)
    steps = (step + jnp.asarray(st.step_offset, jnp.int32)).astype(jnp.uint32)
    sorted_rows = ~greedy & (((top_k > 0) & (top_k < v)) | (top_p < 1.0))

    def unsorted():
        return jax.vmap(_sample_row_unsorted)(logits, safe_t, min_p, keys, steps)

    def with_sort():
        return jnp.where(sorted_rows, jax.vmap(_sample_row)(logits, safe_t, top_k, top_p, min_p, keys, steps),
                         unsorted())

    def mixed(draw):
        return jnp.where(greedy, argmax, draw()).astype(jnp.int32)

    # The per-row sort over the whole vocabulary runs only when a row uses top-k or top-p (1.5 ms a
    # step at batch 128 of a 128k vocabulary on an H200); an all-greedy batch samples nothing.
    if mode == "greedy":
        return argmax
    if mode == "unsorted":
        return mixed(unsorted)
    if mode == "sorted":
        return mixed(with_sort)
    return jax.lax.cond(jnp.all(greedy), lambda: argmax,
                        lambda: mixed(lambda: jax.lax.cond(jnp.any(sorted_rows), with_sort, unsorted)))


def token_logprobs(
    logits: Float[Array, "B V"], tokens: Int[Array, "B"], k: int
) -> tuple[Float[Array, "B"], Int[Array, "B"], Int[Array, "B k"], Float[Array, "B k"]]:
    """Raw-model logprob and rank of `tokens`, plus the top-`k` ids and logprobs (descending)."""
    tokens = jnp.asarray(tokens)
    _check_batch(logits, None, tokens=tokens)
    v = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= v:
        raise ValueError(f"k must be a Python int in [0, {v}], got {k!r}")
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
    rank = 1 + jnp.sum(lp > chosen[:, None], axis=-1, dtype=jnp.int32)
    if k == 0:
        b = logits.shape[0]
        return chosen, rank, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), jnp.float32)
    top_lps, top_ids = jax.lax.top_k(lp, k)
    return chosen, rank, top_ids.astype(jnp.int32), top_lps
