"""The app's side of the fair scheduler: one per model, sized to the machine; request deadlines; draining.

Kept apart from the routes so that they only ask for "this model's scheduler" and "this request's timeout".
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

import torch
from starlette.types import ASGIApp, Receive, Scope, Send

from models.engine import chunk_rows_for
from service.fair_queue import FairScheduler
from service.registry import LoadedModel, ModelRegistry
from service.sched_metrics import SchedulerMetrics
from service.settings import Settings

log = logging.getLogger("iwae.service")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def worker_layout(settings: Settings, device: torch.device) -> tuple[int, int | None]:
    """(engine worker threads, torch threads each). On a GPU: one worker (the device serialises anyway).
    On CPUs every core computes under load: by default one worker per core with one torch thread each
    (chunks of the same job run in parallel without OpenMP fork/joins); IWAE_ENGINE_WORKERS and
    IWAE_THREADS trade one for the other."""
    if device.type == "cuda":
        return settings.engine_workers or 1, settings.threads
    cores = usable_cores()
    if settings.engine_workers and settings.threads:
        return settings.engine_workers, settings.threads
    if settings.engine_workers:
        return settings.engine_workers, max(1, cores // settings.engine_workers)
    if settings.threads:
        return max(1, cores // settings.threads), settings.threads
    return cores, 1


# Run a tiny job on the event loop only while at most this many HTTP requests are in flight (it and, say, a
# big one): with more, tiny jobs are handed to the workers, which merge them into shared engine calls.
INLINE_MAX_IN_FLIGHT = 2


@dataclass
class InFlight:
    """How many HTTP requests are in progress (counted by `InFlightMiddleware`), for the inline decision."""

    count: int = 0

    @property
    def inline_ok(self) -> bool:
        return self.count <= INLINE_MAX_IN_FLIGHT


class InFlightMiddleware:
    def __init__(self, app: ASGIApp, counter: InFlight) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.counter.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter.count -= 1


def request_timeout(settings: Settings, timeout_ms: float | None) -> float:
    """Seconds a request may take: IWAE_TIMEOUT_S, or less if the client asked for less (`timeout_ms`)."""
    if timeout_ms is None:
        return settings.timeout_s
    return min(settings.timeout_s, timeout_ms / 1000.0)


@dataclass
class Schedulers:
    """Every model's scheduler; the app's Drainable (service/drain.py)."""

    settings: Settings
    metrics: SchedulerMetrics
    by_model: dict[str, FairScheduler] = field(default_factory=dict)
    draining: bool = False

    def start(self, registry: ModelRegistry) -> None:
        for name, loaded in registry.models.items():
            self.by_model[name] = self._make(name, loaded)
            self.by_model[name].start()

    def _make(self, name: str, loaded: LoadedModel) -> FairScheduler:
        workers, threads = worker_layout(self.settings, loaded.device)
        log.info("model %s: %d engine worker(s) with %s torch thread(s) each", name, workers, threads or "default")
        return FairScheduler(
            loaded.model,
            loaded.device,
            chunk_rows_for(loaded.model, loaded.device, self.settings.memory_bytes),
            queue_size=self.settings.queue_size,
            workers=workers,
            threads_per_worker=threads,
            observer=self.metrics.observer(name),
            name=name,
        )

    def __getitem__(self, name: str) -> FairScheduler:
        return self.by_model[name]

    def begin_drain(self) -> None:
        self.draining = True
        for s in self.by_model.values():
            s.begin_drain()

    async def drained(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        done = True
        for s in self.by_model.values():
            done &= await asyncio.to_thread(s.wait_idle, max(0.0, end - loop.time()))
        return done

    def stop(self) -> None:
        for s in self.by_model.values():
            s.stop()
