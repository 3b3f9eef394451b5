"""Building a request's CompletionOutput from its generated tokens (host side, shared by the
batch generator and the engine)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxllm.detokenize import decode, find_stop_string
from jaxllm.outputs import CompletionOutput, Logprob
from jaxllm.requests import Request


def logprob_dict(tokenizer, top_ids, top_lps, token: int, token_lp: float, token_rank: int) -> dict[int, Logprob]:
    """{token id: Logprob} of the top candidates (ranks 1..k) and the chosen token."""
    text = (lambda t: decode(tokenizer, [t], False)) if tokenizer is not None else (lambda t: None)
    out = {int(t): Logprob(float(lp), r, text(int(t))) for r, (t, lp) in enumerate(zip(top_ids, top_lps), 1)}
    out[int(token)] = Logprob(float(token_lp), int(token_rank), text(int(token)))
    return out


def build_completion(
    tokenizer,
    req: Request,
    token_ids: Sequence[int],
    finish: str | None,
    logprob: Sequence[float] | None = None,
    rank: Sequence[int] | None = None,
    top_ids=None,
    top_lps=None,
) -> CompletionOutput:
    """Text, stop-string cut, finish reason and logprobs of one request's output so far.

    `finish` is "stop" (a stop token), "length", or None (running); per-token logprob arrays are
    indexed like `token_ids`, top ids/lps as [token, k].
    """
    p = req.params
    ids = [int(t) for t in token_ids]
    stop_reason = ids[-1] if finish == "stop" and ids and ids[-1] in p.stop_token_ids else None
    text = None
    hit = find_stop_string(tokenizer, ids, p.stop, p.skip_special_tokens)
    if hit is not None:
        kept, offset, stop = hit
        ids = ids[:kept]
        full = decode(tokenizer, ids, p.skip_special_tokens)
        text = full[:offset + (len(stop) if p.include_stop_str_in_output else 0)]
        finish, stop_reason = "stop", stop
    if text is None:
        text = decode(tokenizer, ids, p.skip_special_tokens)

    logprobs = cumulative = None
    if p.logprobs is not None:
        k = p.logprobs
        logprobs = [logprob_dict(tokenizer, top_ids[j][:k], top_lps[j][:k], ids[j], logprob[j], rank[j])
                    for j in range(len(ids))]
        cumulative = float(np.sum(np.asarray(logprob[:len(ids)], np.float64)))
    return CompletionOutput(req.sample_index, text, ids, cumulative, logprobs, finish, stop_reason)
