"""One batching engine per loaded model: a bounded queue, a worker thread, and dynamic batching of /loglik.

Requests are queued as jobs. The worker takes the oldest job; if it is a log-likelihood job it then gathers
more queued log-likelihood jobs with the same k until the batch cost (images × k) or the request count is
reached, or until ``max_wait`` has passed since the first job arrived (it waits only when the previous
batch held several requests: a lone client is never delayed). The batch is computed in one call of
the L_k engine: images are concatenated, and so is each job's own noise, drawn from its own seed. Results
therefore depend only on (image, k, seed), never on which requests share a batch. Other work (encode,
sample, active units) runs on the same thread one job at a time, so the device is used by one thread only.

The event loop never computes: it enqueues, then awaits a future that the worker resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from models.engine import DEFAULT_CHUNK_ROWS, bound_stats, engine_log_weights, rows_for_budget
from service.loglik import LoglikStats, loglik_stats
from service.metrics import Metrics
from service.registry import LoadedModel
from service.settings import Settings

log = logging.getLogger("iwae.service")

# A job still waiting after this long gets a task watching for its client's disconnect.
WATCH_DISCONNECT_AFTER_S = 0.02
# Jobs of at least this many samples (images × k) get their noise drawn ahead by the prefetcher thread;
# smaller ones are drawn by the worker (microseconds: not worth a thread hand-over).
PREFETCH_MIN_COST = 4096


class QueueFullError(RuntimeError):
    """The model's queue holds ``queue_size`` waiting requests already."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down."""


class JobTimeoutError(TimeoutError):
    """The request spent longer than the timeout waiting and computing."""


class ClientGoneError(ConnectionError):
    """The client disconnected before its result was ready."""


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class Job:
    """One request's work. ``kind`` "loglik" jobs can share a batch; "call" jobs run ``fn`` alone."""

    kind: str
    cost: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    x: torch.Tensor | None = None
    k: int = 0
    seed: int = 0
    fn: Callable[[LoadedModel], Any] | None = None
    enqueued: float = field(default_factory=time.monotonic)
    state: JobState = JobState.PENDING
    watcher: asyncio.Future[None] | None = None
    # Noise drawn ahead of the batch by the prefetcher (None: not yet; the worker draws it if still None).
    noise: list[torch.Tensor] | None = None
    noise_drawing: threading.Event | None = None


def draw_request_noise(model: torch.nn.Module, k: int, n: int, seed: int) -> list[torch.Tensor]:
    """The determinism contract shared with `iwae eval`: CPU float32 noise from a generator seeded with ``seed``."""
    return model.draw_noise(k, n, generator=torch.Generator().manual_seed(seed))  # type: ignore[operator]


def chunk_rows_for(loaded: LoadedModel, memory_bytes: int) -> int:
    """Rows per engine chunk: within the memory budget, and on CPUs no more than the engine's cache-sized
    default (larger chunks spill the [rows, D] block out of cache and run slower there)."""
    rows = rows_for_budget(loaded.model, memory_bytes)
    return rows if loaded.device.type == "cuda" else min(rows, DEFAULT_CHUNK_ROWS)


async def _wait_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    # Called after the body was read, so the only message left to come is the disconnect.
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


class BatchingEngine:
    def __init__(self, loaded: LoadedModel, settings: Settings, metrics: Metrics) -> None:
        self.loaded = loaded
        self.name = loaded.name
        self.batch_cost = settings.batch_cost
        self.max_batch_requests = settings.max_batch_requests
        self.max_wait = settings.max_wait_ms / 1000.0
        self.queue_size = settings.queue_size
        self.chunk_rows = chunk_rows_for(loaded, settings.memory_bytes)
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._paused = False
        self._stopping = False
        self._last_batch_requests = 1
        # Queued samples whose noise is drawn or being drawn: the prefetcher stays within two batches' worth.
        self._prefetched_cost = 0
        self.prefetch_budget = 2 * settings.batch_cost
        self._thread = threading.Thread(target=self._run, name=f"iwae-engine-{loaded.name}", daemon=True)
        self._prefetcher = threading.Thread(target=self._prefetch, name=f"iwae-noise-{loaded.name}", daemon=True)
        self._depth = metrics.queue_depth.labels(self.name)
        self._depth.set(0)

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._prefetcher.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in progress, fail the queued jobs, join the worker."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._prefetched_cost = 0
            self._depth.set(0)
            self._cond.notify_all()
        for job in pending:
            job.state = JobState.CANCELLED
            self._resolve(job, exc=EngineStoppedError("the service is shutting down"))
        for thread in (self._thread, self._prefetcher):
            if thread.is_alive():
                thread.join(timeout)

    def pause(self) -> None:
        """Hold the worker after its current batch (queued jobs wait; used for draining and in tests)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        return len(self._queue)

    # --- submission (event loop side) -----------------------------------------------------------------
    def submit_loglik(self, x: torch.Tensor, k: int, seed: int) -> Job:
        loop = asyncio.get_running_loop()
        job = Job("loglik", cost=int(x.shape[0]) * k, loop=loop, future=loop.create_future(), x=x, k=k, seed=seed)
        self._submit(job)
        return job

    def submit_call(self, fn: Callable[[LoadedModel], Any], cost: int = 1) -> Job:
        loop = asyncio.get_running_loop()
        job = Job("call", cost=cost, loop=loop, future=loop.create_future(), fn=fn)
        self._submit(job)
        return job

    def _submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the service is shutting down")
            if len(self._queue) >= self.queue_size:
                self.metrics.rejected.labels(self.name).inc()
                raise QueueFullError(f"model {self.name!r} has {len(self._queue)} requests queued (the limit)")
            self._queue.append(job)
            self._depth.set(len(self._queue))
            self._cond.notify_all()  # the worker and the noise prefetcher

    def cancel(self, job: Job, reason: str) -> None:
        """Drop a job that has not started; a running job's result is discarded."""
        with self._cond:
            if job.state is JobState.PENDING:
                try:
                    self._queue.remove(job)
                    self._left_queue(job)
                except ValueError:
                    pass  # already taken into a forming batch; the worker skips it
                self._depth.set(len(self._queue))
                self.metrics.dropped.labels(self.name, reason).inc()
            if job.state in (JobState.PENDING, JobState.RUNNING):
                job.state = JobState.CANCELLED

    async def wait(
        self,
        job: Job,
        timeout: float,
        receive: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> Any:
        """The job's result; JobTimeoutError after ``timeout`` s, ClientGoneError if ``receive`` says the
        client disconnected. Either way the job is dropped if it has not started.

        Timers rather than tasks: most jobs finish within milliseconds, and a watcher task per request
        would cost more than the work. The disconnect watcher starts only once a job has waited a while."""
        loop = job.loop
        timer = loop.call_later(timeout, self._expire, job, JobTimeoutError(f"no result within {timeout:g} s"))
        watch = loop.call_later(WATCH_DISCONNECT_AFTER_S, self._watch, job, receive) if receive is not None else None
        try:
            return await job.future
        except asyncio.CancelledError:
            self.cancel(job, "cancelled")
            raise
        finally:
            timer.cancel()
            if watch is not None:
                watch.cancel()
            if job.watcher is not None:
                job.watcher.cancel()

    def _expire(self, job: Job, exc: BaseException) -> None:
        if not job.future.done():
            self.cancel(job, "client_gone" if isinstance(exc, ClientGoneError) else "timeout")
            job.future.set_exception(exc)

    def _watch(self, job: Job, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        async def watcher() -> None:
            await _wait_disconnect(receive)
            self._expire(job, ClientGoneError("client disconnected"))

        if not job.future.done():
            job.watcher = asyncio.ensure_future(watcher())

    # --- worker thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except Exception:  # the worker must survive anything a batch throws
                log.exception("engine %s: unexpected error", self.name)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while (not self._queue or self._paused) and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue.popleft()
            self._left_queue(first)
            batch = [first]
            if first.kind == "loglik":
                cost = first.cost
                # Wait for company only when the last batch had some: a lone client (or a trickle of
                # requests) then pays no wait at all, while concurrent clients keep filling batches.
                wait = self.max_wait if self._last_batch_requests > 1 else 0.0
                deadline = first.enqueued + wait
                while len(batch) < self.max_batch_requests and cost < self.batch_cost:
                    job = self._take_compatible(first.k, self.batch_cost - cost)
                    if job is not None:
                        batch.append(job)
                        cost += job.cost
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
            if first.kind == "loglik":
                self._last_batch_requests = len(batch)
            now = time.monotonic()
            live = []
            for job in batch:
                if job.state is JobState.PENDING:
                    job.state = JobState.RUNNING
                    self.metrics.queue_wait.labels(self.name).observe(now - job.enqueued)
                    live.append(job)
            self._depth.set(len(self._queue))
            return live

    def _take_compatible(self, k: int, budget: int) -> Job | None:
        for i, job in enumerate(self._queue):
            if job.kind == "loglik" and job.k == k and job.cost <= budget and job.state is JobState.PENDING:
                del self._queue[i]
                self._left_queue(job)
                return job
        return None

    def _left_queue(self, job: Job) -> None:
        """Bookkeeping for a job leaving the queue (call with the lock held)."""
        if job.noise_drawing is not None:
            self._prefetched_cost -= job.cost
            self._cond.notify_all()  # the prefetcher may draw ahead again

    # --- noise prefetcher thread ----------------------------------------------------------------------
    def _prefetch(self) -> None:
        """Draw queued jobs' noise while the worker computes the batch before them: on a machine with a
        spare core this takes the noise off the worker's critical path."""
        model = self.loaded.model
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    job = self._next_to_prefetch() if self._prefetched_cost < self.prefetch_budget else None
                    if job is not None:
                        break
                    self._cond.wait()
                job.noise_drawing = threading.Event()
                self._prefetched_cost += job.cost
            assert job.x is not None
            noise = None
            try:
                noise = draw_request_noise(model, job.k, int(job.x.shape[0]), job.seed)
            finally:  # on failure the worker draws it (and reports the error)
                with self._cond:
                    job.noise = noise if job.state is not JobState.CANCELLED else None
                    job.noise_drawing.set()

    def _next_to_prefetch(self) -> Job | None:
        for job in self._queue:
            if (
                job.kind == "loglik"
                and job.noise_drawing is None
                and job.cost >= PREFETCH_MIN_COST
                and job.state is JobState.PENDING
            ):
                return job
        return None

    def _execute(self, batch: list[Job]) -> None:
        # A job cancelled after it was batched (client gone, timeout) is dropped here, before compute.
        live = [j for j in batch if j.state is JobState.RUNNING]
        if not live:
            return
        start = time.perf_counter()
        try:
            if live[0].kind == "loglik":
                results = self._loglik(live)
            else:
                assert live[0].fn is not None
                with torch.inference_mode():
                    results = [live[0].fn(self.loaded)]
        except torch.OutOfMemoryError as e:
            if len(live) > 1:
                log.warning("engine %s: out of memory on a batch of %d; computing one by one", self.name, len(live))
                for job in live:
                    self._execute([job])
                return
            self._fail(live, e)
            return
        except Exception as e:
            log.exception("engine %s: batch failed", self.name)
            self._fail(live, e)
            return
        if live[0].kind == "loglik":
            m, name = self.metrics, self.name
            m.batch_size.labels(name).observe(len(live))
            m.batch_images.labels(name).observe(sum(int(j.x.shape[0]) for j in live))  # type: ignore[union-attr]
            m.batch_cost.labels(name).observe(sum(j.cost for j in live))
            m.batch_seconds.labels(name).observe(time.perf_counter() - start)
            m.samples.labels(name).inc(sum(j.cost for j in live))
        for job in live:
            if job.state is JobState.RUNNING:
                job.state = JobState.DONE
        self._resolve_many(live, results)

    def _loglik(self, jobs: list[Job]) -> list[LoglikStats]:
        model, device = self.loaded.model, self.loaded.device
        k = jobs[0].k
        xs = [j.x for j in jobs]
        noises = []
        for job, x in zip(jobs, xs, strict=True):
            if job.noise_drawing is not None:
                job.noise_drawing.wait()  # the prefetcher is drawing it right now, or has
            noise = job.noise
            job.noise = None  # the job outlives the batch (until its response is sent): free the memory now
            noises.append(noise if noise is not None else draw_request_noise(model, k, int(x.shape[0]), job.seed))  # type: ignore[union-attr]
        if len(jobs) == 1:
            x, noise = xs[0], noises[0]
        else:
            x = torch.cat(xs, dim=0)  # type: ignore[arg-type]
            noise = [torch.cat([nz[layer] for nz in noises], dim=1) for layer in range(len(noises[0]))]
        assert x is not None
        x = x.to(device)
        noise = [e.to(device) for e in noise]
        log_w = engine_log_weights(model, x, noise, chunk_rows=self.chunk_rows)
        stats = loglik_stats(bound_stats(log_w), torch.full((x.shape[0],), k))
        out, start = [], 0
        for xj in xs:
            stop = start + int(xj.shape[0])  # type: ignore[union-attr]
            out.append(stats.rows(start, stop))
            start = stop
        return out

    def _fail(self, jobs: list[Job], exc: BaseException) -> None:
        for job in jobs:
            self._resolve(job, exc=exc)

    @staticmethod
    def _resolve_many(jobs: list[Job], results: list[Any]) -> None:
        """Hand a batch's results to the event loop in one callback (one wake-up, not one per request)."""

        def settle() -> None:
            for job, result in zip(jobs, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)

        loops = {id(j.loop): j.loop for j in jobs}
        if len(loops) > 1:  # jobs from several event loops (not in a normal server): one by one
            for job, result in zip(jobs, results, strict=True):
                BatchingEngine._resolve(job, result=result)
            return
        with contextlib.suppress(RuntimeError):
            jobs[0].loop.call_soon_threadsafe(settle)

    @staticmethod
    def _resolve(job: Job, result: Any = None, exc: BaseException | None = None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)

        # RuntimeError: the event loop is closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(settle)
