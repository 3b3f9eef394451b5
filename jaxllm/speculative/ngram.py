"""n-gram (prompt lookup) proposals: continue the sequence the way the latest earlier occurrence of
its last n tokens continued, trying n from a maximum down to a minimum. Runs on the device.

The latest occurrence rather than the first (vLLM's choice): on the bundled model, greedy, k = 4, on
the H200, it raised the tokens per step from 2.41 to 2.95 on the speculative benchmark's rewrite and
from 4.37 / 2.69 / 1.47 to 4.89 / 2.71 / 1.66 on its three completions (BENCHMARKS.md, fifteenth
session): text that recurs tends to continue the way it did most recently.

When that occurrence ends fewer than k tokens before the history does, the text between them is
taken to repeat: a row stuck on one token, or on a short cycle, gets a full proposal of it (the 8B
random-weight model's outputs did this; cutting the proposal at the history's end held its speedup
at 1.47x with 2 tokens a step, against 3.23x for the first-occurrence rule, which finds an
occurrence far back)."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Int


def propose_ngram(
    history: Int[Array, "B H"],
    length: Int[Array, "B"],
    *,
    k: int,
    n_max: int,
    n_min: int,
) -> tuple[Int[Array, "B k"], Int[Array, "B"]]:
    """Up to `k` tokens per row following the latest earlier occurrence of the row's last n tokens.

    `history[b, :length[b]]` is row b's prompt and output so far. The longest n in [n_min, n_max]
    with a match wins. A continuation that reaches the history's end goes on as an overlapping copy
    (LZ77's): token j comes from the span between the match and the end, taken cyclically. Returns
    (tokens, how many are real): k wherever a match was found, else 0.
    """
    if not 1 <= n_min <= n_max:
        raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {n_min}, {n_max}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    batch, size = history.shape
    rows = jnp.arange(batch)[:, None]
    drafts = jnp.zeros((batch, k), jnp.int32)
    count = jnp.zeros((batch,), jnp.int32)
    found_any = jnp.zeros((batch,), bool)
    for n in range(n_max, n_min - 1, -1):  # longest first: a later (shorter) match never overrides
        if n >= size:
            continue
        suffix = history[rows, jnp.maximum(length[:, None] - n + jnp.arange(n), 0)]  # [B, n]
        starts = jnp.arange(size - n + 1)
        match = jnp.ones((batch, size - n + 1), bool)
        for i in range(n):
            match &= history[:, i:size - n + 1 + i] == suffix[:, i:i + 1]
        # The continuation must start inside the history, so the suffix itself never matches.
        match &= starts[None] + n < length[:, None]
        match &= (length >= n + 1)[:, None]
        found = jnp.any(match, axis=1) & ~found_any
        latest = match.shape[1] - 1 - jnp.argmax(match[:, ::-1], axis=1)
        begin = latest + n
        span = jnp.maximum(length - begin, 1)  # at least 1 where found: the continuation starts inside
        take = history[rows, jnp.minimum(begin[:, None] + jnp.arange(k)[None] % span[:, None], size - 1)]
        drafts = jnp.where(found[:, None], take, drafts)
        count = jnp.where(found, k, count)
        found_any |= found
    return drafts.astype(jnp.int32), count.astype(jnp.int32)
