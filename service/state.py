"""The app's running state: the loaded models, one scheduler each, readiness; startup (load, warm up) and
shutdown."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import torch

from service.errors import NotReadyError
from service.jobs import LoglikJob
from service.metrics import Metrics
from service.registry import LoadedModel, ModelRegistry
from service.scheduler import Scheduler
from service.settings import Settings

log = logging.getLogger("iwae.service")


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry | None = None
    schedulers: dict[str, Scheduler] = field(default_factory=dict)
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
        for name, loaded in self.registry.models.items():
            scheduler = Scheduler(loaded, self.settings, self.metrics)
            scheduler.start()
            self.schedulers[name] = scheduler
        self._warm_task = asyncio.create_task(self._warm_up())

    async def _warm_up(self) -> None:
        # One small evaluation per model: first-call costs (allocator, kernels) are paid before /readyz says yes.
        try:
            for scheduler in self.schedulers.values():
                job = LoglikJob.of(torch.zeros(1, scheduler.loaded.x_dim), 2, 0)
                await scheduler.run(job, timeout=max(self.settings.timeout_s, 120.0))
            self.ready = True
            self.metrics.ready.set(1)
            log.info("ready: %s", ", ".join(self.schedulers))
        except Exception as e:
            self.warm_error = f"{type(e).__name__}: {e}"
            log.exception("warm-up failed")

    async def shutdown(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self._warm_task is not None:
            self._warm_task.cancel()
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in self.schedulers.values()))

    def models(self) -> ModelRegistry:
        if self.registry is None:
            raise NotReadyError("models are still loading", retry_after_s=1)
        return self.registry

    def loaded(self, name: str | None) -> LoadedModel:
        return self.models().get(name)

    def scheduler(self, loaded: LoadedModel) -> Scheduler:
        return self.schedulers[loaded.name]
