"""The fair scheduler's jobs, refusals and observer hook (service/fair_queue.py schedules them)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from starlette.types import Message

from models.engine import bound_stats
from models.networks import IWAE
from models.noise import request_noise
from models.rows import concat_terms, image_terms, job_rows, row_log_weights

# A job still waiting after this long gets a task watching for its client's disconnect.
WATCH_DISCONNECT_AFTER_S = 0.02


class SchedulerError(RuntimeError):
    """Base of the scheduler's refusals and job failures; ``reason`` is a short metric label."""

    reason = "error"
    retry_after_s = 1  # for refusals: when to come back, from the queued cost and the measured throughput


class QueueFullError(SchedulerError):
    reason = "queue_full"


class DrainingError(SchedulerError):
    reason = "draining"


class DeadlineError(SchedulerError, TimeoutError):
    reason = "timeout"


class CancelledJobError(SchedulerError):
    reason = "cancelled"


class ClientGoneError(CancelledJobError, ConnectionError):
    reason = "client_gone"


class Observer(Protocol):
    """Where the scheduler reports (Prometheus in the service; a no-op by default)."""

    def queue_wait(self, seconds: float) -> None: ...
    def compute(self, seconds: float, rows: int) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def dropped(self, reason: str) -> None: ...
    def queued_cost(self, cost: int) -> None: ...


class NullObserver:
    def queue_wait(self, seconds: float) -> None: ...
    def compute(self, seconds: float, rows: int) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def dropped(self, reason: str) -> None: ...
    def queued_cost(self, cost: int) -> None: ...


@dataclass
class LoglikResult:
    """Per-image results of one log-likelihood job (float64 arrays of length n_images)."""

    loglik: np.ndarray
    stderr: np.ndarray  # calibrated Monte Carlo standard error (models/uncertainty.py)
    ess: np.ndarray
    elbo: np.ndarray
    pareto_k: np.ndarray  # PSIS k̂ (models/psis.py); +inf when k is too small to fit a tail
    reliable: np.ndarray  # bool: pareto_k <= 0.7


@dataclass(eq=False)
class FairJob:
    """One request's work: ``rows`` rows (log-likelihood) or one indivisible call of cost ``rows``."""

    rows: int
    x: torch.Tensor | None = None  # [B, D] images of a log-likelihood job
    k: int = 0
    seed: int = 0
    fn: Callable[[], Any] | None = None  # a call job
    deadline: float = math.inf  # time.monotonic()
    future: Future[Any] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    assigned: int = 0  # rows handed to engine calls
    finished: int = 0  # rows computed
    failed: BaseException | None = None
    noise: list[torch.Tensor] | None = None  # [k·B, d_l] per layer
    terms: Any = None
    log_w: torch.Tensor | None = None  # [k·B]
    prepare_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def is_call(self) -> bool:
        return self.fn is not None

    @property
    def n_images(self) -> int:
        return 0 if self.x is None else int(self.x.shape[0])

    @property
    def unassigned(self) -> int:
        return self.rows - self.assigned


Piece = tuple[FairJob, int, int]  # rows [start, stop) of a job


# --- what a row job computes (the worker threads call these; the queue machinery is in fair_queue.py) -----
def prepare(job: FairJob, model: IWAE, device: torch.device) -> None:
    """Draw the job's noise and compute its image terms, once (two workers may take its chunks)."""
    with job.prepare_lock:
        if job.noise is not None:
            return
        assert job.x is not None
        x = job.x.to(device)
        nz = request_noise(model, job.k, job.n_images, job.seed)
        job.terms = image_terms(model, x)
        job.log_w = torch.empty(job.rows, dtype=x.dtype, device=device)
        job.noise = [e.reshape(job.rows, -1).to(device) for e in nz]


def compute_rows(pieces: list[Piece], model: IWAE, device: torch.device) -> None:
    """One engine call over the pieces' rows (any mix of jobs and k); each job's log-weights land in place."""
    terms, images, offset = [], [], 0
    for job, a, b in pieces:
        prepare(job, model, device)
        terms.append(job.terms)
        images.append(offset + job_rows(job.k, job.n_images, a, b).to(device))
        offset += job.n_images
    n_layers = model.config.n_layers
    noise = [torch.cat([job.noise[layer][a:b] for job, a, b in pieces]) for layer in range(n_layers)]  # type: ignore[index]
    log_w = row_log_weights(model, concat_terms(terms), torch.cat(images), noise)
    pos = 0
    for job, a, b in pieces:
        job.log_w[a:b] = log_w[pos : pos + b - a]  # type: ignore[index]
        pos += b - a


def settle(done: list[FairJob]) -> None:
    """Per-image statistics of every job a call completed: one bound_stats call per k over the jobs' [k, B]
    blocks side by side (the statistics are batch-invariant: each job gets the bits it gets alone)."""
    by_k: dict[int, list[FairJob]] = {}
    for job in done:
        by_k.setdefault(job.k, []).append(job)
    for k, jobs in by_k.items():
        # Sample-major rows (models.rows.job_rows): row s·B + i is sample s of image i.
        blocks = [job.log_w.view(k, job.n_images) for job in jobs]  # type: ignore[union-attr]
        stats = bound_stats(blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1))
        cols = [t.cpu().numpy() for t in (stats.loglik, stats.stderr, stats.ess, stats.elbo, stats.pareto_k)]
        cols.append(stats.reliable.cpu().numpy())
        start = 0
        for job in jobs:
            job.noise, job.terms, job.log_w = None, None, None  # the job outlives the call: free its memory now
            stop = start + job.n_images
            succeed(job, LoglikResult(*(c[start:stop] for c in cols)))
            start = stop


def succeed(job: FairJob, result: Any) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled meanwhile, on another thread
        job.future.set_result(result)


def fail(job: FairJob, exc: BaseException) -> None:
    job.failed = exc
    # Its buffers stay: a worker may be computing one of its chunks right now (they go with the job).
    with contextlib.suppress(InvalidStateError):  # settled meanwhile, on another thread
        job.future.set_exception(exc)


# --- waiting for a job (event loop side) ----------------------------------------------------------------
async def wait_for(
    job: FairJob,
    cancel: Callable[[FairJob, str], None],
    timeout: float | None = None,
    receive: Callable[[], Awaitable[Message]] | None = None,
) -> Any:
    """The job's result. After ``timeout`` s the job is cancelled (DeadlineError); if ``receive`` (the
    ASGI channel, its body already read) reports a disconnect, it is cancelled (ClientGoneError); so it
    is when the awaiting task is cancelled. A job cancelled while running stops at its next chunk.

    Timers rather than tasks: most jobs finish within milliseconds, and a watcher task per request would
    cost the event loop more than the work; the disconnect watcher starts once a job has waited a while."""
    if job.future.done():  # computed inline, or failed at once
        return job.future.result()
    loop = asyncio.get_running_loop()
    wrapped = asyncio.wrap_future(job.future)
    timer = loop.call_later(timeout, cancel, job, "timeout") if timeout is not None else None
    watcher: list[asyncio.Future[None]] = []

    def watch() -> None:
        async def disconnected() -> None:
            await _disconnected(receive)  # type: ignore[arg-type]
            cancel(job, "client_gone")

        watcher.append(asyncio.ensure_future(disconnected()))

    watch_timer = loop.call_later(WATCH_DISCONNECT_AFTER_S, watch) if receive is not None else None
    try:
        return await wrapped
    except asyncio.CancelledError:
        cancel(job, "cancelled")
        raise
    finally:
        for handle in (timer, watch_timer):
            if handle is not None:
                handle.cancel()
        for task in watcher:
            task.cancel()


async def _disconnected(receive: Callable[[], Awaitable[Message]]) -> None:
    # Called after the body was read, so the only message left to come is the disconnect.
    while (await receive()).get("type") != "http.disconnect":
        pass
