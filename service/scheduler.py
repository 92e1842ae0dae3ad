"""One scheduler per loaded model: a bounded queue of jobs, a worker thread that owns the model's device, and a
helper thread that prepares queued jobs ahead of their batch (draws their noise).

The worker takes the oldest job and opens a batch with it. If the batch is joinable (log-likelihood jobs) it
then gathers more queued jobs the batch accepts (same k) until the batch cost (images × k) or the request
count is reached, or until ``max_wait`` has passed since the first job arrived (it waits only when the
previous batch held several requests: a lone client is never delayed). Every batch runs on this one thread,
so one thread uses the device. What a batch computes is in service/jobs.py.

The event loop never computes: it enqueues, then awaits a future that the worker resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import torch

from models.engine import chunk_rows_for
from service.errors import ClientGoneError, JobTimeoutError, QueueFullError, ShuttingDownError
from service.jobs import Batch, Device, Job, JobState
from service.metrics import Metrics
from service.registry import LoadedModel
from service.settings import Settings

log = logging.getLogger("iwae.service")

T = TypeVar("T")
Receive = Callable[[], Awaitable[dict[str, Any]]]
# A job still waiting after this long gets a task watching for its client's disconnect.
WATCH_DISCONNECT_AFTER_S = 0.02


async def _wait_disconnect(receive: Receive) -> None:
    # Called after the body was read, so the only message left to come is the disconnect.
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


class Scheduler:
    def __init__(self, loaded: LoadedModel, settings: Settings, metrics: Metrics) -> None:
        self.loaded = loaded
        self.name = loaded.name
        self.device = Device(loaded, chunk_rows_for(loaded.model, loaded.device, settings.memory_bytes))
        self.batch_cost = settings.batch_cost
        self.max_batch_requests = settings.max_batch_requests
        self.max_wait = settings.max_wait_ms / 1000.0
        self.queue_size = settings.queue_size
        self.retry_after_s = settings.retry_after_s
        self.metrics = metrics
        self._queue: deque[Job[Any]] = deque()
        self._cond = threading.Condition()
        self._paused = False
        self._stopping = False
        self._last_batch_requests = 1
        # Queued cost whose preparation is done or under way: the helper stays within two batches' worth.
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
        """Finish the batch in progress, fail the queued jobs, join the threads."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._prefetched_cost = 0
            self._depth.set(0)
            self._cond.notify_all()
        for job in pending:
            job.state = JobState.CANCELLED
            self._resolve(job, exc=ShuttingDownError(self.retry_after_s))
        for thread in (self._thread, self._prefetcher):
            if thread.is_alive():
                thread.join(timeout)

    def pause(self) -> None:
        """Hold the worker after its current batch; queued jobs wait (tests use it to fill the queue)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        return len(self._queue)

    # --- event loop side ------------------------------------------------------------------------------
    def submit(self, job: Job[T]) -> Job[T]:
        """Queue ``job``; QueueFullError or ShuttingDownError at once if it cannot be."""
        with self._cond:
            if self._stopping:
                raise ShuttingDownError(self.retry_after_s)
            if len(self._queue) >= self.queue_size:
                self.metrics.rejected.labels(self.name).inc()
                raise QueueFullError(
                    f"model {self.name!r} has {len(self._queue)} requests queued (the limit); "
                    f"retry after {self.retry_after_s} s",
                    self.retry_after_s,
                )
            self._queue.append(job)
            self._depth.set(len(self._queue))
            self._cond.notify_all()  # the worker and the prefetcher
        return job

    def cancel(self, job: Job[Any], reason: str) -> None:
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

    async def wait(self, job: Job[T], timeout: float, receive: Receive | None = None) -> T:
        """The job's result; JobTimeoutError after ``timeout`` s, ClientGoneError if ``receive`` says the
        client disconnected. Either way the job is dropped if it has not started.

        Timers rather than tasks: most jobs finish within milliseconds, and a watcher task per request
        would cost more than the work. The disconnect watcher starts only once a job has waited a while."""
        loop = job.loop
        timer = loop.call_later(timeout, self._expire, job, JobTimeoutError(timeout))
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

    async def run(self, job: Job[T], timeout: float, receive: Receive | None = None) -> T:
        """Submit ``job`` and wait for its result."""
        return await self.wait(self.submit(job), timeout, receive)

    def _expire(self, job: Job[Any], exc: BaseException) -> None:
        if not job.future.done():
            self.cancel(job, "client_gone" if isinstance(exc, ClientGoneError) else "timeout")
            job.future.set_exception(exc)

    def _watch(self, job: Job[Any], receive: Receive) -> None:
        async def watcher() -> None:
            await _wait_disconnect(receive)
            self._expire(job, ClientGoneError())

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

    def _next_batch(self) -> Batch | None:
        with self._cond:
            while (not self._queue or self._paused) and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue.popleft()
            self._left_queue(first)
            batch = first.open_batch()
            if batch.joinable:
                self._fill(batch, first)
                self._last_batch_requests = len(batch.jobs)
            now = time.monotonic()
            for job in batch.jobs:
                if job.state is JobState.PENDING:
                    job.state = JobState.RUNNING
                    self.metrics.queue_wait.labels(self.name).observe(now - job.enqueued)
            self._depth.set(len(self._queue))
            return batch

    def _fill(self, batch: Batch, first: Job[Any]) -> None:
        """Add queued jobs the batch accepts, within the budget (call with the lock held)."""
        cost = first.cost
        # Wait for company only when the last batch had some: a lone client (or a trickle of requests) then
        # pays no wait at all, while concurrent clients keep filling batches.
        wait = self.max_wait if self._last_batch_requests > 1 else 0.0
        deadline = first.enqueued + wait
        while len(batch.jobs) < self.max_batch_requests and cost < self.batch_cost:
            job = self._take_compatible(batch, self.batch_cost - cost)
            if job is not None:
                cost += job.cost
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                break
            self._cond.wait(remaining)

    def _take_compatible(self, batch: Batch, budget: int) -> Job[Any] | None:
        for i, job in enumerate(self._queue):
            if job.cost <= budget and job.state is JobState.PENDING and batch.take(job):
                del self._queue[i]
                self._left_queue(job)
                return job
        return None

    def _left_queue(self, job: Job[Any]) -> None:
        """Bookkeeping for a job leaving the queue (call with the lock held)."""
        if job.preparing is not None:
            self._prefetched_cost -= job.cost
            self._cond.notify_all()  # the prefetcher may prepare ahead again

    # --- prefetcher thread ------------------------------------------------------------------------------
    def _prefetch(self) -> None:
        """Prepare queued jobs (draw their noise) while the worker computes the batch before them: on a
        machine with a spare core this takes the preparation off the worker's critical path."""
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    job = self._next_to_prefetch() if self._prefetched_cost < self.prefetch_budget else None
                    if job is not None:
                        break
                    self._cond.wait()
                done = job.preparing = threading.Event()
                self._prefetched_cost += job.cost
            try:
                job.prepare(self.loaded)
            finally:  # on failure the worker prepares it (and reports the error)
                with self._cond:
                    if job.state is JobState.CANCELLED:
                        job.discard_prepared()
                    done.set()

    def _next_to_prefetch(self) -> Job[Any] | None:
        for job in self._queue:
            if job.preparing is None and job.state is JobState.PENDING and job.wants_prepare():
                return job
        return None

    def _execute(self, batch: Batch) -> None:
        start = time.perf_counter()
        try:
            results = batch.run(self.device)
        except torch.OutOfMemoryError as e:
            live = [j for j in batch.jobs if j.state is JobState.RUNNING]
            if len(live) > 1:
                log.warning("engine %s: out of memory on a batch of %d; computing one by one", self.name, len(live))
                for job in live:
                    self._execute(job.open_batch())
                return
            self._fail(live, e)
            return
        except Exception as e:
            log.exception("engine %s: batch failed", self.name)
            self._fail([j for j in batch.jobs if j.state is JobState.RUNNING], e)
            return
        if not results:
            return
        if batch.joinable:
            self._observe(batch, [job for job, _ in results], time.perf_counter() - start)
        for job, _ in results:
            if job.state is JobState.RUNNING:
                job.state = JobState.DONE
        self._resolve_many(results)

    def _observe(self, batch: Batch, jobs: list[Job[Any]], seconds: float) -> None:
        m, name = self.metrics, self.name
        cost = sum(j.cost for j in jobs)
        m.batch_size.labels(name).observe(len(jobs))
        m.batch_images.labels(name).observe(batch.images)
        m.batch_cost.labels(name).observe(cost)
        m.batch_seconds.labels(name).observe(seconds)
        m.samples.labels(name).inc(cost)

    def _fail(self, jobs: list[Job[Any]], exc: BaseException) -> None:
        for job in jobs:
            self._resolve(job, exc=exc)

    @staticmethod
    def _resolve_many(results: list[tuple[Job[Any], Any]]) -> None:
        """Hand a batch's results to the event loop in one callback (one wake-up, not one per request)."""

        def settle() -> None:
            for job, result in results:
                if not job.future.done():
                    job.future.set_result(result)

        loops = {id(j.loop): j.loop for j, _ in results}
        if len(loops) > 1:  # jobs from several event loops (not in a normal server): one by one
            for job, result in results:
                Scheduler._resolve(job, result=result)
            return
        with contextlib.suppress(RuntimeError):
            results[0][0].loop.call_soon_threadsafe(settle)

    @staticmethod
    def _resolve(job: Job[Any], result: Any = None, exc: BaseException | None = None) -> None:
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
