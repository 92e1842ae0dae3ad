"""/loglik's error bars: `pareto_k`, `reliable`, `k_used` on every result, and `target_stderr`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import from_bytes
from models.engine import bound_stats, engine_log_weights
from models.noise import request_noise
from models.psis import pareto_k
from models.uncertainty import chunk_schedule
from service.loglik import loglik_to_target
from service.settings import Settings
from service.testing import InProcessService, serve_in_process, tiny_model, write_checkpoint


def binary_images(n: int, seed: int = 0) -> list[list[float]]:
    return (np.random.default_rng(seed).random((n, 784)) < 0.3).astype(np.float64).tolist()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    write_checkpoint(tmp_path / "tiny.safetensors", tiny_model(seed=0))
    return tmp_path


@pytest.fixture
async def svc(model_dir: Path) -> AsyncIterator[InProcessService]:
    settings = Settings(models=[model_dir], default_model="tiny", device="cpu", max_k=4000)
    async with serve_in_process(settings) as s:
        yield s


def load(model_dir: Path) -> torch.nn.Module:
    path = model_dir / "tiny.safetensors"
    return from_bytes(path.read_bytes(), source=str(path))[0]


async def test_every_result_has_the_diagnostic_and_k_used(svc: InProcessService, model_dir: Path) -> None:
    x = binary_images(3, seed=1)
    r = await svc.client.post("/loglik", params={"k": 500, "seed": 3}, json={"images": x})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["target_stderr"] is None
    model = load(model_dir)
    log_w = engine_log_weights(model, torch.tensor(x, dtype=torch.float32), request_noise(model, 500, 3, 3))
    want = bound_stats(log_w)
    for row, k_hat, ok, se in zip(body["results"], want.pareto_k, want.reliable, want.stderr, strict=True):
        assert row["k_used"] == 500
        assert row["pareto_k"] == pytest.approx(float(k_hat), abs=1e-9)
        assert row["reliable"] is bool(ok) and row["reliable"] == (row["pareto_k"] <= 0.7)
        assert row["stderr"] == pytest.approx(float(se), rel=1e-9)
    # Too few samples to fit a tail: k̂ is null and the verdict is "unreliable", never a 500.
    r = await svc.client.post("/loglik", params={"k": 10, "seed": 3}, json={"images": x})
    assert r.status_code == 200, r.text
    assert all(row["pareto_k"] is None and row["reliable"] is False for row in r.json()["results"])


async def test_target_is_met_or_k_is_at_the_cap(svc: InProcessService, model_dir: Path) -> None:
    x = binary_images(4, seed=2)
    cap, target = 3000, 0.2
    params = {"k": cap, "seed": 11, "target_stderr": target}
    r = await svc.client.post("/loglik", params=params, json={"images": x})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == cap and body["target_stderr"] == target
    totals = set(np.cumsum(chunk_schedule(cap)).tolist())
    for row in body["results"]:
        assert row["k_used"] in totals
        assert row["stderr"] <= target or row["k_used"] == cap, row
    assert any(row["k_used"] < cap for row in body["results"])  # the target saved samples
    # Same seed, same answer; and it is exactly the documented computation.
    again = await svc.client.post("/loglik", params=params, json={"images": x})
    assert again.json() == body
    model = load(model_dir)
    want = loglik_to_target(model, torch.device("cpu"), torch.tensor(x, dtype=torch.float32), cap, 11, target, 2048)
    np.testing.assert_allclose([row["loglik"] for row in body["results"]], want.loglik, rtol=0, atol=1e-9)
    assert [row["k_used"] for row in body["results"]] == want.k_used.tolist()
    # A target any estimate meets stops after the second chunk (the first meets it, the second confirms);
    # k below the first chunk is one chunk of k.
    easy = await svc.client.post("/loglik", params={**params, "target_stderr": 1e3}, json={"images": x})
    assert [row["k_used"] for row in easy.json()["results"]] == [200] * 4
    small = await svc.client.post("/loglik", params={**params, "k": 40}, json={"images": x})
    assert [row["k_used"] for row in small.json()["results"]] == [40] * 4


async def test_repeated_seeds_scatter_by_about_the_reported_stderr(svc: InProcessService) -> None:
    x = binary_images(1, seed=2)
    target, cap, estimates, reported, k_used = 0.15, 4000, [], [], []
    for seed in range(30):
        params = {"k": cap, "seed": seed, "target_stderr": target}
        row = (await svc.client.post("/loglik", params=params, json={"images": x})).json()["results"][0]
        assert row["stderr"] <= target or row["k_used"] == cap
        estimates.append(row["loglik"])
        reported.append(row["stderr"])
        k_used.append(row["k_used"])
    assert len(set(k_used)) >= 3  # the runs stopped at different k, yet scatter as reported
    ratio = float(np.std(estimates, ddof=1) / np.median(reported))
    assert 0.67 <= ratio <= 1.5, (ratio, estimates, reported)


@pytest.mark.parametrize("value", ["0", "-0.1", "abc", "nan", "inf", ""])
async def test_bad_targets_are_422(svc: InProcessService, value: str) -> None:
    r = await svc.client.post("/loglik", params={"k": 100, "target_stderr": value}, json={"images": binary_images(1)})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_parameter" and "target_stderr" in body["detail"]


def test_pareto_k_of_identical_weights_is_not_a_crash() -> None:
    assert bool(torch.isinf(pareto_k(torch.zeros(200, 1))).all())
