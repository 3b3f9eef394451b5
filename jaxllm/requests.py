"""Turning what users pass to `generate` into validated requests."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from jaxllm.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
    """One sequence to generate: sample `sample_index` of prompt `request_id`."""

    request_id: str
    sample_index: int
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    seed: int  # the params' seed, or one drawn for this request


def _as_prompt(item: Any, index: int, tokenizer) -> tuple[str | None, list[int]]:
    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError(
                f"prompt {index} is text but the LLM has no tokenizer (skip_tokenizer_init=True); "
                "pass {'prompt_token_ids': [...]} instead"
            )
        return item, tokenizer.encode(item)
    if isinstance(item, Mapping):
        if "prompt_token_ids" in item:
            return item.get("prompt"), list(item["prompt_token_ids"])
        if "prompt" in item:
            return _as_prompt(item["prompt"], index, tokenizer)
        raise ValueError(f"prompt {index} is a dict without 'prompt' or 'prompt_token_ids': {sorted(item)}")
    raise ValueError(
        f"prompt {index} has type {type(item).__name__}; expected str or a dict with 'prompt_token_ids'"
    )


def _token_ids(ids: list, index: int, vocab_size: int) -> list[int]:
    """`ids` as plain ints, each in [0, vocab_size)."""
    if all(type(t) is int for t in ids) and 0 <= min(ids) and max(ids) < vocab_size:
        return ids  # the usual case, without an ABC check per token
    bad = [t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt {index} has token id {bad[0]!r} outside the vocabulary [0, {vocab_size})")
    return [int(t) for t in ids]  # numpy integers from array prompts become plain ints


def make_requests(
    prompts: Any,
    params: SamplingParams | Sequence[SamplingParams] | None,
    *,
    tokenizer,
    vocab_size: int,
    max_model_len: int,
    next_seed,
    first_id: int = 0,
) -> list[Request]:
    """Validated requests, one per (prompt, sample) pair; `n > 1` expands into n requests."""
    if isinstance(prompts, (str, Mapping)):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate() needs at least one prompt, got an empty list")
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    params = list(params)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one or one per prompt")

    requests = []
    for i, (item, p) in enumerate(zip(prompts, params)):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params[{i}] has type {type(p).__name__}; expected SamplingParams")
        text, ids = _as_prompt(item, i, tokenizer)
        if not ids:
            raise ValueError(f"prompt {i} is empty: at least one token is needed")
        ids = _token_ids(ids, i, vocab_size)
        if len(ids) >= max_model_len:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens, but max_model_len is {max_model_len}: "
                f"prompts must be shorter than max_model_len to leave room for output"
            )
        p.validate_against_vocab(vocab_size)
        if p.stop and tokenizer is None:
            raise ValueError(f"sampling_params[{i}] has stop strings {p.stop!r}, which need a tokenizer "
                             "(the LLM was made with skip_tokenizer_init=True); use stop_token_ids instead")
        for j in range(p.n):
            seed = next_seed() if p.seed is None else p.seed + j
            requests.append(Request(str(first_id + i), j, text, tuple(ids), p, seed))
    return requests
