"""Results of generation, shaped like vLLM's so that users' code carries over."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Logprob:
    """Log-probability of one token under the model, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass(frozen=True)
class SpecDecodeStats:
    """How speculation went for one output: target forwards after the first token, proposals made and
    kept, and both per proposal position (position 0 is the first token after the last accepted one)."""

    num_steps: int
    num_draft_tokens: int
    num_accepted_tokens: int
    proposed_per_position: tuple[int, ...]
    accepted_per_position: tuple[int, ...]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per target forward: 1 + accepted proposals per step."""
        return 1.0 + self.num_accepted_tokens / max(self.num_steps, 1)

    @property
    def acceptance_rate_per_position(self) -> tuple[float, ...]:
        return tuple(a / p if p else 0.0 for a, p in zip(self.accepted_per_position, self.proposed_per_position))


@dataclasses.dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None  # "stop" or "length"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    spec_decode: SpecDecodeStats | None = None  # set when the LLM speculates

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True
