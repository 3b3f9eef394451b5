"""Benchmarks: random or JSONL workloads, run through the engine (AsyncLLM) or LLM.generate, and the
throughput and latency statistics of those runs (the numbers of trtllm-bench and vLLM's benchmarks).

Every request generates exactly its output length (eos ignored, max_tokens = output length). Times
are seconds from the start of the timed run; the JSON written by `as_dict` reports latencies in ms.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import numbers
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jaxtyping import Float, Int

from jaxllm.engine.async_llm import AsyncLLM
from jaxllm.engine.engine import EngineConfig
from jaxllm.engine.metrics import EngineMetrics
from jaxllm.llm import LLM
from jaxllm.sampling_params import SamplingParams

BACKENDS = ("engine", "llm")
PERCENTILES = (50, 90, 99)
# Engine counters that grow over a run; a benchmark reports their change over the timed part.
_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "steps", "prompt_tokens_computed",
             "generation_tokens", "multi_step_visits", "chained_visits", "step_s", "device_s")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# -- workloads --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    """One benchmark request: its prompt's token ids and how many tokens it generates."""

    prompt_token_ids: tuple[int, ...]
    output_len: int

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


def _length_range(length: int, ratio: float) -> tuple[int, int]:
    """The integers in [length*(1-ratio), length*(1+ratio)], at least 1."""
    # round() first so that e.g. 10 * (1 - 0.3) = 7.000000000000001 still lets 7 in.
    low = max(1, math.ceil(round(length * (1 - ratio), 9)))
    return low, max(low, math.floor(round(length * (1 + ratio), 9)))


@dataclasses.dataclass(frozen=True)
class RandomWorkload:
    """`num_prompts` prompts of random token ids. As in vLLM's random dataset, input and output
    lengths are drawn uniformly from the integers in [len*(1-range_ratio), len*(1+range_ratio)]."""

    num_prompts: int
    input_len: int
    output_len: int
    range_ratio: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("num_prompts", "input_len", "output_len"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        ratio = self.range_ratio
        if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool) or not 0 <= ratio < 1:
            raise ValueError(f"range_ratio must be in [0, 1), got {ratio!r}")

    @property
    def input_range(self) -> tuple[int, int]:
        return _length_range(self.input_len, self.range_ratio)

    @property
    def output_range(self) -> tuple[int, int]:
        return _length_range(self.output_len, self.range_ratio)

    def check_fits(self, max_model_len: int) -> None:
        """ValueError unless the longest possible request (input + output) fits in max_model_len."""
        longest_in, longest_out = self.input_range[1], self.output_range[1]
        if longest_in + longest_out <= max_model_len:
            return
        if self.range_ratio:
            what = (f"the longest request (input {longest_in} + output {longest_out}, from input_len "
                    f"{self.input_len}, output_len {self.output_len} and range_ratio {self.range_ratio})")
        else:
            what = f"input_len {self.input_len} + output_len {self.output_len}"
        raise ValueError(f"{what} = {longest_in + longest_out} exceeds max_model_len {max_model_len}")

    def sample(self, vocab_size: int, special_ids: Sequence[int] = (),
               max_model_len: int | None = None) -> list[BenchRequest]:
        """The requests: the same for the same seed; tokens uniform over [0, vocab_size) minus special_ids."""
        _check_int("vocab_size", vocab_size, 1)
        if max_model_len is not None:
            self.check_fits(max_model_len)
        allowed = _allowed_ids(vocab_size, special_ids)
        rng = np.random.default_rng(self.seed)
        input_lens = rng.integers(*self.input_range, size=self.num_prompts, endpoint=True)
        output_lens = rng.integers(*self.output_range, size=self.num_prompts, endpoint=True)
        return [BenchRequest(tuple(rng.choice(allowed, size=int(n)).tolist()), int(m))
                for n, m in zip(input_lens, output_lens)]


def _allowed_ids(vocab_size: int, special_ids: Sequence[int]) -> Int[np.ndarray, "K"]:
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids), dtype=np.int64))
    if allowed.size == 0:
        raise ValueError(f"no token ids left to draw from: all {vocab_size} are special")
    return allowed


def vocabulary(llm: LLM) -> tuple[int, tuple[int, ...]]:
    """Token ids a random prompt may use: [0, vocab_size) (capped at the tokenizer's size) and the
    special ids (bos, eos, the tokenizer's specials) to leave out."""
    size, special = llm.config.vocab_size, set(llm.config.eos_token_ids)
    if llm.config.bos_token_id is not None:
        special.add(llm.config.bos_token_id)
    if llm.tokenizer is not None:
        size = min(size, len(llm.tokenizer))
        special.update(llm.tokenizer.all_special_ids)
    return size, tuple(sorted(special))


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """One line of a JSONL dataset: text or token ids, and its output length if the line gives one."""

    where: str  # "'FILE' line N", for messages
    prompt: str | None
    prompt_token_ids: tuple[int, ...] | None
    output_len: int | None


def _parse_line(where: str, line: str) -> DatasetEntry:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    output_len = record.get("output_len")
    if output_len is not None and (not _is_int(output_len) or output_len < 1):
        raise ValueError(f"{where}: output_len must be an integer >= 1, got {output_len!r}")
    if "prompt_token_ids" in record:
        ids = record["prompt_token_ids"]
        if not isinstance(ids, list) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"{where}: prompt_token_ids must be a non-empty list of token ids >= 0, "
                             f"got {json.dumps(ids)[:80]}")
        return DatasetEntry(where, None, tuple(ids), output_len)
    if "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str) or not text:
            raise ValueError(f"{where}: prompt must be a non-empty string, got {json.dumps(text)[:80]}")
        return DatasetEntry(where, text, None, output_len)
    raise ValueError(f"{where}: needs \"prompt\" (text) or \"prompt_token_ids\"; it has {sorted(record)}")


def read_dataset(path: str | Path) -> list[DatasetEntry]:
    """Parses a JSONL file, one object a line with "prompt" (text) or "prompt_token_ids" and an
    optional "output_len" (blank lines skipped); ValueError names the file and line."""
    name = repr(str(path))
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read dataset {name}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{name} line {line}: not UTF-8 text") from None
    entries = [_parse_line(f"{name} line {i}", line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not entries:
        raise ValueError(f"dataset {name} has no requests (one JSON object a line)")
    return entries


def dataset_requests(entries: Sequence[DatasetEntry], *, tokenizer, vocab_size: int, max_model_len: int,
                     output_len: int) -> list[BenchRequest]:
    """Tokenizes text prompts (as the engine would) and checks each entry against the model;
    `output_len` serves entries without their own."""
    _check_int("output_len", output_len, 1)
    requests = []
    for e in entries:
        if e.prompt_token_ids is not None:
            ids = e.prompt_token_ids
        elif tokenizer is None:
            raise ValueError(f"{e.where}: a text prompt needs a tokenizer; give prompt_token_ids instead")
        else:
            ids = tuple(tokenizer.encode(e.prompt))
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"{e.where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        out = e.output_len if e.output_len is not None else output_len
        if len(ids) + out > max_model_len:
            raise ValueError(f"{e.where}: prompt of {len(ids)} tokens + output_len {out} = {len(ids) + out} "
                             f"exceeds max_model_len {max_model_len}")
        requests.append(BenchRequest(tuple(int(t) for t in ids), out))
    return requests


def arrival_offsets(num_requests: int, request_rate: float, seed: int = 0) -> Float[np.ndarray, "N"]:
    """When each request arrives, in seconds from the start: a Poisson process at `request_rate` per
    second (the first at 0, seeded), or all at 0 for an infinite rate."""
    _check_int("num_requests", num_requests, 1)
    check_request_rate(request_rate)
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng((seed, 1)).exponential(1.0 / request_rate, num_requests - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def check_request_rate(request_rate: float) -> float:
    """ValueError unless the rate is a number > 0 (inf: all requests at once)."""
    if (not isinstance(request_rate, numbers.Real) or isinstance(request_rate, bool) or math.isnan(request_rate)
            or request_rate <= 0):
        raise ValueError(f"request_rate must be > 0 requests/s (inf: all at once), got {request_rate!r}")
    return float(request_rate)


def check_engine_config(config: EngineConfig) -> EngineConfig:
    """ValueError naming the first size out of range."""
    if not isinstance(config, EngineConfig):
        raise ValueError(f"engine_config must be an EngineConfig, got {type(config).__name__}")
    if config.num_pages is not None:
        _check_int("num_pages", config.num_pages, 2)
    for name in ("page_size", "max_num_seqs", "max_num_batched_tokens"):
        _check_int(name, getattr(config, name), 1)
    return config


# -- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, interpolating linearly between order statistics (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q!r}")
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("percentile of no values")
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Count, mean and percentiles of some values (None when there are none)."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


def summarize(values: Sequence[float]) -> Summary:
    values = [float(v) for v in values]
    if not values:
        return Summary(0, None, None, None, None)
    return Summary(len(values), math.fsum(values) / len(values), *(percentile(values, q) for q in PERCENTILES))


def token_times(yield_times: Sequence[float], yield_counts: Sequence[int]) -> Float[np.ndarray, "T"]:
    """When each output token arrived, given when the stream yielded and how many tokens it held then.

    A yield that brings k new tokens after the previous yield at t0 spreads them evenly over (t0, t];
    the first yield's tokens all arrive at its time.
    """
    times = np.asarray(yield_times, dtype=np.float64)
    counts = np.asarray(yield_counts)
    if times.ndim != 1 or times.shape != counts.shape or not times.size:
        raise ValueError(f"need as many yield times as counts, at least one: got {times.shape} and {counts.shape}")
    if counts[0] < 1 or np.any(np.diff(counts) < 1):
        raise ValueError(f"yield_counts must start >= 1 and grow at every yield, got {counts.tolist()}")
    if np.any(np.diff(times) < 0):
        raise ValueError(f"yield_times must not decrease, got {times.tolist()}")
    out = [np.full(int(counts[0]), times[0])]
    for t0, t1, c0, c1 in zip(times[:-1], times[1:], counts[:-1], counts[1:]):
        k = int(c1 - c0)
        out.append(t0 + (t1 - t0) * np.arange(1, k + 1) / k)
    return np.concatenate(out)


def inter_token_latencies(yield_times: Sequence[float], yield_counts: Sequence[int]) -> Float[np.ndarray, "T-1"]:
    """Every gap between consecutive tokens (see `token_times`); they sum to last - first token time."""
    return np.diff(token_times(yield_times, yield_counts))


def time_per_output_token(yield_times: Sequence[float], yield_counts: Sequence[int]) -> float | None:
    """(last - first token time) / (output tokens - 1); None for a single token."""
    tokens = token_times(yield_times, yield_counts)
    return None if tokens.size < 2 else float(tokens[-1] - tokens[0]) / (tokens.size - 1)


@dataclasses.dataclass(frozen=True)
class RequestTrace:
    """One request's timeline, in seconds from the start of the run."""

    input_len: int
    scheduled: float  # when the arrival process sends it
    arrival: float  # when it was submitted
    yield_times: tuple[float, ...]  # when its stream yielded
    yield_counts: tuple[int, ...]  # output tokens it held at each yield

    @property
    def output_len(self) -> int:
        return self.yield_counts[-1]

    @property
    def first_token(self) -> float:
        return self.yield_times[0]

    @property
    def last_token(self) -> float:
        return self.yield_times[-1]

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        return time_per_output_token(self.yield_times, self.yield_counts)

    @property
    def itls(self) -> Float[np.ndarray, "T-1"]:
        return inter_token_latencies(self.yield_times, self.yield_counts)


# -- results ----------------------------------------------------------------------------------


def _metrics_delta(before: EngineMetrics, after: EngineMetrics) -> dict:
    delta = {name: getattr(after, name) - getattr(before, name) for name in _COUNTERS}
    queries = delta["prefix_cache_queries"]
    delta["prefix_cache_hit_rate"] = delta["prefix_cache_hits"] / queries if queries else 0.0
    return delta


_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0, 0.0]  # XLA compilations in this process so far, and their seconds


def _on_duration(event: str, seconds: float, **_) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        _compiles[0] += 1
        _compiles[1] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_count() -> tuple[int, float]:
    """(XLA compilations, their seconds) in this process so far: a serving run that compiles is
    measuring the compiler, not the engine."""
    return _compiles[0], _compiles[1]


class _Rates:
    """Requests and output tokens per second of `elapsed_s`."""

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s


@dataclasses.dataclass(frozen=True)
class ThroughputResult(_Rates):
    """Totals of one throughput run; rates are per second of `elapsed_s`."""

    backend: str
    num_requests: int
    input_tokens: int
    output_tokens: int
    elapsed_s: float
    engine_config: EngineConfig | None = None  # as run (num_pages resolved); None for the llm backend
    engine_metrics: dict | None = None  # counter changes over the timed run
    compiles: tuple[int, float] = (0, 0.0)  # XLA compilations during the timed run, and their seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.elapsed_s

    def as_dict(self) -> dict:
        """The numbers, for JSON (engine_config left to the caller's config section)."""
        return {"benchmark": "throughput", "backend": self.backend, "num_requests": self.num_requests,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "elapsed_s": self.elapsed_s,
                "requests_per_s": self.requests_per_s, "output_tokens_per_s": self.output_tokens_per_s,
                "total_tokens_per_s": self.total_tokens_per_s, "engine_metrics": self.engine_metrics,
                "compiles_while_timed": self.compiles[0], "compile_s_while_timed": self.compiles[1]}


@dataclasses.dataclass(frozen=True)
class LatencyResult(_Rates):
    """Per-request timelines of one latency run and their statistics."""

    request_rate: float
    traces: tuple[RequestTrace, ...]
    elapsed_s: float  # start to the last token
    engine_config: EngineConfig
    engine_metrics: dict  # counter changes over the timed run
    compiles: tuple[int, float] = (0, 0.0)  # XLA compilations during the timed run, and their seconds

    @property
    def num_requests(self) -> int:
        return len(self.traces)

    @property
    def input_tokens(self) -> int:
        return sum(t.input_len for t in self.traces)

    @property
    def output_tokens(self) -> int:
        return sum(t.output_len for t in self.traces)


    @property
    def ttft_ms(self) -> Summary:
        return summarize([1e3 * t.ttft for t in self.traces])

    @property
    def tpot_ms(self) -> Summary:
        return summarize([1e3 * t.tpot for t in self.traces if t.tpot is not None])

    @property
    def itl_ms(self) -> Summary:
        return summarize(1e3 * np.concatenate([t.itls for t in self.traces]))

    def as_dict(self) -> dict:
        """The numbers, for JSON: totals, rates, TTFT/TPOT/ITL in ms, engine counters, per-request times."""
        rate = self.request_rate if math.isfinite(self.request_rate) else "inf"
        requests = [{"input_len": t.input_len, "output_len": t.output_len, "scheduled_s": t.scheduled,
                     "arrival_s": t.arrival, "first_token_s": t.first_token, "last_token_s": t.last_token,
                     "ttft_ms": 1e3 * t.ttft, "tpot_ms": None if t.tpot is None else 1e3 * t.tpot}
                    for t in self.traces]
        return {"benchmark": "latency", "request_rate": rate, "num_requests": self.num_requests,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "elapsed_s": self.elapsed_s,
                "requests_per_s": self.requests_per_s, "output_tokens_per_s": self.output_tokens_per_s,
                "ttft_ms": dataclasses.asdict(self.ttft_ms), "tpot_ms": dataclasses.asdict(self.tpot_ms),
                "itl_ms": dataclasses.asdict(self.itl_ms),
                "engine_metrics": self.engine_metrics, "compiles_while_timed": self.compiles[0],
                "compile_s_while_timed": self.compiles[1], "requests": requests}


# -- running ----------------------------------------------------------------------------------


def _params(request: BenchRequest) -> SamplingParams:
    return SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=1.0)


def _check_requests(requests: Sequence[BenchRequest], llm: LLM) -> list[BenchRequest]:
    requests = list(requests)
    if not requests or not all(isinstance(r, BenchRequest) for r in requests):
        raise ValueError("requests must be a non-empty list of BenchRequest")
    longest = max(requests, key=lambda r: r.input_len + r.output_len)
    if longest.input_len + longest.output_len > llm.max_model_len:
        raise ValueError(f"a request of {longest.input_len} input + {longest.output_len} output tokens exceeds "
                         f"max_model_len {llm.max_model_len}")
    return requests


def _warmup_requests(requests: list[BenchRequest], llm: LLM, seed: int) -> list[BenchRequest]:
    """Requests of the same lengths with fresh random tokens, so they leave no prefix hits behind."""
    allowed = _allowed_ids(*vocabulary(llm))
    rng = np.random.default_rng((seed, 2))
    return [BenchRequest(tuple(rng.choice(allowed, size=r.input_len).tolist()), r.output_len) for r in requests]


def _check_pool(aengine: AsyncLLM, requests: list[BenchRequest]) -> None:
    cfg = aengine.engine.config
    capacity = (cfg.num_pages - 1) * cfg.page_size + 1  # page 0 is scratch; the last token needs no page
    need = max(r.input_len + r.output_len for r in requests)
    if need > capacity:
        raise ValueError(f"the longest request needs {need} tokens, but num_pages={cfg.num_pages} pages of "
                         f"page_size={cfg.page_size} hold at most {capacity}: raise num_pages")


async def _submit(aengine: AsyncLLM, request: BenchRequest, request_id: str, start: float,
                  offset: float) -> RequestTrace:
    delay = start + offset - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    arrival = time.perf_counter() - start
    times, counts = [], []
    prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
    async for out in aengine.generate(prompt, _params(request), request_id):
        now = time.perf_counter() - start
        n = len(out.outputs[0].token_ids)
        if n > (counts[-1] if counts else 0):
            times.append(now)
            counts.append(n)
    return RequestTrace(request.input_len, float(offset), arrival, tuple(times), tuple(counts))


async def _ramp(aengine: AsyncLLM, requests: list[BenchRequest]) -> None:
    """Each request goes in once the previous one has its first token: batches grow one request at a
    time, then shrink, passing through most step shapes that spread-out arrivals meet."""
    first = [asyncio.Event() for _ in requests]

    async def one(i: int, request: BenchRequest) -> None:
        if i:
            await first[i - 1].wait()
        async for _ in aengine.generate({"prompt_token_ids": list(request.prompt_token_ids)}, _params(request),
                                        f"warmup-ramp-{i}"):
            first[i].set()

    await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))


async def _run_engine(llm: LLM, requests: list[BenchRequest], offsets, config: EngineConfig,
                      warmup: bool, seed: int, on_warm: WarmupCallback | None = None):
    """(traces, elapsed_s, resolved engine config, engine counter changes) of one AsyncLLM run.

    The warmup (untimed, fresh tokens) sends every request at once when they all arrive at once,
    and otherwise ramps up to max_num_seqs requests, so that the timed run finds its shapes compiled.
    """
    aengine = AsyncLLM(llm, config)
    try:
        _check_pool(aengine, requests)
        if warmup:
            warm_start, warm_compiled = time.perf_counter(), compile_count()
            fresh = _warmup_requests(requests, llm, seed)
            if np.all(offsets == 0):
                start = time.perf_counter()
                await asyncio.gather(*(_submit(aengine, r, f"warmup-{i}", start, 0.0) for i, r in enumerate(fresh)))
            else:
                await _ramp(aengine, fresh[:aengine.engine.config.max_num_seqs])
            _report_warmup(on_warm, warm_start, warm_compiled)
        before, compiled = aengine.metrics(), compile_count()
        start = time.perf_counter()
        traces = await asyncio.gather(*(_submit(aengine, r, f"bench-{i}", start, float(t))
                                        for i, (r, t) in enumerate(zip(requests, offsets))))
        elapsed = max(t.last_token for t in traces)
        compiles = tuple(now - then for now, then in zip(compile_count(), compiled))
        return tuple(traces), elapsed, aengine.engine.config, _metrics_delta(before, aengine.metrics()), compiles
    finally:
        await aengine.shutdown()


# Told when a warmup ends: its seconds, and the XLA compilations (count, seconds) it caused.
WarmupCallback = Callable[[float, tuple[int, float]], None]


def _report_warmup(on_warm: WarmupCallback | None, start: float, compiled: tuple[int, float]) -> None:
    if on_warm is not None:
        on_warm(time.perf_counter() - start, tuple(now - then for now, then in zip(compile_count(), compiled)))


def run_throughput(llm: LLM, requests: Sequence[BenchRequest], *, backend: str = "engine",
                   engine_config: EngineConfig = EngineConfig(), warmup: bool = True,
                   seed: int = 0, on_warm: WarmupCallback | None = None) -> ThroughputResult:
    """Submits every request at once, through AsyncLLM ("engine") or one LLM.generate call ("llm");
    `warmup` first runs requests of the same lengths (fresh tokens) untimed, to compile, and then
    calls `on_warm(seconds, (compilations, their seconds))` if given."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    requests = _check_requests(requests, llm)
    check_engine_config(engine_config)
    input_tokens = sum(r.input_len for r in requests)
    if backend == "engine":
        traces, elapsed, config, metrics, compiles = asyncio.run(
            _run_engine(llm, requests, np.zeros(len(requests)), engine_config, warmup, seed, on_warm))
        return ThroughputResult("engine", len(requests), input_tokens, sum(t.output_len for t in traces), elapsed,
                                config, metrics, compiles)

    def generate(batch):
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in batch]
        return llm.generate(prompts, [_params(r) for r in batch], use_tqdm=False)

    if warmup:
        warm_start, warm_compiled = time.perf_counter(), compile_count()
        generate(_warmup_requests(requests, llm, seed))
        _report_warmup(on_warm, warm_start, warm_compiled)
    compiled, start = compile_count(), time.perf_counter()
    outputs = generate(requests)
    elapsed = time.perf_counter() - start
    compiles = tuple(now - then for now, then in zip(compile_count(), compiled))
    return ThroughputResult("llm", len(requests), input_tokens,
                            sum(len(o.outputs[0].token_ids) for o in outputs), elapsed, compiles=compiles)


def run_latency(llm: LLM, requests: Sequence[BenchRequest], *, request_rate: float = math.inf,
                engine_config: EngineConfig = EngineConfig(), warmup: bool = True, seed: int = 0,
                on_warm: WarmupCallback | None = None) -> LatencyResult:
    """Sends the requests through AsyncLLM as they arrive (Poisson at `request_rate`, seeded) and
    records each one's timeline; `warmup` first runs requests of the same lengths (fresh tokens)
    untimed, all at once for an infinite rate, else ramping up one at a time (then `on_warm` as in
    `run_throughput`)."""
    requests = _check_requests(requests, llm)
    check_engine_config(engine_config)
    offsets = arrival_offsets(len(requests), request_rate, seed)
    traces, elapsed, config, metrics, compiles = asyncio.run(
        _run_engine(llm, requests, offsets, engine_config, warmup, seed, on_warm))
    return LatencyResult(float(request_rate), traces, elapsed, config, metrics, compiles)


# -- the table --------------------------------------------------------------------------------


def _num(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if _is_int(value) else f"{value:,.2f}"


def format_table(result: ThroughputResult | LatencyResult) -> str:
    """A readable summary of a result."""
    rows = [("requests", result.num_requests), ("input tokens", result.input_tokens),
            ("output tokens", result.output_tokens), ("elapsed (s)", result.elapsed_s),
            ("requests/s", result.requests_per_s), ("output tokens/s", result.output_tokens_per_s)]
    if isinstance(result, ThroughputResult):
        title = f"throughput ({result.backend})"
        rows.append(("total tokens/s", result.total_tokens_per_s))
    else:
        rate = "inf" if math.isinf(result.request_rate) else f"{result.request_rate:g}"
        title = f"latency ({rate} req/s)"
    width = 48
    lines = [f" jaxllm bench {title} ".center(width, "="),
             *(f"{name:<24}{_num(value):>24}" for name, value in rows)]
    if isinstance(result, LatencyResult):
        lines += ["-" * width, f"{'(ms)':<8}" + "".join(f"{h:>10}" for h in ("mean", "p50", "p90", "p99"))]
        for name, s in (("TTFT", result.ttft_ms), ("TPOT", result.tpot_ms), ("ITL", result.itl_ms)):
            lines.append(f"{name:<8}" + "".join(f"{_num(getattr(s, k)):>10}" for k in ("mean", "p50", "p90", "p99")))
    if result.engine_metrics is not None:
        m = result.engine_metrics
        lines += ["-" * width,
                  f"{'prefix cache hit rate':<24}{100 * m['prefix_cache_hit_rate']:>23.1f}%",
                  f"{'preemptions':<24}{m['num_preemptions']:>24,}",
                  f"{'engine steps':<24}{m['steps']:>24,}"]
    lines.append("=" * width)
    return "\n".join(lines)
