"""What the verify step does with the target's logits at T positions per row: penalties that count
the proposals before a position as output, the sampling distribution, and raw-model logprobs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxllm import runner, sampling


def tile(st: sampling.SamplingTensors, t: int) -> sampling.SamplingTensors:
    """Each row's sampling parameters repeated for its T positions (rows of a [B*T, V] batch)."""
    return jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), t, axis=0), st)


def _flat(x):
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def penalised(
    logits: Float[Array, "B T V"],
    state: runner.DecodeState,
    st: sampling.SamplingTensors,
    tokens: Int[Array, "B T"],
    seen: Bool[np.ndarray, "T T"],
    penalties: bool | None = None,
) -> Float[Array, "B T V"]:
    """Logits after penalties, float32. Position t counts tokens[:, u] as output where seen[t, u]
    (the proposals on its path, as they will be if accepted) besides the row's output so far.
    `penalties`: whether some row has one, known on the host (None: looked at on the device)."""
    batch, t, vocab = logits.shape

    def apply():
        one_hot = jax.nn.one_hot(tokens, vocab, dtype=jnp.float32)
        extra = jnp.einsum("tu,buv->btv", jnp.asarray(seen, jnp.float32), one_hot).astype(jnp.int32)
        out = sampling.apply_penalties(_flat(logits), jnp.repeat(state.prompt_mask, t, axis=0),
                                       _flat(state.output_counts[:, None] + extra), tile(st, t))
        return out.reshape(batch, t, vocab)

    if penalties is not None:
        return apply() if penalties else logits.astype(jnp.float32)
    neutral = (st.repetition_penalty == 1.0) & (st.presence_penalty == 0.0) & (st.frequency_penalty == 0.0)
    return jax.lax.cond(jnp.all(neutral), lambda: logits.astype(jnp.float32), apply)


def target_probs(penalised_logits: Float[Array, "B T V"], st: sampling.SamplingTensors,
                 mode: str = "auto") -> Float[Array, "B T V"]:
    """`sampling.target_probs` at every position."""
    batch, t, vocab = penalised_logits.shape
    return sampling.target_probs(_flat(penalised_logits), tile(st, t), mode).reshape(batch, t, vocab)


def choose_verdict(mode: str, st: sampling.SamplingTensors, greedy, sampled):
    """greedy() for an all-greedy batch, else sampled() (which takes greedy rows too): by the host's
    sampling mode, or on the device when it is "auto"."""
    sampling.check_mode(mode)
    if mode == "greedy":
        return greedy()
    if mode == "auto":
        return jax.lax.cond(jnp.all(st.temperature < sampling.GREEDY_EPS), greedy, sampled)
    return sampled()


def logprobs(logits: Float[Array, "B T V"], tokens: Int[Array, "B T"], k: int | None):
    """`sampling.token_logprobs` at every position, shaped [B, T, ...]; None when k is None."""
    if k is None:
        return None
    out = sampling.token_logprobs(_flat(logits), tokens.reshape(-1), k)
    return jax.tree.map(lambda x: x.reshape(tokens.shape + x.shape[1:]), out)
