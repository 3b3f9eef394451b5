"""`AsyncLLM`: an asyncio front end to the engine, streaming many concurrent requests.

One background task steps the engine while any request is unfinished. Each step runs in a worker
thread, so the event loop stays responsive; requests are added and aborted between steps, under
one asyncio.Lock, because the engine is not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from jaxllm.engine.engine import Engine, EngineConfig
from jaxllm.engine.metrics import EngineMetrics
from jaxllm.llm import LLM
from jaxllm.outputs import CompletionOutput, RequestOutput
from jaxllm.sampling_params import SamplingParams

_END = object()  # queued to a stream that was aborted or shut down: it stops without a finished output


@dataclasses.dataclass
class _Stream:
    """Outputs waiting for one generate() call, and the latest completion of each of its samples."""

    num_samples: int
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    latest: dict[int, CompletionOutput] = dataclasses.field(default_factory=dict)
    finished: set[int] = dataclasses.field(default_factory=set)

    def merge(self, out: RequestOutput) -> RequestOutput:
        """The request's output including this sample's update; finished once every sample is."""
        for c in out.outputs:
            self.latest[c.index] = c
            if out.finished:
                self.finished.add(c.index)
        return dataclasses.replace(out, outputs=[self.latest[i] for i in sorted(self.latest)],
                                   finished=len(self.finished) == self.num_samples)


class AsyncLLM:
    """Serves concurrent asyncio callers from one Engine; use it from one event loop.

    `engine` is exposed for inspection; touch it only while no step runs (e.g. after the loop ends).
    """

    def __init__(self, llm: LLM, config: EngineConfig = EngineConfig()):
        if not isinstance(llm, LLM):
            raise ValueError(f"llm must be a jaxllm.LLM, got {type(llm).__name__}")
        if not isinstance(config, EngineConfig):
            raise ValueError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.engine = Engine(llm, config)
        self._lock = asyncio.Lock()  # held while the engine is in use (a step, an add, an abort)
        self._lock_wanted = 0  # add/abort/shutdown calls waiting for the lock
        self._streams: dict[str, _Stream] = {}  # active requests by id
        self._orphans: set[str] = set()  # requests whose consumer left early; aborted before the next step
        self._loop_task: asyncio.Task | None = None
        self._closed = False
        self._metrics = self.engine.metrics()

    # -- public API ---------------------------------------------------------------------------

    async def generate(self, prompt, params: SamplingParams | None, request_id: str) -> AsyncIterator[RequestOutput]:
        """Adds one prompt (text or {"prompt_token_ids": [...]}) and yields its output each time it
        advances; the last output has finished=True (for n > 1: every sample finished).

        Outputs are cumulative (token_ids so far). Bad input (an empty or already active request_id,
        a bad prompt or params) raises ValueError on the first iteration, before anything is added;
        after shutdown() that raises RuntimeError. After abort() the stream simply stops (its last
        output, if any, has finished=False). An exception in an engine step is raised here. Leaving
        the iteration early (break + aclose, cancellation) aborts the request.
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        if params is not None and not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams or None, got {type(params).__name__}")
        num_samples = (params or self.engine.llm.get_default_sampling_params()).n
        async with self._holding_lock():
            if self._closed:
                raise RuntimeError("AsyncLLM was shut down; make a new one to generate")
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already active; use another id or abort it")
            self._abort_orphans()  # the id may belong to an abandoned request
            self.engine.add_request(request_id, prompt, params)
            stream = self._streams[request_id] = _Stream(num_samples)
            self._metrics = self.engine.metrics()
        self._start_loop()
        try:
            while True:
                item = await stream.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if self._streams.get(request_id) is stream:  # the consumer left before the end
                del self._streams[request_id]
                self._orphans.add(request_id)

    async def abort(self, request_id: str) -> None:
        """Stops an active request and frees its pages; its generate() stream stops after any
        outputs already queued, without a finished output.

        ValueError if no request with this id is active (never added, finished or aborted). One that
        finishes during the step abort() waits for stays finished.
        """
        stream = self._streams.get(request_id) if isinstance(request_id, str) else None
        if stream is None:
            raise ValueError(f"cannot abort request_id {request_id!r}: no active request has that id")
        async with self._holding_lock():
            if self._streams.get(request_id) is not stream:
                return  # finished (or failed) in the step that was running
            del self._streams[request_id]
            self.engine.abort(request_id)
            self._metrics = self.engine.metrics()
        stream.queue.put_nowait(_END)

    def metrics(self) -> EngineMetrics:
        """Engine metrics as of the last step, add or abort (never read while a step runs)."""
        return self._metrics

    async def shutdown(self) -> None:
        """Aborts every active request (their streams stop) and waits for the step loop to end;
        later generate() calls raise RuntimeError. Calling it again does nothing."""
        async with self._holding_lock():
            self._closed = True
            streams = list(self._streams.values())
            for request_id in self._streams:
                self.engine.abort(request_id)
            self._streams.clear()
            self._abort_orphans()
            self._metrics = self.engine.metrics()
        for stream in streams:
            stream.queue.put_nowait(_END)
        if self._loop_task is not None:
            await asyncio.wait([self._loop_task])  # not `await task`: cancelling shutdown leaves the loop be

    # -- the step loop ------------------------------------------------------------------------

    def _start_loop(self) -> None:
        # A loop task that found nothing to do finishes without suspending after the check, so a
        # task that is not done will still see requests added before it takes the lock again.
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        """Steps the engine until no request is unfinished, handing outputs to their streams.

        While no add, abort or shutdown waits for the lock, the next step starts (keeping the lock)
        before the streams' consumers take this step's outputs, so they run while it computes."""
        step = None  # a step started while the lock stayed held
        while True:
            if step is None:
                await self._lock.acquire()
            try:
                if step is None:
                    self._abort_orphans()
                    if not self.engine.has_unfinished_requests():
                        return
                    step = self._start_step()
                outputs = await self._finish_step(step)
                step = None
                self._deliver(outputs)
                if not self._lock_wanted and not self._orphans and self.engine.has_unfinished_requests():
                    self._metrics = self.engine.metrics()
                    step = self._start_step()
            except Exception as err:
                step = None
                self._fail_all(err)
                return
            except asyncio.CancelledError:
                step = None
                self._fail_all(RuntimeError("the AsyncLLM step loop was cancelled"))
                raise
            finally:
                if step is None:
                    self._metrics = self.engine.metrics()
                    self._lock.release()
            if step is None:
                await asyncio.sleep(0)  # let waiting add/abort calls take the lock (asyncio.Lock is FIFO)

    @contextlib.asynccontextmanager
    async def _holding_lock(self):
        """Holds the lock, counted as wanted while waiting for it (the step loop then starts no
        step early)."""
        self._lock_wanted += 1
        try:
            await self._lock.acquire()
        finally:
            self._lock_wanted -= 1
        try:
            yield
        finally:
            self._lock.release()

    def _start_step(self) -> asyncio.Future:
        """engine.step() in a worker thread."""
        # run_in_executor is what asyncio.to_thread does underneath, but it gives a bare future that
        # no task cancellation reaches: the lock is never released while a step still runs.
        return asyncio.get_running_loop().run_in_executor(None, self.engine.step)

    async def _finish_step(self, step: asyncio.Future) -> list[RequestOutput]:
        """The step's outputs, once it is over, even if cancelled meanwhile."""
        cancelled = False
        while not step.done():
            try:
                await asyncio.wait([step])
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        return step.result()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            merged = stream.merge(out)
            stream.queue.put_nowait(merged)
            if merged.finished:  # the engine has already dropped the finished request's record
                del self._streams[out.request_id]

    def _abort_orphans(self) -> None:
        for request_id in self._orphans:
            self.engine.abort(request_id)
        self._orphans.clear()

    def _fail_all(self, err: BaseException) -> None:
        """Raises `err` in every active stream and drops their requests from the engine."""
        for stream in self._streams.values():
            stream.queue.put_nowait(err)
        request_ids = list(self._streams) + list(self._orphans)
        self._streams.clear()
        self._orphans.clear()
        for request_id in request_ids:
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001 - best effort after a failed step; callers already get `err`
                pass
