"""Request scheduling for in-flight batching: one token budget shared by prefill chunks and decodes.

vLLM v1's idea: each step, running sequences get their remaining tokens first (a decode needs one, an
unfinished prefill the rest of its prompt, chunked to the budget left), then waiting sequences are
admitted first come, first served. When pages run out, the newest running sequence is preempted: its
pages are freed and it later recomputes prompt + output as one new prefill.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import enum
import numbers
from collections.abc import Callable, Container, Mapping

from jaxllm.engine.kv_cache_manager import KVCacheManager


class Status(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({Status.FINISHED_STOPPED, Status.FINISHED_LENGTH, Status.FINISHED_ABORTED})


@dataclasses.dataclass
class Sequence:
    """Mutable host record of one request."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    status: Status = Status.WAITING
    arrival: int = 0  # order of add(); preemption picks the newest
    num_preemptions: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without building all_token_ids (a decode needs one token)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:stop - n]
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - n]


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    """Compute tokens [start, start + num_tokens) of the sequence's all_token_ids this step."""

    request_id: str
    start: int
    num_tokens: int


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSeq, ...]
    preempted: tuple[str, ...]
    num_batched_tokens: int


def _pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


class Scheduler:
    """Decides which tokens of which sequences the device computes each step."""

    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, mixed_batches: bool = True):
        _check_positive_int("max_num_seqs", max_num_seqs)
        _check_positive_int("max_num_batched_tokens", max_num_batched_tokens)
        _check_positive_int("max_model_len", max_model_len, minimum=2)
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # False: a step with prefill chunks holds no decodes (prefill first; LLM.generate's engine).
        if not isinstance(mixed_batches, bool):
            raise ValueError(f"mixed_batches must be True or False, got {mixed_batches!r}")
        self.mixed_batches = mixed_batches
        # A sequence longer than the whole pool could never be computed: the pool's capacity is a
        # length limit too, so a sequence running alone can always grow and nothing deadlocks.
        self._length_limit = min(max_model_len, (kv.num_pages - 1) * kv.page_size + 1)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []  # sorted by arrival
        self._live: dict[str, Sequence] = {}
        self._pending: dict[str, tuple[ScheduledSeq, Sequence]] = {}  # last schedule(), awaiting update()
        self._reserved: dict[str, int] = {}  # decode budgets of the last reserve_decode_steps()
        self._next: tuple[dict, dict[str, int]] | None = None  # (pending, budgets) reserved ahead
        self._next_arrival = 0

    # ----------------------------------------------------------------------------- queries

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def num_running(self) -> int:
        return len(self._running)

    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def length_limit(self) -> int:
        """The longest a sequence may grow (prompt + output): max_model_len, or less for a small pool."""
        return self._length_limit

    # ----------------------------------------------------------------------------- requests

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence at the back of the waiting queue."""
        self._validate_new(seq)
        seq.arrival = self._next_arrival
        self._next_arrival += 1
        self._live[seq.request_id] = seq
        self._waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Stop a sequence and free its pages at once."""
        self.finish(request_id, Status.FINISHED_ABORTED)

    def finish(self, request_id: str, status: Status) -> None:
        """End a waiting or running sequence with a FINISHED_* status (e.g. on a stop token)."""
        if not isinstance(status, Status) or not status.finished:
            raise ValueError(f"status={status!r} must be one of {sorted(s.name for s in _FINISHED)}")
        seq = self._live.get(request_id)
        if seq is None:
            raise ValueError(f"request_id={request_id!r} is not a waiting or running sequence")
        if seq.status is Status.RUNNING:
            self._running.remove(seq)
            self.kv.free(request_id)
        else:
            self._waiting.remove(seq)
        del self._live[request_id]
        seq.status = status

    # ----------------------------------------------------------------------------- one step

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running sequences first, then waiting ones FCFS."""
        if self._reserved:
            raise ValueError("decode steps are reserved and not yet recorded: call update_decodes() first")
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []
        budget = self._schedule_running(budget, scheduled, preempted, prefills_only=not self.mixed_batches)
        # As in vLLM: no admissions in a step that preempted, so a victim does not bounce straight back.
        if not preempted:
            self._schedule_waiting(budget, scheduled)
        if not self.mixed_batches and not scheduled:  # nothing to prefill: a decode step
            self._schedule_running(self.max_num_batched_tokens, scheduled, preempted)
        self._pending = {s.request_id: (s, self._live[s.request_id]) for s in scheduled}
        self._reserved = {}
        return SchedulerOutput(
            scheduled=tuple(scheduled),
            preempted=tuple(preempted),
            num_batched_tokens=sum(s.num_tokens for s in scheduled),
        )

    def update(self, sampled: Mapping[str, int | None]) -> list[Sequence]:
        """Record the last scheduled step; `sampled` maps request ids to the token sampled for them.

        A sequence whose computed tokens now cover all its tokens needs a sampled token; tokens given
        for partial prefill chunks are ignored. Returns the sequences that finished (pages freed).
        """
        if self._reserved:
            raise ValueError("the last schedule() reserved decode steps: record them with update_decodes()")
        unknown = sorted(set(sampled) - set(self._pending))
        if unknown:
            raise ValueError(f"sampled has request ids {unknown} that the last schedule() did not schedule")
        # Sequences aborted or finished by the caller since schedule() are skipped.
        work = [(s, seq) for s, seq in self._pending.values() if seq.status is Status.RUNNING]
        for s, seq in work:
            if s.start + s.num_tokens == seq.num_tokens:
                _check_token(s.request_id, sampled.get(s.request_id))
        self._pending = {}
        finished = []
        for s, seq in work:
            if self._advance(seq, s, sampled.get(s.request_id)):
                finished.append(seq)
        return finished

    def reserve_decode_steps(self, num_steps: int) -> dict[str, int] | None:
        """After a schedule() of decodes alone, grows each sequence's pages so that the device can run
        up to `num_steps` decode steps without the host: each sequence gets min(num_steps, the tokens
        its limits still allow) tokens. Returns those budgets, or None, changing nothing, when a
        scheduled chunk is not a decode or the pages are not free."""
        _check_positive_int("num_steps", num_steps)
        budgets, new_pages = {}, 0
        for s, seq in self._pending.values():
            decode = s.num_tokens == 1 and s.start + 1 == seq.num_tokens and seq.output_token_ids
            if not decode or seq.status is not Status.RUNNING:
                return None
            budget = min(num_steps, seq.max_tokens - len(seq.output_token_ids), self._length_limit - seq.num_tokens)
            budgets[s.request_id] = budget
            have = len(self.kv.page_table(s.request_id))
            new_pages += max(0, _pages_for(s.start + budget, self.kv.page_size) - have)
        if not budgets or new_pages > self.kv.num_free_pages():
            return None
        for rid, budget in budgets.items():
            grown = self.kv.append(rid, self._pending[rid][0].start + budget)
            assert grown, "pages were counted free"
        self._reserved = budgets
        return budgets

    def reserve_next_decode_steps(self, num_steps: int) -> dict[str, int] | None:
        """Before the last reserved decode steps are recorded, reserves the visit after them for the
        same sequences (async scheduling: the device runs it while the host records the last), as
        if each took its whole budget: each still running sequence that its limits let go on gets
        min(num_steps, what they still allow) more tokens and the pages for them. Returns those
        budgets (ids absent: the sequence sits the visit out), or None, changing nothing, when no
        sequence goes on, the pages are not free, or a visit is already reserved ahead;
        `update_decodes` then records the two visits in order."""
        _check_positive_int("num_steps", num_steps)
        if not self._reserved or self._next is not None:
            return None
        budgets, new_pages, grow = {}, 0, {}
        for rid, budget in self._reserved.items():
            s, seq = self._pending[rid]
            if seq.status is not Status.RUNNING:
                continue
            end = s.start + budget  # tokens computed once the reserved visit is recorded, + its last
            outputs = len(seq.output_token_ids) + budget
            more = min(num_steps, seq.max_tokens - outputs, self._length_limit - (end + 1))
            if more < 1:
                continue
            budgets[rid] = more
            grow[rid] = end + more
            have = len(self.kv.page_table(rid))
            new_pages += max(0, _pages_for(end + more, self.kv.page_size) - have)
        if not budgets or new_pages > self.kv.num_free_pages():
            return None
        for rid, n in grow.items():
            grown = self.kv.append(rid, n)
            assert grown, "pages were counted free"
        pending = {rid: (ScheduledSeq(rid, self._pending[rid][0].start + self._reserved[rid], 1),
                         self._pending[rid][1]) for rid in budgets}
        self._next = (pending, budgets)
        return budgets

    def update_decodes(self, tokens: Mapping[str, list[int]],
                       on_token: Callable[[Sequence, int], None] | None = None,
                       watched: Container[str] | None = None) -> list[Sequence]:
        """Records the decode steps reserved by `reserve_decode_steps`: `tokens[id]` are the tokens
        the device sampled for the sequence, in order (at least one, at most its budget). After each
        token, `on_token(seq, j)` may finish the sequence (a stop string): its later tokens are then
        dropped. Sequences not in `watched` (when given) take their tokens at once and `on_token`
        sees only the last one. Returns the sequences that reached their length limit (pages freed)."""
        reserved, pending = self._reserved, self._pending
        if not reserved:
            raise ValueError("update_decodes() needs a reserve_decode_steps() after the last schedule()")
        live = {rid for rid, (_, seq) in pending.items() if seq.status is Status.RUNNING and rid in reserved}
        if set(tokens) != live:
            raise ValueError(f"tokens has request ids {sorted(tokens)}; the running reserved ones are {sorted(live)}")
        for rid in live:
            if not 1 <= len(tokens[rid]) <= reserved[rid]:
                raise ValueError(f"{len(tokens[rid])} tokens for request_id={rid!r}, whose budget was 1 to {reserved[rid]}")
            for token in tokens[rid]:
                _check_token(rid, token)
        self._reserved, self._pending = {}, {}
        if self._next is not None:  # the visit reserved ahead is recorded next
            self._pending, self._reserved = self._next
            self._next = None
        finished = []
        for rid in sorted(live, key=lambda r: pending[r][1].arrival):
            seq = pending[rid][1]
            if watched is not None and rid not in watched:
                taken, ended = self._advance_decodes(seq, tokens[rid])
                if ended:
                    finished.append(seq)
                if on_token is not None:
                    on_token(seq, taken - 1)
                continue
            for j, token in enumerate(tokens[rid]):
                if self._advance(seq, ScheduledSeq(rid, seq.num_computed_tokens, 1), token):
                    finished.append(seq)
                if on_token is not None:
                    on_token(seq, j)
                if seq.status is not Status.RUNNING:
                    break
        return finished

    # ----------------------------------------------------------------------------- internals

    def _validate_new(self, seq: Sequence) -> None:
        if not isinstance(seq, Sequence):
            raise ValueError(f"add() takes a Sequence, got {type(seq).__name__}")
        rid = seq.request_id
        if rid in self._live:
            raise ValueError(f"request_id={rid!r} is already waiting or running")
        n = len(seq.prompt_token_ids)
        if n == 0:
            raise ValueError(f"request_id={rid!r} has an empty prompt; at least one token is needed")
        _check_positive_int(f"max_tokens of request_id={rid!r}", seq.max_tokens)
        if seq.status is not Status.WAITING or seq.output_token_ids or seq.num_computed_tokens:
            raise ValueError(
                f"request_id={rid!r} must be new (status WAITING, no output, 0 computed tokens), got "
                f"status={seq.status.name}, {len(seq.output_token_ids)} output tokens, "
                f"num_computed_tokens={seq.num_computed_tokens}"
            )
        if n + 1 > self.max_model_len:
            raise ValueError(
                f"request_id={rid!r}: prompt of {n} tokens leaves no room to generate within "
                f"max_model_len={self.max_model_len}; at most {self.max_model_len - 1} prompt tokens"
            )
        S, usable = self.kv.page_size, self.kv.num_pages - 1
        if _pages_for(n + 1, S) > usable:
            raise ValueError(
                f"request_id={rid!r}: prompt of {n} tokens plus one needs {_pages_for(n + 1, S)} pages of "
                f"{S} tokens but the pool has only {usable}; at most {usable * S - 1} prompt tokens fit"
            )

    def _schedule_running(self, budget: int, scheduled: list[ScheduledSeq], preempted: list[str],
                          prefills_only: bool = False) -> int:
        """Schedule running sequences in arrival order, preempting the newest when pages run out
        (with `prefills_only`, those with more than their last token to compute)."""
        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            if prefills_only and seq.num_tokens - seq.num_computed_tokens <= 1:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow_or_preempt(seq, seq.num_computed_tokens + n, preempted):
                break  # seq preempted itself: it was the newest, nothing after it
            scheduled.append(ScheduledSeq(seq.request_id, seq.num_computed_tokens, n))
            budget -= n
            i += 1
        return budget

    def _grow_or_preempt(self, seq: Sequence, num_tokens: int, preempted: list[str]) -> bool:
        """Make `seq` hold `num_tokens`, preempting newest sequences; False if `seq` itself went."""
        while not self.kv.append(seq.request_id, num_tokens):
            victim = self._running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self.kv.free(seq.request_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self._waiting.appendleft(seq)

    def _schedule_waiting(self, budget: int, scheduled: list[ScheduledSeq]) -> None:
        """Admit waiting sequences FCFS; a head that does not fit blocks the rest."""
        while self._waiting and budget > 0 and len(self._running) < self.max_num_seqs:
            seq = self._waiting[0]
            cached = self.kv.allocate_prompt(seq.request_id, seq.all_token_ids)
            if cached is None:
                break
            self._waiting.popleft()
            seq.num_computed_tokens = cached
            seq.status = Status.RUNNING
            bisect.insort(self._running, seq, key=lambda s: s.arrival)
            n = min(seq.num_tokens - cached, budget)
            scheduled.append(ScheduledSeq(seq.request_id, cached, n))
            budget -= n

    def _advance_decodes(self, seq: Sequence, tokens: list[int]) -> tuple[int, bool]:
        """`_advance` of one decode token after another, at once: (tokens taken, whether the
        sequence reached its length limit, which drops the tokens after it)."""
        taken = min(len(tokens), seq.max_tokens - len(seq.output_token_ids), self._length_limit - seq.num_tokens)
        seq.num_computed_tokens += taken
        seq.output_token_ids.extend(tokens[:taken])
        self._cache_full_pages(seq)
        return taken, self._finish_at_length_limit(seq)

    def _advance(self, seq: Sequence, s: ScheduledSeq, token: int | None) -> bool:
        """Apply one computed chunk (and its sampled token); True if the sequence finished."""
        complete = s.start + s.num_tokens == seq.num_tokens
        seq.num_computed_tokens += s.num_tokens
        self._cache_full_pages(seq)
        if not complete:
            return False
        seq.output_token_ids.append(int(token))
        return self._finish_at_length_limit(seq)

    def _cache_full_pages(self, seq: Sequence) -> None:
        """Registers pages its computed tokens filled since the last call (1 token in page_size)."""
        if self.kv.has_uncached_full_pages(seq.request_id, seq.num_computed_tokens):
            self.kv.cache_full_pages(seq.request_id, seq.token_ids(0, seq.num_computed_tokens))

    def _finish_at_length_limit(self, seq: Sequence) -> bool:
        """Finishes the sequence if its output reached max_tokens or the context its length limit."""
        if len(seq.output_token_ids) < seq.max_tokens and seq.num_tokens < self._length_limit:
            return False
        self.finish(seq.request_id, Status.FINISHED_LENGTH)
        return True


def _check_token(request_id: str, token) -> None:
    if type(token) is int and token >= 0:  # what .tolist() gives; the ABC check below is slow
        return
    if not isinstance(token, numbers.Integral) or isinstance(token, bool) or token < 0:
        raise ValueError(
            f"request_id={request_id!r} completed its scheduled tokens, so sampled[{request_id!r}] must be "
            f"a token id >= 0, got {token!r}"
        )
