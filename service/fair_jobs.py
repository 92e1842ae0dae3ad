"""The fair scheduler's jobs, refusals and observer hook (service/fair_queue.py schedules them)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch


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
