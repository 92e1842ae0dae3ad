"""The app's running state: the loaded models, one fair scheduler each (service/traffic.py), readiness,
draining; startup (load, warm up) and shutdown."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import torch

from service import drain
from service.errors import NotReadyError
from service.fair_queue import INLINE_MAX_ROWS, FairScheduler
from service.metrics import Metrics
from service.registry import LoadedModel, ModelRegistry
from service.settings import Settings
from service.traffic import InFlight, Schedulers

log = logging.getLogger("iwae.service")


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry | None = None
    schedulers: Schedulers | None = None
    in_flight: InFlight = field(default_factory=InFlight)
    ready: bool = False
    warm_error: str | None = None
    _warm_task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        # The one place the thread count is set: every way of serving (one process or uvicorn workers) starts here.
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        if self.registry is None:
            # NoModelsError propagates: the server must not start with nothing to serve.
            self.registry = await asyncio.to_thread(ModelRegistry.load, self.settings)
        self.metrics.models_loaded.set(len(self.registry.models))
        self.schedulers = Schedulers(self.settings, self.metrics.scheduler)
        self.schedulers.start(self.registry)
        drain.register(self)
        self._warm_task = asyncio.create_task(self._warm_up())

    async def _warm_up(self) -> None:
        # One small evaluation per model: first-call costs (allocator, kernels) are paid before /readyz says yes.
        try:
            assert self.schedulers is not None and self.registry is not None
            for name, sched in self.schedulers.by_model.items():
                # On a worker thread (more rows than run inline), so that compiling the engine's kernels
                # never blocks the event loop: /healthz answers meanwhile.
                x = torch.zeros(2, self.registry.models[name].x_dim)
                job = sched.submit_loglik(x, INLINE_MAX_ROWS, 0)
                await sched.wait(job, timeout=max(self.settings.timeout_s, 120.0))
            self.ready = True
            self.metrics.ready.set(1)
            log.info("ready: %s", ", ".join(self.schedulers.by_model))
        except Exception as e:
            self.warm_error = f"{type(e).__name__}: {e}"
            log.exception("warm-up failed")

    async def shutdown(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self._warm_task is not None:
            self._warm_task.cancel()
        drain.unregister(self)
        if self.schedulers is not None:
            await asyncio.to_thread(self.schedulers.stop)

    # --- service/drain.py's Drainable ---
    @property
    def draining(self) -> bool:
        return self.schedulers is not None and self.schedulers.draining

    def begin_drain(self) -> None:
        if self.schedulers is not None:
            self.schedulers.begin_drain()

    async def drained(self, timeout: float) -> bool:
        return True if self.schedulers is None else await self.schedulers.drained(timeout)

    def models(self) -> ModelRegistry:
        if self.registry is None:
            raise NotReadyError("models are still loading", retry_after_s=1)
        return self.registry

    def loaded(self, name: str | None) -> LoadedModel:
        return self.models().get(name)

    def scheduler(self, loaded: LoadedModel) -> FairScheduler:
        assert self.schedulers is not None
        return self.schedulers[loaded.name]
