"""Per-request sampling parameters (vLLM field names and defaults)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

GREEDY_EPS = 1e-5  # temperatures below this mean greedy, as in vLLM
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1  # torch.manual_seed's accepted range


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value: object, test, allowed: str) -> int:
    if not _is_int(value) or not test(int(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _check_real(name: str, value: object, test, allowed: str) -> float:
    if not _is_real(value) or not math.isfinite(value) or not test(float(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request; validated and normalised on construction."""

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("n", _check_int("n", self.n, lambda v: v >= 1, "at least 1"))
        put("max_tokens", _check_int("max_tokens", self.max_tokens, lambda v: v >= 1, "at least 1"))
        put(
            "temperature",
            _check_real("temperature", self.temperature, lambda v: v >= 0.0, "finite and >= 0"),
        )
        put("top_p", _check_real("top_p", self.top_p, lambda v: 0.0 < v <= 1.0, "in (0, 1]"))
        put(
            "top_k",
            _check_int("top_k", self.top_k, lambda v: v >= -1, "-1 or 0 (off) or a positive integer"),
        )
        put("min_p", _check_real("min_p", self.min_p, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"))
        put(
            "repetition_penalty",
            _check_real(
                "repetition_penalty", self.repetition_penalty, lambda v: v > 0.0, "finite and > 0"
            ),
        )
        for name in ("presence_penalty", "frequency_penalty"):
            put(name, _check_real(name, getattr(self, name), lambda v: -2.0 <= v <= 2.0, "in [-2, 2]"))
        if self.seed is not None:
            put(
                "seed",
                _check_int(
                    "seed",
                    self.seed,
                    lambda v: SEED_MIN <= v <= SEED_MAX,
                    f"None or an integer in [{SEED_MIN}, {SEED_MAX}]",
                ),
            )
        put("stop", self._normalise_stop(self.stop))
        put("stop_token_ids", self._normalise_stop_token_ids(self.stop_token_ids))
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                put(
                    name,
                    _check_int(
                        name,
                        value,
                        lambda v: 0 <= v <= MAX_LOGPROBS,
                        f"None or an integer in [0, {MAX_LOGPROBS}]",
                    ),
                )

    @staticmethod
    def _normalise_stop(stop: object) -> tuple[str, ...]:
        if stop is None:
            return ()
        items = (stop,) if isinstance(stop, str) else stop
        if not isinstance(items, Sequence):
            raise ValueError(f"stop must be None, a str or a sequence of str, got {stop!r}")
        for s in items:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {s!r} in {stop!r}")
        return tuple(items)

    @staticmethod
    def _normalise_stop_token_ids(ids: object) -> tuple[int, ...]:
        if ids is None:
            return ()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise ValueError(f"stop_token_ids must be None or a sequence of int, got {ids!r}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(
                    f"stop_token_ids must contain only non-negative integers, got {t!r} in {ids!r}"
                )
        return tuple(int(t) for t in ids)

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        """True when a repetition, presence or frequency penalty changes the logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate_against_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if stop ids or logprob counts exceed `vocab_size` (top_k is clamped instead)."""
        if not _is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer at least 1, got {vocab_size!r}")
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(
                f"stop_token_ids must be < vocab_size={vocab_size}, got {bad!r} in {self.stop_token_ids!r}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > vocab_size:
                raise ValueError(f"{name} must be at most vocab_size={vocab_size}, got {value!r}")
