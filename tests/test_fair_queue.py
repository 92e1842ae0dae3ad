"""The fair chunked scheduler (service/fair_queue.py), in-process and deterministic: ordering (not timing),
mixed-k engine calls that equal each job alone, cancellation and deadlines that stop a big job within one
chunk (rows computed), drain, queue limits, the inline path and several workers."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from models.engine import bound_stats, engine_log_weights
from models.noise import request_noise
from service import fair_jobs
from service.fair_queue import (
    INLINE_MAX_ROWS,
    INLINE_PACE_MAX_S,
    CancelledJobError,
    ClientGoneError,
    DeadlineError,
    DrainingError,
    FairJob,
    FairScheduler,
    LoglikResult,
    NullObserver,
    QueueFullError,
)
from service.testing import tiny_model

CPU = torch.device("cpu")


def images(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy((np.random.default_rng(seed).random((n, 784)) < 0.4).astype(np.float32))


class Hooked(NullObserver):
    """Runs ``on_call(calls_so_far)`` on the worker after each engine call."""

    def __init__(self) -> None:
        self.calls = 0
        self.on_call: Callable[[int], None] = lambda n: None
        self.reasons: list[str] = []

    def compute(self, seconds: float, rows: int) -> None:
        self.calls += 1
        self.on_call(self.calls)

    def rejected(self, reason: str) -> None:
        self.reasons.append(reason)

    def dropped(self, reason: str) -> None:
        self.reasons.append(reason)


def scheduler(chunk_rows: int = 64, workers: int = 1, **kw: Any) -> tuple[FairScheduler, Hooked]:
    obs = Hooked()
    sched = FairScheduler(tiny_model(latent_dims=(4, 3)), CPU, chunk_rows, workers=workers, observer=obs, **kw)
    sched.start()
    return sched, obs


def result(job: FairJob, timeout: float = 60.0) -> Any:
    return job.future.result(timeout)


def solo_result(x: torch.Tensor, k: int, seed: int) -> Any:
    """The job's answer from a scheduler of its own (nothing to merge with)."""
    sched, _ = scheduler(chunk_rows=4096)
    try:
        return result(sched.submit_loglik(x, k, seed))
    finally:
        sched.stop()


def test_small_job_finishes_while_a_big_one_is_still_running() -> None:
    sched, _ = scheduler(chunk_rows=64)
    try:
        sched.pause()
        big = sched.submit_loglik(images(4, 0), k=400, seed=1)  # 1600 rows: 25 chunks or more
        small = sched.submit_loglik(images(1, 1), k=30, seed=2)
        seen: dict[str, Any] = {}
        small.future.add_done_callback(lambda _: seen.update(big_done=big.future.done(), big_rows=big.finished))
        sched.resume()
        assert isinstance(result(small), LoglikResult)
        assert isinstance(result(big), LoglikResult)
        # The small job was done after the first call, which gave the big one only its guaranteed quarter
        # (a call that completes a job is kept short).
        assert seen == {"big_done": False, "big_rows": 64 // 4}
        assert sched.rows_computed == 1600 + 30
    finally:
        sched.stop()


def test_oldest_job_is_never_starved_by_a_stream_of_small_ones() -> None:
    sched, obs = scheduler(chunk_rows=64)
    try:
        sched.pause()
        big = sched.submit_loglik(images(2, 0), k=64, seed=1)  # 128 rows
        smalls = [sched.submit_loglik(images(1, i), k=60, seed=i) for i in range(10)]  # 60 rows each
        progress: list[int] = []
        obs.on_call = lambda n: progress.append(big.finished)
        sched.resume()
        for job in [big, *smalls]:
            result(job)
        # Every call gave the oldest job at least a quarter of the chunk until it was done.
        for before, after in zip([0, *progress], progress, strict=False):
            assert after >= min(128, before + 64 // 4)
    finally:
        sched.stop()


def test_mixed_k_jobs_share_one_engine_call_and_equal_their_solo_answers() -> None:
    jobs = [(images(2, 0), 3, 11), (images(1, 1), 17, 12), (images(3, 2), 50, 13), (images(1, 3), 1, 14)]
    sched, obs = scheduler(chunk_rows=4096)
    try:
        sched.pause()
        merged = [sched.submit_loglik(x, k, seed) for x, k, seed in jobs]
        sched.resume()
        merged_results = [result(j) for j in merged]
        assert obs.calls == 1  # all four (k = 3, 17, 50, 1) in one engine call
    finally:
        sched.stop()
    model = sched.model
    for (x, k, seed), got in zip(jobs, merged_results, strict=True):
        solo = solo_result(x, k, seed)
        for field in ("loglik", "elbo", "ess", "stderr"):
            np.testing.assert_allclose(getattr(got, field), getattr(solo, field), rtol=2e-6, err_msg=field)
        # And the engine's own answer for the same seed (the determinism contract shared with `iwae eval`).
        want = bound_stats(engine_log_weights(model, x, request_noise(model, k, x.shape[0], seed)))
        np.testing.assert_allclose(got.loglik, want.loglik.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_abandoned_big_job_stops_within_one_chunk(how: str) -> None:
    sched, obs = scheduler(chunk_rows=64)
    try:
        sched.pause()
        big = sched.submit_loglik(images(10, 0), k=500, seed=1)  # 5000 rows: 79 chunks

        def on_call(n: int) -> None:
            if n == 3:  # after the third chunk: the client leaves, or the deadline passes
                if how == "cancel":
                    sched.cancel(big, "client_gone")
                else:
                    big.deadline = time.monotonic() - 1.0

        obs.on_call = on_call
        sched.resume()
        with pytest.raises(CancelledJobError if how == "cancel" else DeadlineError):
            result(big)
        assert sched.wait_idle(10.0)
        assert sched.rows_computed == 3 * 64
        assert obs.reasons == ["client_gone" if how == "cancel" else "timeout"]
        assert sched.queued_cost == 0
    finally:
        sched.stop()


async def test_wait_times_out_and_drops_a_queued_job() -> None:
    sched, obs = scheduler()
    try:
        sched.pause()
        job = sched.submit_loglik(images(1, 0), k=10, seed=1)
        with pytest.raises(DeadlineError):
            await sched.wait(job, timeout=0.05)
        assert sched.depth == 0 and obs.reasons == ["timeout"]
        sched.resume()
        ok = sched.submit_loglik(images(1, 0), k=10, seed=1)
        assert isinstance(await sched.wait(ok, timeout=30), LoglikResult)
    finally:
        sched.stop()


def test_queue_limit_drain_and_retry_after() -> None:
    sched, obs = scheduler(queue_size=2)
    try:
        sched.pause()
        a = sched.submit_loglik(images(1, 0), k=10, seed=1)
        b = sched.submit_call(lambda: "called", cost=5)
        with pytest.raises(QueueFullError):
            sched.submit_loglik(images(1, 0), k=10, seed=1)
        assert sched.queued_cost == 15
        assert 1 <= sched.retry_after() <= 60
        sched.begin_drain()
        with pytest.raises(DrainingError):
            sched.submit_call(lambda: None)
        assert not sched.wait_idle(0.05)  # paused: the queued work is not done
        sched.resume()
        assert sched.wait_idle(30.0)
        assert isinstance(result(a), LoglikResult) and result(b) == "called"
        assert obs.reasons == ["queue_full", "draining"]
    finally:
        sched.stop()


def test_retry_after_grows_with_queued_cost_and_is_bounded() -> None:
    sched, _ = scheduler()
    try:
        sched.pause()
        sched.submit_call(lambda: None, cost=1)
        small = sched.retry_after()
        sched.submit_call(lambda: None, cost=10**12)
        assert small == 1 and sched.retry_after() == 60
    finally:
        sched.stop()


def test_tiny_job_runs_inline_when_idle_and_queues_otherwise() -> None:
    sched, _ = scheduler()
    try:
        job = sched.submit_loglik(images(1, 0), k=50, seed=3)
        assert job.future.done()  # computed on this thread, before submit returned
        sched.pause()
        queued = sched.submit_loglik(images(1, 0), k=50, seed=3)
        assert not queued.future.done()
        sched.resume()
        np.testing.assert_array_equal(result(queued).loglik, result(job).loglik)
    finally:
        sched.stop()


def test_tiny_job_runs_inline_while_a_big_one_computes_unless_small_ones_wait() -> None:
    sched, obs = scheduler(chunk_rows=64)
    seen: dict[str, Any] = {}

    def on_call(n: int) -> None:
        if n == 2:  # a worker thread, between the big job's chunks
            tiny = sched.submit_loglik(images(1, 5), k=20, seed=5)
            seen.update(tiny_done=tiny.future.done(), big_done=big.future.done())
            sched.pause()
            waiting = sched.submit_loglik(images(1, 6), k=20, seed=6)  # queued: a small job now waits
            sched.resume()  # (the only worker is this thread: nothing takes it before the next line)
            another = sched.submit_loglik(images(1, 7), k=20, seed=7)
            seen.update(another_done=another.future.done(), waiting=waiting)

    obs.on_call = on_call
    try:
        big = sched.submit_loglik(images(4, 0), k=400, seed=1)
        result(big)
        assert seen["tiny_done"] and not seen["big_done"]  # computed at once, not behind the big chunks
        assert not seen["another_done"]  # it joins the waiting small job in an engine call instead
        assert isinstance(result(seen["waiting"]), LoglikResult)
        assert isinstance(sched.submit_call(lambda: 1, cost=5, inline_ok=False).future.result(30), int)
    finally:
        sched.stop()


def test_call_job_failure_reaches_its_caller_and_the_worker_survives() -> None:
    sched, _ = scheduler()
    try:

        def boom() -> None:
            raise ValueError("bad input")

        with pytest.raises(ValueError, match="bad input"):
            result(sched.submit_call(boom))
        assert result(sched.submit_call(lambda: 7)) == 7
    finally:
        sched.stop()


def test_two_workers_split_one_big_job_and_agree_with_one() -> None:
    x = images(5, 4)
    answers = []
    for workers in (1, 2):
        sched, _ = scheduler(chunk_rows=128, workers=workers, threads_per_worker=1)
        try:
            answers.append(result(sched.submit_loglik(x, k=400, seed=9)))
        finally:
            sched.stop()
        assert sched.rows_computed == 5 * 400
    np.testing.assert_allclose(answers[0].loglik, answers[1].loglik, rtol=2e-6)
    assert math.isfinite(float(answers[1].stderr[0]))


def test_stop_fails_live_jobs() -> None:
    sched, _ = scheduler()
    sched.pause()
    job = sched.submit_loglik(images(1, 0), k=10, seed=1)
    sched.stop()
    with pytest.raises(DrainingError):
        result(job)


async def test_wait_on_event_loop_for_worker_result() -> None:
    sched, _ = scheduler(chunk_rows=64)
    try:
        job = sched.submit_loglik(images(3, 0), k=300, seed=1)
        got = await asyncio.wait_for(sched.wait(job, timeout=60), 60)
        assert got.loglik.shape == (3,)
    finally:
        sched.stop()


async def test_client_disconnect_cancels_a_running_big_job_within_one_chunk() -> None:
    sched, obs = scheduler(chunk_rows=64)
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    try:
        big = sched.submit_loglik(images(10, 0), k=5000, seed=1)  # 50,000 rows: 782 chunks
        waiting = asyncio.create_task(sched.wait(big, timeout=60, receive=receive))
        await asyncio.sleep(0.1)  # computing, and the disconnect watcher is on (it starts after 20 ms)
        at_gone = sched.rows_computed
        gone.set()  # the client leaves
        with pytest.raises(ClientGoneError):
            await waiting
        assert await asyncio.to_thread(sched.wait_idle, 10.0)
        # At most the chunk running when the client left, and one planned before the cancel landed.
        assert at_gone > 0 and sched.rows_computed <= at_gone + 3 * 64 < big.rows
        assert "client_gone" in obs.reasons
    finally:
        sched.stop()


def test_tiny_inline_jobs_are_paced_only_while_workers_compute() -> None:
    sched, _ = scheduler()
    release = threading.Event()
    try:
        sched.submit_loglik(images(1, 0), k=50, seed=3)  # inline, the workers idle
        assert sched.inline_pace(50) == 0.0
        busy = sched.submit_call(lambda: release.wait(30), cost=10**6)
        deadline = time.monotonic() + 30
        while busy.started is None:  # the worker has taken it
            assert time.monotonic() < deadline
            time.sleep(0.001)
        tiny = sched.submit_loglik(images(1, 1), k=50, seed=4)
        assert tiny.future.done()  # still computed at once, on this thread
        pause = sched.inline_pace(50)
        assert 0.0 < pause <= INLINE_PACE_MAX_S  # but the next tiny job waits a while before it runs
        assert sched.inline_pace(INLINE_MAX_ROWS + 1) == 0.0  # other jobs go to the workers, unpaced
        release.set()
        busy.future.result(30)
        assert sched.wait_idle(30)
        assert sched.inline_pace(50) == 0.0  # the workers are idle again
    finally:
        release.set()
        sched.stop()


def test_small_jobs_take_one_worker_at_a_time_and_equal_their_solo_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small row jobs are computed by one worker at a time (a second one only contended for the GIL), merged
    into its calls, their statistics computed together; each answer is bit for bit the job's answer alone."""
    jobs = [(images(1, 20 + i), 30, 40 + i) for i in range(12)]
    stats_calls: list[int] = []

    def counted_stats(log_w: torch.Tensor) -> Any:
        stats_calls.append(int(log_w.shape[1]))
        return bound_stats(log_w)

    monkeypatch.setattr(fair_jobs, "bound_stats", counted_stats)
    sched, obs = scheduler(chunk_rows=64, workers=2)
    running, overlap = [0], [0]
    lock = threading.Lock()
    compute = sched._compute_rows

    def counted(pieces: Any) -> None:
        with lock:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
        time.sleep(0.005)
        try:
            compute(pieces)
        finally:
            with lock:
                running[0] -= 1

    sched._compute_rows = counted  # type: ignore[method-assign]
    try:
        sched.pause()
        merged = [sched.submit_loglik(x, k, seed, inline_ok=False) for x, k, seed in jobs]
        sched.resume()
        merged_results = [result(j) for j in merged]
        assert overlap[0] == 1 and obs.calls < len(jobs)
        assert sum(stats_calls) == len(jobs) and max(stats_calls) > 1  # one statistics call for several jobs
    finally:
        sched.stop()
    for (x, k, seed), got in zip(jobs, merged_results, strict=True):
        solo = solo_result(x, k, seed)
        for field in ("loglik", "stderr", "ess", "elbo", "pareto_k", "reliable"):
            assert np.array_equal(getattr(got, field), getattr(solo, field), equal_nan=field != "reliable"), field
