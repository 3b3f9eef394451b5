"""Host-side text: decoding generated tokens and cutting at stop strings."""

from __future__ import annotations

from collections.abc import Sequence


def decode(tokenizer, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    if tokenizer is None:
        return ""
    return tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)


def find_stop_string(
    tokenizer, token_ids: Sequence[int], stops: Sequence[str], skip_special_tokens: bool = True
) -> tuple[int, int, str] | None:
    """First stop string in the decoded output: (tokens kept, character offset in their text, stop).

    Tokens kept is the shortest prefix whose text contains a stop string; containment only grows
    with the prefix, so a binary search finds it.
    """
    if not stops or len(token_ids) == 0:  # token_ids may be a numpy array
        return None

    def first_hit(n: int):
        text = decode(tokenizer, token_ids[:n], skip_special_tokens)
        hits = [(text.find(s), s) for s in stops if s in text]
        return min(hits) if hits else None

    if first_hit(len(token_ids)) is None:
        return None
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if first_hit(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    offset, stop = first_hit(lo)
    return lo, offset, stop
