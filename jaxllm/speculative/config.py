"""How to speculate: the user's `SpeculativeConfig` (vLLM's field names)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

METHODS = ("ngram", "draft_model", "medusa")
ACCEPTANCE = ("rejection", "typical")


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"speculative_config {name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding settings for `LLM(speculative_config=...)`.

    method: "ngram" (prompt lookup), "draft_model" (a smaller model with the same tokenizer, at
        `model`) or "medusa" (Medusa heads at `model`, FasterDecoding's format).
    num_speculative_tokens: tokens proposed per step (ngram, draft_model); for Medusa the number of
        heads used (default: all the heads), the tree's depth.
    prompt_lookup_max / prompt_lookup_min: the n-gram lengths tried, longest first.
    medusa_choices: the candidate tree as Medusa's list of paths of top-k ranks; None = Medusa's default
        tree (mc_sim_7b_63), cut to the heads used.
    acceptance: "rejection" keeps the target distribution exactly; "typical" (Medusa only) is Medusa's
        typical acceptance, which is approximate for temperature > 0 (greedy rows are exact either way).
    typical_threshold / typical_alpha: Medusa's posterior_threshold and posterior_alpha.
    disable_by_batch_size: batches of at least this many requests decode without speculation; None
        never; "auto" (default): never for models of at least 1 GB of weights, 8 for smaller ones,
        whose steps are too short for speculation's extra work per step to pay at larger batches
        (measured: the bundled model gains at batch 1 and loses at batch 16).
    allow_pickle: load Medusa heads from a pickle `.pt` file (only for trusted files).
    """

    method: str
    num_speculative_tokens: int | None = None
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None
    medusa_choices: tuple[tuple[int, ...], ...] | None = None
    acceptance: str = "rejection"
    typical_threshold: float = 0.09
    typical_alpha: float = 0.3
    disable_by_batch_size: int | str | None = "auto"
    allow_pickle: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r} not supported; choose one of {METHODS}")
        if self.num_speculative_tokens is None:
            if self.method != "medusa":
                object.__setattr__(self, "num_speculative_tokens", 4)
        else:
            _positive_int("num_speculative_tokens", self.num_speculative_tokens)
        _positive_int("prompt_lookup_min", self.prompt_lookup_min)
        _positive_int("prompt_lookup_max", self.prompt_lookup_max)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) must be "
                             f"<= prompt_lookup_max ({self.prompt_lookup_max})")
        if self.method in ("draft_model", "medusa") and not self.model:
            raise ValueError(f"speculative method {self.method!r} needs speculative_config model (a directory)")
        if self.method == "ngram" and self.model is not None:
            raise ValueError(f"speculative method 'ngram' takes no model, got {self.model!r}")
        if self.acceptance not in ACCEPTANCE:
            raise ValueError(f"speculative_config acceptance {self.acceptance!r} not supported; choose one "
                             f"of {ACCEPTANCE}")
        if self.acceptance == "typical" and self.method != "medusa":
            raise ValueError("acceptance='typical' is Medusa's; n-gram and draft models use 'rejection'")
        if not 0.0 <= self.typical_threshold <= 1.0 or not 0.0 <= self.typical_alpha <= 1.0:
            raise ValueError(f"typical_threshold and typical_alpha must be in [0, 1], got "
                             f"{self.typical_threshold}, {self.typical_alpha}")
        if self.disable_by_batch_size not in (None, "auto"):
            _positive_int("disable_by_batch_size", self.disable_by_batch_size, 2)
        if self.medusa_choices is not None:
            if self.method != "medusa":
                raise ValueError("medusa_choices applies to method='medusa' only")
            object.__setattr__(self, "medusa_choices", tuple(tuple(int(i) for i in c) for c in self.medusa_choices))

    @classmethod
    def of(cls, value: SpeculativeConfig | Mapping[str, Any] | None) -> SpeculativeConfig | None:
        """A SpeculativeConfig from itself, a dict of its fields (as vLLM takes), or None."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"speculative_config must be a dict or SpeculativeConfig, got {type(value).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {unknown}; allowed: {sorted(fields)}")
        if "method" not in value:
            raise ValueError("speculative_config needs 'method' (one of " + ", ".join(METHODS) + ")")
        return cls(**value)
