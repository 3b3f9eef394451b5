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


class IncrementalDetokenizer:
    """The text of a growing output, decoding only a window of recent tokens per update (the
    offsets scheme of TGI and vLLM), so a stream costs O(new tokens) a step rather than O(output).

    The text holds back an incomplete character (a byte-level token that ends mid UTF-8). It equals
    `decode(ids)` up to that; a finished output is decoded whole by the caller anyway.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.text = ""
        self._prefix = 0  # window start: tokens before it are in `text` for good
        self._read = 0  # tokens up to here are in `text`
        self._seen = 0

    def update(self, ids: Sequence[int]) -> str:
        """The text of `ids`, the same tokens as last time plus any new ones at the end."""
        if self.tokenizer is None or len(ids) == self._seen:
            return self.text
        self._seen = len(ids)
        before = decode(self.tokenizer, ids[self._prefix:self._read], self.skip_special_tokens)
        now = decode(self.tokenizer, ids[self._prefix:], self.skip_special_tokens)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(ids)
        return self.text
