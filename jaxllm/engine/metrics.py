"""Engine metrics: a snapshot of queue, KV-cache and prefix-cache state, plus running totals."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxllm.engine.kv_cache_manager import KVCacheManager
from jaxllm.engine.scheduler import ScheduledSeq, Scheduler


@dataclasses.dataclass(frozen=True)
class StepTotals:
    """Counts summed over engine steps."""

    steps: int = 0  # device steps (a multi-step visit counts each decode step it ran)
    prompt_tokens_computed: int = 0  # prompt tokens whose K/V was computed (not prefix hits; again after preemption)
    generation_tokens: int = 0  # tokens sampled and kept
    num_preemptions: int = 0
    multi_step_visits: int = 0  # scheduler visits that ran several decode steps on the device
    chained_visits: int = 0  # of them, dispatched before the visit before them was recorded (async)
    step_s: float = 0.0  # wall time inside Engine.step()
    # Of it, inside device calls: their dispatch (on a GPU it waits for the device to reach each
    # while-loop predicate of unknown trip count or lax.cond predicate) and waits for results. The
    # rest is host work; with async scheduling, the device computes through part of it.
    device_s: float = 0.0

    def __add__(self, other: StepTotals) -> StepTotals:
        return StepTotals(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


def step_totals(scheduled: Sequence[ScheduledSeq], prompt_lens: Sequence[int], num_sampled: int) -> StepTotals:
    """What one device step adds (preemptions aside); `prompt_lens[i]` belongs to `scheduled[i]`."""
    if len(prompt_lens) != len(scheduled):
        raise ValueError(f"prompt_lens has {len(prompt_lens)} entries for {len(scheduled)} scheduled sequences")
    if num_sampled < 0:
        raise ValueError(f"num_sampled={num_sampled} must be >= 0")
    prompt_tokens = sum(max(0, min(s.start + s.num_tokens, n) - s.start) for s, n in zip(scheduled, prompt_lens))
    return StepTotals(steps=1, prompt_tokens_computed=prompt_tokens, generation_tokens=num_sampled)


@dataclasses.dataclass(frozen=True)
class EngineMetrics:
    """State of an engine between steps, and totals since it was made."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of usable pages referenced by live sequences
    num_free_pages: int  # free plus evictable (cached, unreferenced) pages
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # prompt tokens found cached
    prefix_cache_hit_rate: float
    num_preemptions: int
    steps: int
    prompt_tokens_computed: int
    generation_tokens: int
    multi_step_visits: int
    chained_visits: int  # multi-step visits dispatched ahead (async scheduling)
    step_s: float  # wall time inside Engine.step()
    device_s: float  # of it, inside device calls (dispatch and result waits): step_s - device_s is host work


def collect_metrics(scheduler: Scheduler, kv: KVCacheManager, totals: StepTotals) -> EngineMetrics:
    """Snapshot of the scheduler's queues, the page pool and the totals."""
    prefix = kv.prefix_stats()
    return EngineMetrics(
        num_running=scheduler.num_running(),
        num_waiting=scheduler.num_waiting(),
        kv_cache_usage=kv.usage(),
        num_free_pages=kv.num_free_pages(),
        prefix_cache_queries=prefix.queries,
        prefix_cache_hits=prefix.hits,
        prefix_cache_hit_rate=prefix.hit_rate,
        num_preemptions=totals.num_preemptions,
        steps=totals.steps,
        prompt_tokens_computed=totals.prompt_tokens_computed,
        generation_tokens=totals.generation_tokens,
        multi_step_visits=totals.multi_step_visits,
        chained_visits=totals.chained_visits,
        step_s=totals.step_s,
        device_s=totals.device_s,
    )
