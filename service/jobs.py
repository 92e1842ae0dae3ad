"""What the scheduler runs: one request's work as a job, and the batches jobs are computed in.

Two kinds of job. A `LoglikJob` (L_k of some images with k samples and a seed) can share a batch with other
log-likelihood jobs of the same k: images and each job's own noise are concatenated and the L_k engine runs
once, so a job's result depends only on (images, k, seed), never on its batch mates. A `CallJob` runs a
function of the loaded model alone (encode, sample, active units: the functions below build them).

The scheduler (service/scheduler.py) knows jobs only through this interface: a ``cost`` (images × samples),
``open_batch()`` and the batch's ``take``/``run``, and the optional ahead-of-time ``prepare`` step.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from models.engine import bound_stats, engine_log_weights
from models.noise import request_noise, seeded_generator
from models.posterior import active_unit_variances, posterior_moments
from models.posterior import reconstruct as decode_posterior
from service import schemas
from service.registry import LoadedModel

T = TypeVar("T")
# Jobs of at least this many samples (images × k) get their noise drawn ahead by the scheduler's helper
# thread; smaller ones are drawn by the worker (microseconds: not worth a thread hand-over).
PREFETCH_MIN_COST = 4096


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Device:
    """Where jobs run: the loaded model on its device, and the L_k engine's rows per chunk there."""

    loaded: LoadedModel
    chunk_rows: int


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False, kw_only=True)
class Job(ABC, Generic[T]):
    """One request's work; created on the event loop, whose future receives the result."""

    cost: int
    future: asyncio.Future[T] = field(default_factory=_future)
    enqueued: float = field(default_factory=time.monotonic)
    state: JobState = JobState.PENDING
    watcher: asyncio.Future[None] | None = None
    # Set once the scheduler's helper thread has started `prepare` (and set again when it is done).
    preparing: threading.Event | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.future.get_loop()

    @abstractmethod
    def open_batch(self) -> Batch:
        """A batch holding this job, which compatible jobs may then join."""

    def wants_prepare(self) -> bool:
        """Whether `prepare` is worth doing ahead of the batch, on another thread."""
        return False

    def prepare(self, loaded: LoadedModel) -> None:
        """Work that can be done before the batch runs (it must not use the device)."""

    def discard_prepared(self) -> None:
        """Free what `prepare` made (the job was cancelled)."""


class Batch(ABC):
    """Jobs computed in one call on the device."""

    #: Whether other jobs may join (the scheduler then fills the batch up to its budget).
    joinable = False

    @property
    @abstractmethod
    def jobs(self) -> Sequence[Job[Any]]: ...

    @property
    def images(self) -> int:
        return 0

    def take(self, job: Job[Any]) -> bool:
        """Add ``job`` if it can share this batch."""
        return False

    @abstractmethod
    def run(self, device: Device) -> list[tuple[Job[Any], Any]]:
        """Compute the jobs still RUNNING and drop the others (cancelled meanwhile): (job, result) pairs."""


# --- log-likelihood --------------------------------------------------------------------------------------
@dataclass
class LoglikStats:
    """Per-image results of one request (float64 arrays of length n_images)."""

    loglik: np.ndarray
    stderr: np.ndarray
    ess: np.ndarray
    elbo: np.ndarray


@dataclass(eq=False, kw_only=True)
class LoglikJob(Job[LoglikStats]):
    """L_k of images x [N, D] (float32 0/1 on the CPU) with k samples each, noise drawn from ``seed``."""

    x: torch.Tensor
    k: int
    seed: int
    noise: list[torch.Tensor] | None = None  # drawn ahead by `prepare`, else by the batch

    @classmethod
    def of(cls, x: torch.Tensor, k: int, seed: int) -> LoglikJob:
        return cls(x=x, k=k, seed=seed, cost=int(x.shape[0]) * k)

    @property
    def n_images(self) -> int:
        return int(self.x.shape[0])

    def open_batch(self) -> LoglikBatch:
        return LoglikBatch([self])

    def wants_prepare(self) -> bool:
        return self.cost >= PREFETCH_MIN_COST

    def prepare(self, loaded: LoadedModel) -> None:
        self.noise = request_noise(loaded.model, self.k, self.n_images, self.seed)

    def discard_prepared(self) -> None:
        self.noise = None

    def take_noise(self, loaded: LoadedModel) -> list[torch.Tensor]:
        """This job's noise [k, N, d_l] per layer (the same whichever thread draws it); frees the job's copy."""
        if self.preparing is not None:
            self.preparing.wait()  # the helper thread is drawing it right now, or has
        noise, self.noise = self.noise, None  # the job outlives the batch (until its response is sent)
        return noise if noise is not None else request_noise(loaded.model, self.k, self.n_images, self.seed)


class LoglikBatch(Batch):
    joinable = True

    def __init__(self, jobs: list[LoglikJob]) -> None:
        self._jobs = jobs
        self.k = jobs[0].k

    @property
    def jobs(self) -> Sequence[LoglikJob]:
        return self._jobs

    @property
    def images(self) -> int:
        return sum(j.n_images for j in self._jobs)

    def take(self, job: Job[Any]) -> bool:
        if isinstance(job, LoglikJob) and job.k == self.k:
            self._jobs.append(job)
            return True
        return False

    def run(self, device: Device) -> list[tuple[Job[Any], Any]]:
        # A job cancelled after it was batched (client gone, timeout) is dropped here, before compute.
        self._jobs = [j for j in self._jobs if j.state is JobState.RUNNING]
        if not self._jobs:
            return []
        return list(zip(self._jobs, loglik_stats(device, self._jobs), strict=True))


def loglik_stats(device: Device, jobs: list[LoglikJob]) -> list[LoglikStats]:
    """One engine call over the jobs' images and noise, concatenated along the image axis; split back."""
    loaded = device.loaded
    noises = [j.take_noise(loaded) for j in jobs]
    if len(jobs) == 1:
        x, noise = jobs[0].x, noises[0]
    else:
        x = torch.cat([j.x for j in jobs], dim=0)
        noise = [torch.cat([nz[layer] for nz in noises], dim=1) for layer in range(len(noises[0]))]
    dev = loaded.device
    log_w = engine_log_weights(loaded.model, x.to(dev), [e.to(dev) for e in noise], chunk_rows=device.chunk_rows)
    stats = bound_stats(log_w)
    table = torch.stack([stats.loglik, stats.stderr, stats.ess, stats.elbo]).to("cpu", torch.float64).numpy()
    out, start = [], 0
    for job in jobs:
        part = table[:, start : start + job.n_images]
        out.append(LoglikStats(part[0].copy(), part[1].copy(), part[2].copy(), part[3].copy()))
        start += job.n_images
    return out


# --- any other work: one function of the model, run alone --------------------------------------------------
@dataclass(eq=False, kw_only=True)
class CallJob(Job[T]):
    fn: Callable[[LoadedModel], T]

    def open_batch(self) -> CallBatch[T]:
        return CallBatch(self)


class CallBatch(Batch, Generic[T]):
    def __init__(self, job: CallJob[T]) -> None:
        self.job = job

    @property
    def jobs(self) -> Sequence[CallJob[T]]:
        return [self.job]

    def run(self, device: Device) -> list[tuple[Job[Any], Any]]:
        if self.job.state is not JobState.RUNNING:
            return []
        with torch.inference_mode():
            return [(self.job, self.job.fn(device.loaded))]


def encode(x: torch.Tensor, samples: int, seed: int) -> Callable[[LoadedModel], list[schemas.LayerEncoding]]:
    """Posterior moments per layer and, if ``samples``, that many draws per image from q(h | x)."""

    def run(lm: LoadedModel) -> list[schemas.LayerEncoding]:
        xd = x.to(lm.device)
        moments = posterior_moments(lm.model, xd, generator=seeded_generator(lm.device, seed))
        draws: list[torch.Tensor] | None = None
        if samples:
            # Same noise as /loglik with k=samples and this seed: the draws are the samples it weighs.
            noise = [e.to(lm.device) for e in request_noise(lm.model, samples, int(x.shape[0]), seed)]
            draws = [h.transpose(0, 1) for h in lm.model.sample_latents(xd, samples, noise=noise).h]
        return [
            schemas.LayerEncoding(
                layer=i + 1,
                dim=int(m.mean.shape[-1]),
                exact=m.exact,
                mean=m.mean.double().cpu().tolist(),
                std=m.std.double().cpu().tolist(),
                samples=draws[i].double().cpu().tolist() if draws is not None else None,
            )
            for i, m in enumerate(moments)
        ]

    return run


def sample(n: int, seed: int) -> Callable[[LoadedModel], tuple[np.ndarray, np.ndarray]]:
    """n ancestral samples: pixel probabilities [n, D] (float64) and one binary draw from them (uint8)."""

    def run(lm: LoadedModel) -> tuple[np.ndarray, np.ndarray]:
        gen = seeded_generator(lm.device, seed)
        probs = lm.model.sample(n, generator=gen)
        binary = torch.bernoulli(probs, generator=gen)
        return probs.double().cpu().numpy(), binary.to(torch.uint8).cpu().numpy()

    return run


def active_units(x: torch.Tensor, samples: int, seed: int) -> Callable[[LoadedModel], list[torch.Tensor]]:
    """A_u per unit of each layer over the images x ([d_l] float64 on the CPU; the estimator `iwae eval` uses)."""

    def run(lm: LoadedModel) -> list[torch.Tensor]:
        gen = seeded_generator(lm.device, seed)
        return active_unit_variances(lm.model, x.to(lm.device), generator=gen, samples=samples)

    return run


def reconstruct(x: torch.Tensor, samples: int, seed: int) -> Callable[[LoadedModel], tuple[np.ndarray, np.ndarray]]:
    """The posterior decoded: p(x | h1) at the posterior mean [N, D], and at ``samples`` draws [N, samples, D]
    (the draws /loglik weighs with k=samples and this seed)."""

    def run(lm: LoadedModel) -> tuple[np.ndarray, np.ndarray]:
        n = int(x.shape[0])
        noise = [e.to(lm.device) for e in request_noise(lm.model, samples, n, seed)] if samples else None
        mean, draws = decode_posterior(lm.model, x.to(lm.device), noise)
        return mean.double().cpu().numpy(), draws.transpose(0, 1).double().cpu().numpy()

    return run
