"""Perplexity of texts under an `LLM`, with the sliding window of the Hugging Face perplexity guide."""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float

from jaxllm import runner
from jaxllm.llm import bucket

DEFAULT_MAX_WINDOW = 1024


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of several texts together and of each one."""

    perplexity: float  # exp(nll / num_tokens) over all texts together
    nll: float  # summed negative log-likelihood, nats
    num_tokens: int  # tokens scored (each text's tokens after its first)
    seconds: float
    tokens_per_s: float
    per_text: tuple[float, ...]  # perplexity of each text
    # With return_token_nll: per text, the NLL of its tokens 1..L-1.
    token_nll: tuple[np.ndarray, ...] | None = dataclasses.field(default=None, compare=False, repr=False)


def _check_int(name: str, value, low: int, high: int | None = None, what: str = "") -> int:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{name} must be {allowed}{what}, got {value!r}")
    return int(value)


def _window_and_stride(llm, window: int | None, stride: int | None) -> tuple[int, int]:
    limit = llm.max_model_len
    if window is None:
        window = min(limit, DEFAULT_MAX_WINDOW)
    window = _check_int("window", window, 2, limit, " (max_model_len)")
    if stride is None:
        stride = window // 2
    return window, _check_int("stride", stride, 1, window, " (the window)")


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window: it reads tokens [begin, end) and scores tokens [first, end).

    Windows start at 0, stride, 2 * stride, ...; together they score every token after the first
    exactly once, each with all the left context its window holds. A stride equal to the window
    acts as window - 1: consecutive windows share a token so the one after a boundary has context.
    """
    _check_int("num_tokens", num_tokens, 1)
    window = _check_int("window", window, 2)
    step = min(_check_int("stride", stride, 1, window), window - 1)
    spans, begin, scored_to = [], 0, 1
    while scored_to < num_tokens:
        end = min(begin + window, num_tokens)
        spans.append((begin, end, scored_to))
        scored_to, begin = end, begin + step
    return spans


def tokenize(
    llm,
    texts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    add_bos: bool = False,
    labels: Sequence[str] | None = None,
) -> list[list[int]]:
    """Token ids of each text (ids pass through), checked to be in the vocabulary and at least 2 long.

    `labels` name the texts in error messages (default "text 0", "text 1", ...).
    """
    if isinstance(texts, (str, bytes)):
        texts = [texts]
    try:
        texts = list(texts)
    except TypeError:
        raise ValueError(f"texts must be a list of strings or of token-id lists, got {type(texts).__name__}")
    if not texts:
        raise ValueError("texts is empty: perplexity needs at least one text")
    if labels is None:
        labels = [f"text {i}" for i in range(len(texts))]
    if len(labels) != len(texts):
        raise ValueError(f"got {len(labels)} labels for {len(texts)} texts")
    tok, vocab = llm.tokenizer, llm.config.vocab_size
    bos = None
    if add_bos:
        bos = getattr(tok, "bos_token_id", None)
        bos = bos if bos is not None else llm.config.bos_token_id
        if bos is None:
            raise ValueError("add_bos=True but neither the tokenizer nor the config has a BOS token")
    out = []
    for label, text in zip(labels, texts):
        if isinstance(text, str):
            if tok is None:
                raise ValueError(f"{label} is a string but the LLM has no tokenizer "
                                 "(skip_tokenizer_init=True); pass token ids instead")
            if not text:
                raise ValueError(f"{label} is empty")
            ids = list(tok.encode(text, add_special_tokens=False))
        elif isinstance(text, (Sequence, np.ndarray)) and not isinstance(text, bytes):
            ids = list(np.asarray(text).reshape(-1)) if isinstance(text, np.ndarray) else list(text)
            if not ids:
                raise ValueError(f"{label} is empty")
            bad = [t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)
                   or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{label} has token id {bad[0]!r} outside the vocabulary [0, {vocab})")
        else:
            raise ValueError(f"{label} has type {type(text).__name__}; expected str or a list of token ids")
        ids = ([bos] if bos is not None else []) + [int(t) for t in ids]
        if len(ids) < 2:
            raise ValueError(f"{label} has {len(ids)} token; perplexity needs at least 2")
        out.append(ids)
    return out


def _score(llm, texts: list[list[int]], window: int, stride: int, batch_size: int) -> list[np.ndarray]:
    """Per text, the NLL (float64) of each token after the first."""
    jobs = [(t, *span) for t, ids in enumerate(texts) for span in windows(len(ids), window, stride)]
    jobs.sort(key=lambda job: job[1] - job[2])  # longest first, so a batch's rows have similar lengths
    batches = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        rows = min(batch_size, bucket(len(batch)))
        length = min(bucket(max(end - begin for _, begin, end, _ in batch), 16), window)
        tokens = np.zeros((rows, length), np.int32)
        lengths = np.zeros(rows, np.int32)  # rows past the batch stay empty
        for row, (t, begin, end, _) in enumerate(batch):
            tokens[row, :end - begin] = texts[t][begin:end]
            lengths[row] = end - begin
        # Dispatch every batch before reading any back, so the host never stalls the device.
        batches.append((batch, runner.score(llm.params, tokens, lengths, config=llm.config)))
    nll = [np.zeros(len(ids) - 1) for ids in texts]
    for batch, logp in batches:
        logp = np.asarray(logp, np.float64)
        for row, (t, begin, end, first) in enumerate(batch):
            # logp[row, j] scores token begin + j + 1; nll[t][i] is token i + 1.
            nll[t][first - 1:end - 1] = -logp[row, first - begin - 1:end - begin - 1]
    return nll


def perplexity(
    llm,
    texts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    add_bos: bool = False,
    return_token_nll: bool = False,
) -> PerplexityResult:
    """Perplexity of `texts` (strings, or lists of token ids) under `llm`, with a sliding window.

    window: most tokens the model sees at once (default min(max_model_len, 1024)).
    stride: tokens between window starts (default window // 2).
    batch_size: windows scored together.
    add_bos: put the BOS token before each text (it is context, never scored).
    return_token_nll: also return each text's per-token NLL.
    """
    window, stride = _window_and_stride(llm, window, stride)
    batch_size = _check_int("batch_size", batch_size, 1)
    ids = tokenize(llm, texts, add_bos=add_bos)
    start = time.perf_counter()
    nll = _score(llm, ids, window, stride, batch_size)
    seconds = time.perf_counter() - start
    total = float(sum(x.sum() for x in nll))
    count = sum(x.size for x in nll)
    return PerplexityResult(
        perplexity=float(np.exp(total / count)),
        nll=total,
        num_tokens=count,
        seconds=seconds,
        tokens_per_s=count / seconds if seconds > 0 else math.inf,
        per_text=tuple(float(np.exp(x.mean())) for x in nll),
        token_nll=tuple(nll) if return_token_nll else None,
    )


def token_nll(
    llm,
    ids: str | Sequence[int],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    add_bos: bool = False,
) -> Float[np.ndarray, "L-1"]:
    """NLL in nats of each token of one text after its first (entry i is token i + 1)."""
    window, stride = _window_and_stride(llm, window, stride)
    batch_size = _check_int("batch_size", batch_size, 1)
    return _score(llm, tokenize(llm, [ids], add_bos=add_bos), window, stride, batch_size)[0]
