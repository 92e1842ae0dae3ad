"""A fair, chunked scheduler for one model: jobs are split into chunks of rows and interleaved.

A log-likelihood job of B images at k samples is k·B rows (one per (sample, image) pair, sample-major like
its noise [k, B, d]). Every engine call computes one chunk of at most ``chunk_rows`` rows (the memory budget,
``models.engine.chunk_rows_for``), filled from the live jobs by shortest remaining rows first, so a small job
is done after at most one chunk of anyone else's work. Rows of different jobs, with different images and k,
share a call (models/rows.py). The aging guard: the oldest job always gets at least a quarter of every call,
so a stream of small jobs slows a big one by at most 4× and never starves it. Other work (encode, sample,
active units) is a "call" job: one indivisible unit, scheduled by its cost, run alone.

Between chunks the scheduler drops jobs past their deadline or cancelled (client gone), so an abandoned big
job stops within about one chunk; ``rows_computed`` counts what was computed. Several worker threads (each
with its own torch threads) take chunks concurrently, also chunks of the same job, which keeps every core
busy under load; a tiny job that arrives while nothing is running is computed at once on the caller's thread
(no hand-off). Each job's noise comes from its own seed (``models.noise.request_noise``), so its numbers do
not depend on the company it kept.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from starlette.types import Message

from models.networks import IWAE
from service.fair_jobs import (
    CancelledJobError,
    ClientGoneError,
    DeadlineError,
    DrainingError,
    FairJob,
    LoglikResult,
    NullObserver,
    Observer,
    Piece,
    QueueFullError,
    SchedulerError,
    compute_rows,
    fail,
    settle,
    succeed,
    wait_for,
)

__all__ = [
    "CancelledJobError",
    "ClientGoneError",
    "DeadlineError",
    "DrainingError",
    "FairJob",
    "FairScheduler",
    "LoglikResult",
    "NullObserver",
    "Observer",
    "QueueFullError",
    "SchedulerError",
]

log = logging.getLogger("iwae.service")

# The oldest job's guaranteed share of each engine call (the aging guard against starvation).
OLDEST_SHARE = 4
# A job of at most this many rows (or call cost) may be computed on the caller's thread (see _may_run_inline).
INLINE_MAX_ROWS = 512
# While workers compute, tiny jobs computed inline may take at most this share of the event loop's time: each
# one is followed by a pause (INLINE_SHARE - 1 times its compute time, at most INLINE_PACE_MAX_S) before the
# next may run inline. Without it a client sending small requests one after another keeps the event loop
# computing all the time, a third runnable thread on two cores, and a big job running meanwhile took 1.6-1.9×
# as long (docs/benchmarks.md).
INLINE_SHARE = 0.125
INLINE_PACE_MAX_S = 0.02
# Retry-After bounds (seconds) and the throughput assumed before anything was measured (rows/s).
RETRY_AFTER_BOUNDS = (1, 60)
INITIAL_ROWS_PER_S = 200_000.0


class FairScheduler:
    """Chunked, interleaved execution of one model's jobs on ``workers`` threads (see the module docstring)."""

    def __init__(
        self,
        model: IWAE,
        device: torch.device,
        chunk_rows: int,
        queue_size: int = 512,
        workers: int = 1,
        threads_per_worker: int | None = None,
        observer: Observer | None = None,
        name: str = "model",
    ) -> None:
        self.model, self.device, self.name = model, device, name
        self.chunk_rows = max(1, chunk_rows)
        self.queue_size = queue_size
        self.threads_per_worker = threads_per_worker
        self.observer: Observer = observer or NullObserver()
        self.rows_computed = 0
        self.engine_calls = 0
        self._jobs: list[FairJob] = []  # live: not every row assigned yet, or some still computing
        # Workers wait on _cond for work to plan; wait_idle waits on _idle (the same lock) for jobs to end. Two
        # conditions so that finishing a call wakes no idle worker: a wake-up per tiny inline job cost the event
        # loop a GIL round trip with each woken worker, for nothing to plan.
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        self._idle = threading.Condition(lock)
        self._busy = 0  # engine calls in progress (workers and inline)
        self._small_calls = 0  # worker calls in progress that hold small (≤ INLINE_MAX_ROWS) row jobs only
        self._accepting, self._stopping, self._paused = True, False, False
        self._rows_per_s = INITIAL_ROWS_PER_S
        self._inline_next = 0.0  # time.monotonic() from which a tiny job may run inline while workers compute
        self._threads = [
            threading.Thread(target=self._work, name=f"iwae-fair-{name}-{i}", daemon=True) for i in range(workers)
        ]

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        for t in self._threads:
            t.start()

    def pause(self) -> None:
        """Hold the workers after their current call (jobs keep queueing; for tests)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def begin_drain(self) -> None:
        """Refuse new jobs from now on (DrainingError); queued and running ones go on."""
        with self._cond:
            self._accepting = False

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is live (True) or ``timeout`` s have passed (False)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._jobs or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Fail every live job, let the running calls end, join the workers."""
        with self._cond:
            self._accepting, self._stopping = False, True
            live, self._jobs = self._jobs, []
            self._cond.notify_all()
            self._idle.notify_all()
        for job in live:
            fail(job, DrainingError("the service is shutting down"))
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    # --- state --------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._jobs)

    @property
    def queued_cost(self) -> int:
        """Rows (or call costs) not yet computed, over every live job."""
        with self._cond:
            return self._queued_cost()

    def _queued_cost(self) -> int:
        return sum(j.rows - j.finished for j in self._jobs)

    def retry_after(self) -> int:
        """Seconds until the queued work is likely done, from the measured throughput, within 1..60."""
        with self._cond:
            return self._retry_after()

    def _retry_after(self) -> int:
        low, high = RETRY_AFTER_BOUNDS
        return int(min(high, max(low, math.ceil(self._queued_cost() / max(self._rows_per_s, 1.0)))))

    # --- submission ---------------------------------------------------------------------------------
    def submit_loglik(
        self, x: torch.Tensor, k: int, seed: int, deadline: float = math.inf, inline_ok: bool = True
    ) -> FairJob:
        if k < 1 or x.dim() != 2 or x.shape[0] < 1:
            raise ValueError(f"need k >= 1 and x [B >= 1, D], got k={k}, x {list(x.shape)}")
        job = FairJob(rows=k * int(x.shape[0]), x=x, k=k, seed=seed, deadline=deadline)
        return self._submit(job, inline_ok)

    def submit_call(
        self, fn: Callable[[], Any], cost: int = 1, deadline: float = math.inf, inline_ok: bool = True
    ) -> FairJob:
        return self._submit(FairJob(rows=max(1, cost), fn=fn, deadline=deadline), inline_ok)

    def _submit(self, job: FairJob, inline_ok: bool) -> FairJob:
        with self._cond:
            refusal: SchedulerError | None = None
            if not self._accepting:
                refusal = DrainingError("the service is draining: it finishes the work in hand and takes no more")
            elif len(self._jobs) >= self.queue_size:
                refusal = QueueFullError(f"model {self.name!r} has {len(self._jobs)} requests queued (the limit)")
            if refusal is not None:
                refusal.retry_after_s = self._retry_after()
                self.observer.rejected(refusal.reason)
                raise refusal
            inline = inline_ok and self._may_run_inline(job)
            workers_busy = self._busy > 0
            if inline:
                self._busy += 1
                job.assigned = job.rows
            self._jobs.append(job)
            self.observer.queued_cost(self._queued_cost())
            if not inline:
                self._cond.notify()
                return job
        start = time.monotonic()
        self._run_pieces([(job, 0, job.rows)])  # a tiny job: no thread hand-off, no wait behind a big chunk
        if workers_busy:
            end = time.monotonic()
            self._inline_next = end + min(INLINE_PACE_MAX_S, (end - start) * (1 / INLINE_SHARE - 1))
        return job

    def inline_pace(self, rows: int) -> float:
        """Seconds a tiny job of ``rows`` rows should wait before it is submitted, so that inline jobs take at
        most INLINE_SHARE of the event loop while workers compute (0 when they are idle, or for other jobs)."""
        if rows > INLINE_MAX_ROWS or self._busy == 0:
            return 0.0
        return max(0.0, self._inline_next - time.monotonic())

    def _may_run_inline(self, job: FairJob) -> bool:
        """A tiny job runs on the caller's thread at once unless another small job waits: then it joins it in
        an engine call (the caller says, with ``inline_ok``, whether other requests are in flight)."""
        if self._paused or job.rows > INLINE_MAX_ROWS:
            return False
        return not any(j.unassigned > 0 and j.rows <= INLINE_MAX_ROWS for j in self._jobs)

    def cancel(self, job: FairJob, reason: str = "cancelled") -> None:
        """Stop a job between chunks: its remaining rows are never computed."""
        exc: SchedulerError
        if reason == "timeout":
            exc = DeadlineError("no result before the deadline")
        else:
            exc = (ClientGoneError if reason == "client_gone" else CancelledJobError)(f"job stopped: {reason}")
        with self._cond:
            if job in self._jobs:
                self._drop(job, exc, reason)

    # --- planning (under the lock) --------------------------------------------------------------------
    def _plan(self) -> list[Piece] | None:
        """The next engine call: one call job, or a chunk of rows from several jobs (shortest remaining first,
        the oldest job guaranteed 1/OLDEST_SHARE of it)."""
        now = time.monotonic()
        for job in [j for j in self._jobs if j.deadline <= now and j.unassigned]:
            self._drop(job, DeadlineError("deadline passed before the job was done"), "timeout")
        ready = [j for j in self._jobs if j.unassigned > 0]
        if not ready:
            return None
        if self._small_calls and all(_small_rows_job(j) for j in ready):
            # Small jobs wait for the worker computing small jobs, which plans again when its call ends: their
            # arithmetic is Python-bound, so a second worker only contended for the GIL with it and the event
            # loop (k=50 c=32 at 1 torch thread: 3.3-3.8 ms of CPU per request against 2.2 with one).
            return None
        order = sorted(ready, key=lambda j: (j.unassigned, j.enqueued))
        if order[0].is_call:
            job = order[0]
            job.assigned = job.rows
            return [(job, 0, job.rows)]
        budget = self.chunk_rows
        take: dict[int, int] = {}
        oldest = min((j for j in ready if not j.is_call), key=lambda j: j.enqueued)
        if oldest is not order[0]:
            take[id(oldest)] = min(oldest.unassigned, budget // OLDEST_SHARE)
            budget -= take[id(oldest)]
        for job in order:
            if budget <= 0:
                break
            if job.is_call:
                continue
            extra = min(job.unassigned - take.get(id(job), 0), budget)
            take[id(job)] = take.get(id(job), 0) + extra
            budget -= extra
        # A call that completes some jobs returns their answers only when it ends: keep it short by giving
        # the jobs it does not complete no more than the oldest job's guaranteed share.
        completes = any(take.get(id(j), 0) == j.unassigned for j in order)
        if completes:
            for j in order:
                if 0 < take.get(id(j), 0) < j.unassigned:
                    take[id(j)] = min(take[id(j)], self.chunk_rows // OLDEST_SHARE)
        pieces = []
        for job in order:
            n = take.get(id(job), 0)
            if n > 0:
                pieces.append((job, job.assigned, job.assigned + n))
                job.assigned += n
        return pieces

    def _drop(self, job: FairJob, exc: SchedulerError, reason: str) -> None:
        self._jobs.remove(job)
        self.observer.dropped(reason)
        self.observer.queued_cost(self._queued_cost())
        fail(job, exc)
        self._idle.notify_all()

    # --- execution ----------------------------------------------------------------------------------
    def _work(self) -> None:
        if self.threads_per_worker:
            torch.set_num_threads(self.threads_per_worker)
        while True:
            with self._cond:
                pieces = None
                while not self._stopping:
                    pieces = None if self._paused else self._plan()
                    if pieces:
                        break
                    self._cond.wait()
                if self._stopping:
                    return
                self._busy += 1
                small = all(_small_rows_job(job) for job, _, _ in pieces)  # type: ignore[union-attr]
                self._small_calls += small
            try:
                self._run_pieces(pieces)  # type: ignore[arg-type]
            finally:
                with self._cond:
                    self._small_calls -= small

    def _run_pieces(self, pieces: list[Piece]) -> None:
        """Compute one engine call and settle what it completes. Never raises: failures go to the jobs."""
        start = time.perf_counter()
        now = time.monotonic()
        for job, _, _ in pieces:
            if job.started is None:
                job.started = now
                self.observer.queue_wait(now - job.enqueued)
        rows = sum(b - a for _, a, b in pieces)
        error: BaseException | None = None
        try:
            with torch.inference_mode():
                if pieces[0][0].is_call:
                    result = pieces[0][0].fn()  # type: ignore[misc]
                else:
                    self._compute_rows(pieces)
        except Exception as exc:  # a failing call must fail its jobs, never the worker
            log.exception("scheduler %s: engine call failed", self.name)
            error = exc
        seconds = time.perf_counter() - start
        done: list[FairJob] = []
        with self._cond:
            self._busy -= 1
            self.engine_calls += 1
            self.rows_computed += rows
            if seconds > 0 and rows >= 64:  # EWMA of the throughput, for Retry-After
                self._rows_per_s = 0.8 * self._rows_per_s + 0.2 * rows / seconds * max(1, len(self._threads))
            for job, a, b in pieces:
                job.finished += b - a
                if job in self._jobs and (error is not None or job.finished == job.rows):
                    self._jobs.remove(job)
                    done.append(job)
            self.observer.queued_cost(self._queued_cost())
            # Completing rows creates no work to plan (a worker plans again itself when its call ends).
            self._idle.notify_all()
        self.observer.compute(seconds, rows)
        if error is not None:
            for job in done:
                fail(job, error)
        elif pieces[0][0].is_call:
            if done:
                succeed(done[0], result)
        else:
            settle(done)

    def _compute_rows(self, pieces: list[Piece]) -> None:
        compute_rows(pieces, self.model, self.device)

    # --- waiting (event loop side) ------------------------------------------------------------------
    async def wait(
        self, job: FairJob, timeout: float | None = None, receive: Callable[[], Awaitable[Message]] | None = None
    ) -> Any:
        """The job's result, cancelling it on a deadline, a disconnect or a cancelled task (fair_jobs.wait_for)."""
        return await wait_for(job, self.cancel, timeout, receive)


def _small_rows_job(job: FairJob) -> bool:
    return not job.is_call and job.rows <= INLINE_MAX_ROWS
