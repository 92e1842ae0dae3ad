"""Prometheus metrics of the fair scheduler and of refused requests, on an app's own registry.

Queue wait and compute are separate histograms: a slow answer says which of the two it was.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.fair_queue import Observer

WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Rejection reasons (bounded label values): a refused request is counted under exactly one.
REJECTION_REASONS = ("queue_full", "timeout", "unauthorized", "too_large", "draining")


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.queue_wait = Histogram(
            "iwae_job_queue_wait_seconds",
            "Time from a job's submission to its first engine call.",
            ["model"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "iwae_engine_call_seconds",
            "Compute time per engine call (one chunk of rows, or one encode/sample/active-units job).",
            ["model"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.rows = Counter(
            "iwae_rows_computed", "Rows computed: (image, sample) pairs, or a call job's cost.", ["model"], registry=r
        )
        self.queued_cost = Gauge(
            "iwae_queued_cost", "Rows (or call costs) queued or running and not yet computed.", ["model"], registry=r
        )
        self.rejections = Counter(
            "iwae_rejections",
            "Requests refused, by reason: " + ", ".join(REJECTION_REASONS) + ".",
            ["reason"],
            registry=r,
        )
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        self.dropped = Counter(
            "iwae_jobs_dropped",
            "Jobs stopped before they were done (timeout, client_gone, cancelled).",
            ["model", "reason"],
            registry=r,
        )

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def observer(self, model: str) -> Observer:
        return _ModelObserver(self, model)


class _ModelObserver:
    def __init__(self, m: SchedulerMetrics, model: str) -> None:
        self._wait = m.queue_wait.labels(model)
        self._compute = m.compute.labels(model)
        self._rows = m.rows.labels(model)
        self._cost = m.queued_cost.labels(model)
        self._cost.set(0)
        self._m, self._model = m, model

    def queue_wait(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def compute(self, seconds: float, rows: int) -> None:
        self._compute.observe(seconds)
        self._rows.inc(rows)

    def rejected(self, reason: str) -> None:
        self._m.reject(reason)

    def dropped(self, reason: str) -> None:
        self._m.dropped.labels(self._model, reason).inc()
        if reason == "timeout":
            self._m.reject("timeout")

    def queued_cost(self, cost: int) -> None:
        self._cost.set(cost)
