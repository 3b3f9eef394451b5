"""In-flight batching engine: scheduler and KV-cache manager on the host, jitted steps on device.

Each `step()` asks the scheduler for a ragged batch (prefill chunks and decodes together under one
token budget), runs it through `runner.engine_step` over the shared page pool (one call per width
bucket of its rows), and feeds the sampled tokens back. When every scheduled sequence decodes, one
step runs up to `EngineConfig.num_decode_steps` decode steps in the on-device decode loop instead.
Requests can be added and aborted between steps.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Sequence as Seq

import jax
import numpy as np

from jaxllm import runner
from jaxllm.completion import build_completion, logprob_dict
from jaxllm.detokenize import IncrementalDetokenizer, find_stop_string
from jaxllm.config import ModelConfig
from jaxllm.engine.kv_cache_manager import KVCacheManager
from jaxllm.engine.metrics import EngineMetrics, StepTotals, collect_metrics, step_totals
from jaxllm.engine.scheduler import Scheduler, Sequence, Status
from jaxllm.kv_cache import AttentionMeta, bytes_per_page, free_device_bytes, init_cache
from jaxllm.llm import LLM, bucket
from jaxllm.outputs import CompletionOutput, RequestOutput
from jaxllm.requests import Request
from jaxllm.sampling import make_sampling_tensors, sampling_mode
from jaxllm.sampling_params import SamplingParams
from jaxllm.sharding import cache_sharding

_FINISH = {Status.FINISHED_STOPPED: "stop", Status.FINISHED_LENGTH: "length", Status.FINISHED_ABORTED: "abort"}


@dataclasses.dataclass
class _Tracked:
    """Host record of one engine sequence: its request and the logprobs gathered so far."""

    req: Request
    seq: Sequence
    stop_ids: frozenset[int]  # tokens that end it: eos (unless ignored) and its stop_token_ids
    detok: IncrementalDetokenizer
    logprob: list[float] = dataclasses.field(default_factory=list)
    rank: list[int] = dataclasses.field(default_factory=list)
    top_ids: list = dataclasses.field(default_factory=list)
    top_lps: list = dataclasses.field(default_factory=list)
    logprob_dicts: list = dataclasses.field(default_factory=list)  # built once per token, for outputs
    stop_checked: int = 0  # characters of detok.text searched for stop strings


@dataclasses.dataclass(frozen=True)
class _Visit:
    """A dispatched several-step decode call: its rows (scheduled order), inputs, and device state."""

    scheduled: list
    batch: list[_Tracked]
    st: object  # SamplingTensors
    limits: runner.Limits
    logprobs_k: int | None
    mode: str
    budgets: dict[str, int]  # the rows that take part, with their most tokens
    state: runner.DecodeState | None = None  # without the cache, which the engine holds


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine sizes. `num_pages=None` sizes the page pool from `gpu_memory_utilization` of the
    memory the device allocator may use (GPU), or takes CPU_DEFAULT_PAGES where it reports none."""

    num_pages: int | None = None
    page_size: int = 16
    max_num_seqs: int = 64
    # Tokens one step computes. TensorRT-LLM's default; on an H200 it served 128/128 at 11,195 tokens/s
    # against 9,894 with 2048 (fewer, fuller prefill steps), at the cost of longer steps while prompts
    # arrive (a lower value bounds decode latency then).
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    # Decode steps run on the device per scheduler visit when every scheduled sequence decodes and
    # none waits to be admitted (vLLM's multi-step scheduling); 1 visits the host every step.
    num_decode_steps: int = 8
    # False: prefill chunks and decodes never share a step (prefill first); see Scheduler.
    mixed_batches: bool = True
    # True: a decode visit's successor for the same rows is dispatched before the visit is recorded,
    # so the device computes while the host records (vLLM's async scheduling); a waiting request
    # may then wait one visit longer for a slot that a stop token freed.
    async_scheduling: bool = True

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not isinstance(self.num_decode_steps, int) or isinstance(self.num_decode_steps, bool) \
                or self.num_decode_steps < 1:
            raise ValueError(f"num_decode_steps must be an integer >= 1, got {self.num_decode_steps!r}")
        if not isinstance(self.mixed_batches, bool):
            raise ValueError(f"mixed_batches must be True or False, got {self.mixed_batches!r}")
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True or False, got {self.async_scheduling!r}")


CPU_DEFAULT_PAGES = 1024
_MIN_STOP_COLUMNS = 4  # stop-id columns of the decode loop: at least this many, so one shape is usual


def pages_from_memory(model: ModelConfig, page_size: int, utilization: float, devices,
                      kv_cache_dtype: str = "auto") -> int:
    """Pages that fit in `utilization` of each device's allocator limit, after what is in use."""
    per_page = bytes_per_page(model, page_size, model.dtype, kv_cache_dtype) // len(devices)  # heads split
    free = free_device_bytes(devices, utilization)
    if free is None:
        return CPU_DEFAULT_PAGES
    pages = int(free // per_page)
    if pages < 2:
        raise ValueError(f"gpu_memory_utilization={utilization} leaves room for {max(pages, 0)} KV pages "
                         f"of {per_page} bytes; at least 2 are needed: raise it or shorten max_model_len")
    return pages


class Engine:
    """Serves requests over one paged KV cache, several at a time."""

    def __init__(self, llm: LLM, config: EngineConfig = EngineConfig()):
        if config.num_pages is None:
            pages = pages_from_memory(llm.config, config.page_size, config.gpu_memory_utilization,
                                      list(llm.mesh.devices.flat), llm.kv_cache_dtype)
            config = dataclasses.replace(config, num_pages=pages)
        self.llm, self.config = llm, config
        self.kv = KVCacheManager(config.num_pages, config.page_size,
                                 enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=llm.max_model_len, mixed_batches=config.mixed_batches)
        model = llm.config
        self.cache = init_cache(model, config.num_pages, config.page_size, model.dtype, cache_sharding(llm.mesh),
                                llm.kv_cache_dtype)
        # Every step's page table has the columns of the longest sequence the pool allows: one
        # shape (the kernels read only a row's own pages), so fewer compilations while serving.
        self._pmax = bucket(-(-self.scheduler.length_limit // config.page_size))
        self._tracked: dict[str, _Tracked] = {}  # live sequences only: a finished one is dropped
        self._keys: dict[str, set[str]] = {}  # request id -> its live sequences' keys
        self._generate_calls = 0
        self._totals = StepTotals()
        self._device_s = 0.0  # this step's time in device calls
        self._inflight: _Visit | None = None  # a decode visit dispatched ahead (async scheduling)

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> None:
        """Queues one prompt (text or {"prompt_token_ids": [...]}); n > 1 adds n sequences."""
        if request_id in self._keys:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        for req in self.llm._requests([prompt], params):
            self.add(dataclasses.replace(req, request_id=request_id))

    def add(self, req: Request) -> None:
        """Queues one sample of a request made by `LLM._requests` (its seed kept)."""
        if not isinstance(req, Request):
            raise ValueError(f"add() takes a Request (see LLM._requests), got {type(req).__name__}")
        key = f"{req.request_id}#{req.sample_index}"
        if key in self._tracked:
            raise ValueError(f"request id {req.request_id!r} sample {req.sample_index} is already in the engine")
        seq = Sequence(key, list(req.prompt_token_ids), req.params.max_tokens)
        self.scheduler.add(seq)
        detok = IncrementalDetokenizer(self.llm.tokenizer, req.params.skip_special_tokens)
        self._tracked[key] = _Tracked(req, seq, frozenset(self.llm._stop_ids(req.params)), detok)
        self._keys.setdefault(req.request_id, set()).add(key)

    def _untrack(self, key: str) -> None:
        t = self._tracked.pop(key)
        keys = self._keys[t.req.request_id]
        keys.discard(key)
        if not keys:
            del self._keys[t.req.request_id]

    def abort(self, request_id: str) -> None:
        """Stops a request and frees its pages; ValueError for an unknown id."""
        keys = sorted(self._keys.get(request_id, ()))
        if not keys:
            raise ValueError(f"cannot abort {request_id!r}: no such request in the engine")
        for key in keys:
            if self._tracked[key].seq.status in (Status.WAITING, Status.RUNNING):
                self.scheduler.abort(key)
            self._untrack(key)
        visit = self._inflight
        if visit is not None and all(t.seq.status is not Status.RUNNING for t in visit.batch):
            self._inflight = None  # nothing of it is wanted now; settled so the scheduler moves on
            self._record_visit(visit)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def metrics(self) -> EngineMetrics:
        """Queue and cache state now, and totals over all steps so far."""
        return collect_metrics(self.scheduler, self.kv, self._totals)

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled batch; returns the outputs of requests that advanced (finished or not)."""
        start, self._device_s = time.perf_counter(), 0.0
        outputs = self._step()
        self._totals += StepTotals(step_s=time.perf_counter() - start, device_s=self._device_s)
        return outputs

    def _device(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), timed as device time: jax.device_get, or a jitted call, whose
        dispatch returns at once on a CPU but on a GPU only after the device has reached its last
        while-loop or lax.cond predicate (the host reads those back)."""
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self._device_s += time.perf_counter() - start
        return out

    def _device_get(self, tree):
        return self._device(jax.device_get, tree)

    def _step(self) -> list[RequestOutput]:
        if self._inflight is not None:
            visit, self._inflight = self._inflight, None
            return self._pipeline(visit)
        out = self.scheduler.schedule()
        self._totals += StepTotals(num_preemptions=len(out.preempted))
        if not out.scheduled:
            return []
        batch = [self._tracked[s.request_id] for s in out.scheduled]
        budgets = self._reserve_decode_steps(out)
        if budgets is not None:
            return self._decode_steps(out.scheduled, batch, budgets)
        token, logprobs = self._run(out.scheduled, batch)
        sampled = {}
        for i, (s, t) in enumerate(zip(out.scheduled, batch)):
            complete = s.start + s.num_tokens == t.seq.num_tokens
            sampled[s.request_id] = int(token[i]) if complete else None
            if complete and logprobs is not None and t.req.params.logprobs is not None:
                t.logprob.append(float(logprobs[0][i]))
                t.rank.append(int(logprobs[1][i]))
                t.top_ids.append(logprobs[2][i])
                t.top_lps.append(logprobs[3][i])
        self.scheduler.update(sampled)
        advanced = [t for s, t in zip(out.scheduled, batch) if sampled[s.request_id] is not None]
        self._totals += step_totals(out.scheduled, [len(t.seq.prompt_token_ids) for t in batch], len(advanced))
        for t in advanced:
            self._check_stop(t)
        outputs = [self._output(t) for t in advanced]
        for t in advanced:  # a finished sequence's record goes with its final output
            if t.seq.status in _FINISH:
                self._untrack(t.seq.request_id)
        return outputs

    def _reserve_decode_steps(self, out) -> dict[str, int] | None:
        """Budgets for several decode steps on the device, when this schedule allows them: decodes
        only, and no waiting sequence that a finished one could make room for sooner."""
        sched = self.scheduler
        if self.config.num_decode_steps == 1 or out.preempted:
            return None
        if sched.num_waiting() and sched.num_running() < sched.max_num_seqs:
            return None
        return sched.reserve_decode_steps(self.config.num_decode_steps)

    def _decode_steps(self, scheduled, batch: list[_Tracked], budgets: dict[str, int]) -> list[RequestOutput]:
        """Runs the reserved decode steps in the on-device decode loop (`runner.decode`, the loop
        `LLM.generate` uses) and records the tokens as the single-step path would, one by one.

        The loop starts each row as if its output were just its last token: the rest of the output
        only enters through the page table, the penalty counts and the sampling step offset, so the
        loop's shapes depend on `num_decode_steps`, not on how long the outputs have grown."""
        cfg = self.llm.config
        rows = bucket(len(batch))
        done_before = [len(t.seq.output_token_ids) for t in batch]
        width = bucket(1 + self.config.num_decode_steps)  # one shape whatever the budgets
        tables = [self.kv.page_table(s.request_id) for s in scheduled]
        page_table = np.zeros((rows, self._pmax), np.int32)
        prompt_lens = np.zeros(rows, np.int32)  # all but the last token
        last = np.zeros((rows, width), np.int32)  # the loop's output buffer, from the last token on
        stops = [sorted(t.stop_ids) for t in batch]
        stop_ids = np.full((rows, bucket(max(map(len, stops)), _MIN_STOP_COLUMNS)), -1, np.int32)
        max_tokens = np.ones(rows, np.int32)
        penalised = any(t.req.params.has_penalties for t in batch)
        # Without penalties the loop makes these on the device: nothing crosses.
        prompt_mask = np.zeros((rows, cfg.vocab_size), bool) if penalised else None
        output_counts = np.zeros((rows, cfg.vocab_size), np.int32) if penalised else None
        for i, (t, table, stop) in enumerate(zip(batch, tables, stops)):
            page_table[i, :len(table)] = table
            prompt_lens[i] = t.seq.num_tokens - 1
            last[i, 0] = t.seq.output_token_ids[-1]
            stop_ids[i, :len(stop)] = stop
            max_tokens[i] = t.seq.max_tokens - done_before[i] + 1
            if penalised:
                prompt_mask[i, t.seq.prompt_token_ids] = True
                np.add.at(output_counts[i], t.seq.output_token_ids, 1)
        k = max((t.req.params.logprobs for t in batch if t.req.params.logprobs is not None), default=None)
        state = runner.new_decode_state(
            self.cache, page_table, prompt_lens, num_generated=(np.arange(rows) < len(batch)).astype(np.int32),
            done=np.arange(rows) >= len(batch), tokens=last, prompt_mask=prompt_mask, output_counts=output_counts,
            logprobs_k=k)
        st = make_sampling_tensors([t.req.params for t in batch], [t.req.seed for t in batch], rows, cfg.vocab_size,
                                   step_offsets=[n - 1 for n in done_before])
        limits = runner.Limits(stop_ids, max_tokens, np.int32(self.scheduler.length_limit))
        visit = _Visit(list(scheduled), batch, st, limits, k, self._mode(batch), budgets)
        return self._pipeline(self._dispatch_visit(visit, state, max(budgets.values())))

    def _dispatch_visit(self, visit: _Visit, state, num_steps: int) -> _Visit:
        # A fixed trip count (rows past their budget stop at their own limits) and a sampling mode
        # chosen here keep every predicate on the device: the call returns before the loop runs.
        state = self._device(runner.decode, self.llm.params, state, visit.st, visit.limits, np.int32(num_steps),
                             config=self.llm.config, logprobs_k=visit.logprobs_k, sampling_mode=visit.mode,
                             trip_count=self.config.num_decode_steps)
        self.cache = state.cache
        return dataclasses.replace(visit, state=state._replace(cache=None))

    def _pipeline(self, visit: _Visit) -> list[RequestOutput]:
        """Records a dispatched decode visit; with async scheduling, first dispatches the visit
        after it for the same rows (`_chain`), so the device runs that while the host records."""
        self._inflight = self._chain(visit) if self.config.async_scheduling else None
        return self._record_visit(visit)

    def _chain(self, visit: _Visit) -> _Visit | None:
        """The next decode visit of `visit`'s rows, built on the device from its state (each row's
        last token, length, penalty counts and sampling step) and dispatched; None when a waiting
        request could take a finishing row's slot, a row checks stop strings on the host, or the
        scheduler cannot reserve it."""
        sched = self.scheduler
        if any(t.req.params.stop for t in visit.batch):
            return None
        n = self.config.num_decode_steps
        rows_end = any(t.seq.max_tokens - len(t.seq.output_token_ids) <= n or sched.length_limit - t.seq.num_tokens < n
                       for t in visit.batch)  # some row ends by length in the visit: its slot is wanted
        if sched.num_waiting() and (rows_end or sched.num_running() < sched.max_num_seqs):
            return None
        budgets = sched.reserve_next_decode_steps(self.config.num_decode_steps)
        if budgets is None:
            return None
        page_table = np.zeros((bucket(len(visit.batch)), self._pmax), np.int32)
        keep = np.zeros(len(page_table), bool)
        for i, s in enumerate(visit.scheduled):
            if s.request_id in budgets:
                table = self.kv.page_table(s.request_id)
                page_table[i, :len(table)] = table
                keep[i] = True
        prev = visit.state
        if prev.prompt_mask is not None and not any(t.req.params.has_penalties for t in visit.batch):
            prev = prev._replace(prompt_mask=None, output_counts=None)  # decode makes them: one program
        state, st, limits = self._device(runner.next_decode_state, self.cache, prev, visit.st, visit.limits,
                                         page_table, keep)
        nxt = dataclasses.replace(visit, st=st, limits=limits, budgets=budgets)
        self._totals += StepTotals(chained_visits=1)
        return self._dispatch_visit(nxt, state, max(budgets.values()))

    def _record_visit(self, visit: _Visit) -> list[RequestOutput]:
        """Reads a decode visit's tokens and records them one by one (rows finished or aborted
        since it was dispatched are skipped); returns the outputs of its rows."""
        scheduled, batch, state = visit.scheduled, visit.batch, visit.state
        tokens, generated, logprob, rank, top_ids, top_lps = self._device_get(
            (state.tokens, state.num_generated, state.logprob, state.rank, state.top_ids, state.top_lps))
        live = [i for i, t in enumerate(batch) if t.seq.status is Status.RUNNING
                and scheduled[i].request_id in visit.budgets]
        done_before = {i: len(batch[i].seq.output_token_ids) for i in live}
        row_of = {scheduled[i].request_id: i for i in live}

        def on_token(seq, j):
            i = row_of[seq.request_id]
            t, at = batch[i], 1 + j
            if t.req.params.logprobs is not None:
                t.logprob.append(float(logprob[i, at]))
                t.rank.append(int(rank[i, at]))
                t.top_ids.append(top_ids[i, at])
                t.top_lps.append(top_lps[i, at])
            self._check_stop(t)

        new = {scheduled[i].request_id: tokens[i, 1:generated[i]].tolist() for i in live}
        # Rows checked token by token: logprobs or stop strings, or a stop token before the last
        # (the device ends a row at its stop tokens, so that is not expected). The rest at once.
        watched = {scheduled[i].request_id for i in live if batch[i].req.params.logprobs is not None
                   or batch[i].req.params.stop or not batch[i].stop_ids.isdisjoint(new[scheduled[i].request_id][:-1])}
        self.scheduler.update_decodes(new, on_token, watched)
        kept = sum(len(batch[i].seq.output_token_ids) - n for i, n in done_before.items())
        self._totals += StepTotals(steps=int(max(generated[:len(batch)])) - 1,
                                   generation_tokens=kept, multi_step_visits=1)
        outputs = [self._output(batch[i]) for i in live]
        for i in live:
            if batch[i].seq.status in _FINISH:
                self._untrack(batch[i].seq.request_id)
        return outputs

    def _run(self, scheduled, batch: list[_Tracked]):
        """Samples a token for every scheduled row. Rows run in one device call per width bucket
        (decodes, whose width is 1, apart from prefill chunks, and short chunks apart from long
        ones), so no row is padded to more than twice its length: each extra call reads the weights
        once more, which costs less than computing the padding of a [rows, longest chunk] batch."""
        by_width: dict[int, list[int]] = {}
        for i, s in enumerate(scheduled):
            by_width.setdefault(bucket(s.num_tokens), []).append(i)
        groups = [by_width[w] for w in sorted(by_width)]
        k = max((t.req.params.logprobs for t in batch if t.req.params.logprobs is not None), default=None)
        # Every call is dispatched before any result is read.
        results = self._device_get([self._run_rows([scheduled[i] for i in g], [batch[i] for i in g], k) for g in groups])
        token = np.zeros(len(scheduled), np.int32)
        logprobs = None if k is None else [np.zeros((len(scheduled),) + x.shape[1:], x.dtype) for x in results[0][1]]
        for g, (t, lp) in zip(groups, results):
            token[g] = t[:len(g)]
            for whole, part in zip(logprobs or (), lp or ()):
                whole[g] = part[:len(g)]
        return token, logprobs

    def _run_rows(self, scheduled, batch: list[_Tracked], logprobs_k: int | None):
        """Dispatches one device step over these rows, padded to a bucketed [rows, width] batch;
        returns its (tokens, logprobs or None) on the device."""
        cfg, llm = self.llm.config, self.llm
        rows = bucket(len(scheduled))
        width = bucket(max(s.num_tokens for s in scheduled))
        tables = [self.kv.page_table(s.request_id) for s in scheduled]
        pmax = self._pmax
        tokens = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), -1, np.int32)
        page_table = np.zeros((rows, pmax), np.int32)
        kv_lens = np.zeros(rows, np.int32)
        last = np.zeros(rows, np.int32)
        steps = np.zeros(rows, np.int32)
        # Penalty inputs cross to the device only when some row uses a penalty.
        penalised = any(t.req.params.has_penalties for t in batch)
        prompt_mask = np.zeros((rows, cfg.vocab_size), bool) if penalised else None
        output_counts = np.zeros((rows, cfg.vocab_size), np.int32) if penalised else None
        for i, (s, t, table) in enumerate(zip(scheduled, batch, tables)):
            tokens[i, :s.num_tokens] = t.seq.token_ids(s.start, s.start + s.num_tokens)
            positions[i, :s.num_tokens] = np.arange(s.start, s.start + s.num_tokens)
            page_table[i, :len(table)] = table
            kv_lens[i] = s.start + s.num_tokens
            last[i] = s.num_tokens - 1
            steps[i] = len(t.seq.output_token_ids)
            if penalised:
                prompt_mask[i, t.seq.prompt_token_ids] = True
                np.add.at(output_counts[i], t.seq.output_token_ids, 1)
        st = make_sampling_tensors([t.req.params for t in batch], [t.req.seed for t in batch], rows, cfg.vocab_size)
        token, logprobs, self.cache = self._device(
            runner.engine_step, llm.params, self.cache, tokens, AttentionMeta(positions, page_table, kv_lens), last, st, steps,
            prompt_mask, output_counts, config=cfg, logprobs_k=logprobs_k, sampling_mode=self._mode(batch),
        )
        return token, logprobs

    def _mode(self, batch: list[_Tracked]) -> str:
        """The batch's sampling mode; greedy batches share "unsorted" (one executable fewer per shape)."""
        return sampling_mode([t.req.params for t in batch], self.llm.config.vocab_size, greedy=False)

    def _check_stop(self, t: _Tracked) -> None:
        """Stop tokens and stop strings end a running sequence on the host."""
        if t.seq.status != Status.RUNNING and t.seq.status != Status.WAITING:
            return
        if t.seq.output_token_ids[-1] in t.stop_ids or self._hit_stop_string(t):
            self.scheduler.finish(t.seq.request_id, Status.FINISHED_STOPPED)

    def _hit_stop_string(self, t: _Tracked) -> bool:
        """Whether the output now holds a stop string: the new text is searched (with an overlap of
        the longest stop string), and only a hit there decodes the whole output to confirm it."""
        stops, ids = t.req.params.stop, t.seq.output_token_ids
        if not stops:
            return False
        text = t.detok.update(ids)
        start = max(0, t.stop_checked - max(map(len, stops)) + 1)
        t.stop_checked = len(text)
        if not any(s in text[start:] for s in stops):
            return False
        return find_stop_string(self.llm.tokenizer, ids, stops, t.req.params.skip_special_tokens) is not None

    def _completion(self, t: _Tracked):
        return build_completion(self.llm.tokenizer, t.req, t.seq.output_token_ids, _FINISH.get(t.seq.status),
                                t.logprob, t.rank, t.top_ids, t.top_lps)

    def _partial_completion(self, t: _Tracked) -> CompletionOutput:
        """A running sequence's output so far in O(new tokens) of Python: text from its incremental
        detokenizer, logprob entries of earlier steps reused (a finished one is built whole)."""
        ids, p = t.seq.output_token_ids, t.req.params
        logprobs = cumulative = None
        if p.logprobs is not None:
            for j in range(len(t.logprob_dicts), len(ids)):
                t.logprob_dicts.append(logprob_dict(self.llm.tokenizer, t.top_ids[j][:p.logprobs],
                                                    t.top_lps[j][:p.logprobs], ids[j], t.logprob[j], t.rank[j]))
            logprobs = list(t.logprob_dicts)
            cumulative = float(np.sum(np.asarray(t.logprob[:len(ids)], np.float64)))
        return CompletionOutput(t.req.sample_index, t.detok.update(ids), list(ids), cumulative, logprobs, None)

    def _output(self, t: _Tracked) -> RequestOutput:
        done = t.seq.status in _FINISH
        completion = self._completion(t) if done else self._partial_completion(t)
        return RequestOutput(t.req.request_id, t.req.prompt, list(t.req.prompt_token_ids), None, [completion],
                             finished=done)

    # -- before serving ---------------------------------------------------------------------

    def _max_rows(self, width: int) -> int:
        """The most rows a device call of this width bucket takes: chunks in it hold more than
        width / 2 tokens each (decodes, width 1, are limited by max_num_seqs alone)."""
        cfg = self.config
        most = cfg.max_num_seqs if width == 1 else min(cfg.max_num_seqs, cfg.max_num_batched_tokens // (width // 2 + 1))
        return bucket(max(most, 1))

    def warmup(self, prompt_lens: Seq[int] = (), sampling_modes: Seq[str] | None = None) -> int:
        """Compiles, before serving, the shapes that batches of 1 to max_num_seqs sequences take
        without logprobs or penalties: one decode step, the several-step decode loop, and prefill
        calls of each prompt length given (chunked to the token budget; as many rows of a width as
        the budget allows chunks of that width bucket), for each sampling mode (default: "unsorted",
        which greedy and plain-temperature batches use, and the mode of the model's default
        sampling params). Runs each on padding rows, which write only the scratch page; returns how
        many it ran."""
        cfg, llm = self.llm.config, self.llm
        if any(not isinstance(n, (int, np.integer)) or n < 1 for n in prompt_lens):
            raise ValueError(f"prompt_lens must be positive integers, got {list(prompt_lens)}")
        if sampling_modes is None:
            default = sampling_mode([llm.get_default_sampling_params()], cfg.vocab_size, greedy=False)
            sampling_modes = sorted({"unsorted", default})
        for mode in sampling_modes:
            if mode not in ("unsorted", "sorted"):
                raise ValueError(f"the engine samples in modes 'unsorted' and 'sorted', got {mode!r}")
        widths = {1} | {bucket(min(int(n), self.config.max_num_batched_tokens)) for n in prompt_lens}
        runs = 0
        for rows, mode in itertools.product(sorted({bucket(r) for r in range(1, self.config.max_num_seqs + 1)}),
                                            sampling_modes):
            st = make_sampling_tensors([], [], rows, cfg.vocab_size)
            page_table = np.zeros((rows, self._pmax), np.int32)
            for width in sorted(widths):
                if rows > self._max_rows(width):
                    continue
                meta = AttentionMeta(np.full((rows, width), -1, np.int32), page_table, np.zeros(rows, np.int32))
                _, _, self.cache = runner.engine_step(
                    llm.params, self.cache, np.zeros((rows, width), np.int32), meta, np.zeros(rows, np.int32), st,
                    np.zeros(rows, np.int32), None, None, config=cfg, logprobs_k=None, sampling_mode=mode)
                runs += 1
            if self.config.num_decode_steps > 1:
                width = bucket(1 + self.config.num_decode_steps)
                state = runner.new_decode_state(
                    self.cache, page_table, np.zeros(rows, np.int32), num_generated=np.zeros(rows, np.int32),
                    done=np.ones(rows, bool), tokens=np.zeros((rows, width), np.int32),
                    prompt_mask=None, output_counts=None, logprobs_k=None)
                limits = runner.Limits(np.full((rows, _MIN_STOP_COLUMNS), -1, np.int32), np.ones(rows, np.int32),
                                       np.int32(self.scheduler.length_limit))
                decode = functools.partial(runner.decode, config=cfg, logprobs_k=None, sampling_mode=mode,
                                           trip_count=self.config.num_decode_steps)
                state = decode(llm.params, state, st, limits, np.int32(1))
                self.cache = state.cache
                runs += 1
                if self.config.async_scheduling:  # a visit built on the device from the last: its own program
                    chained, st_next, limits_next = runner.next_decode_state(
                        self.cache, state._replace(cache=None, prompt_mask=None, output_counts=None), st, limits,
                        page_table, np.zeros(rows, bool))
                    self.cache = decode(llm.params, chained, st_next, limits_next, np.int32(1)).cache
                    runs += 1
        return runs

    # -- offline use ------------------------------------------------------------------------

    def generate(self, prompts: Seq, params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, max_steps: int = 100_000) -> list[RequestOutput]:
        """Adds every prompt, steps until all finish, returns the final outputs in prompt order."""
        prompts = list(prompts)
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        self._generate_calls += 1
        ids = [f"generate-{self._generate_calls}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params):
            self.add_request(rid, prompt, p)
        final: dict[tuple[str, int], RequestOutput] = {}
        for _ in range(max_steps):
            if not self.has_unfinished_requests():
                break
            for out in self.step():
                if out.finished:
                    final[out.request_id, out.outputs[0].index] = out
        else:
            raise RuntimeError(f"engine did not finish within {max_steps} steps")
        results = []
        for rid in ids:
            keys = sorted(k for k in final if k[0] == rid)
            first = final[keys[0]]
            results.append(dataclasses.replace(first, outputs=[final[k].outputs[0] for k in keys]))
        return results
