"""Test-set percentiles of L_k: the quantile math, the card format, /loglik's `percentile`, and on real MNIST
test digits (skipped without the data) that typical digits sit in the middle and noise far below."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from models import percentiles
from models.checkpoint import from_bytes, to_bytes
from models.engine import bound_stats, engine_log_weights
from models.percentiles import STANDARD_PROBS, LoglikQuantiles
from service.client import AsyncIWAEClient
from service.settings import DEFAULT_MODELS_DIR, Settings
from service.testing import serve_in_process, tiny_model, write_checkpoint
from training.datasets import data_dir

ZOO_MODEL = DEFAULT_MODELS_DIR / "mnist-iwae-k50-1l.safetensors"
HAVE_MNIST = any((data_dir() / "mnist").glob("t10k-images*"))


def card_with(by_k: dict[str, list[float]], probs: list[float] | None = None) -> dict:
    return {"eval": {"test": {"quantiles": {"probs": list(probs or STANDARD_PROBS), "by_k": by_k}}}}


def test_test_quantiles_match_numpy_in_float64() -> None:
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20 - 90
    q = percentiles.test_quantiles(x.float(), STANDARD_PROBS)
    assert len(q) == 101 and q == sorted(q)
    np.testing.assert_allclose(q, np.quantile(x.float().double().numpy(), STANDARD_PROBS), rtol=0, atol=1e-12)
    assert q[0] == pytest.approx(float(x.float().min())) and q[-1] == pytest.approx(float(x.float().max()))
    with pytest.raises(ValueError, match="finite"):
        percentiles.test_quantiles(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="increasing"):
        percentiles.test_quantiles(x, [0.5, 0.2])


def test_percentile_interpolates_between_quantiles() -> None:
    # Test L_k uniform on [-200, -100]: its quantiles are a line, and so is the percentile.
    q = LoglikQuantiles.from_card(card_with({"50": [-200 + 100 * p for p in STANDARD_PROBS]}))
    assert q is not None
    values = np.array([-250.0, -200.0, -175.0, -150.5, -100.0, -20.0])
    pct, used = q.percentile(values, 50)
    assert used == 50
    np.testing.assert_allclose(pct, [0.0, 0.0, 25.0, 49.5, 100.0, 100.0], atol=1e-9)
    # Monotone in the value.
    grid = np.linspace(-260, -40, 500)
    assert (np.diff(q.percentile(grid, 50)[0]) >= 0).all()


def test_percentile_with_tied_quantiles_stays_monotone() -> None:
    row = [-120.0] * 30 + [-120.0 + i for i in range(1, 72)]
    q = LoglikQuantiles.from_card(card_with({"5000": row}))
    assert q is not None
    pct, _ = q.percentile(np.array([-121.0, -120.0, -119.5, -49.0]), 5000)
    assert pct[0] == 0.0 and 0.0 < pct[1] < pct[2] < 100.0 and pct[3] == 100.0


def test_percentile_table_is_computed_once_per_k_and_answers_as_before() -> None:
    row = [-120.0] * 30 + [-120.0 + i for i in range(1, 72)]
    q = LoglikQuantiles.from_card(card_with({"5000": row, "50": [-200 + 100 * p for p in STANDARD_PROBS]}))
    assert q is not None
    values = np.linspace(-260, -40, 97)
    for k in (5000, 50, 5000):
        used = q.nearest_k(k)
        # The per-request computation the cached table replaced.
        xs, inverse = np.unique(q.by_k[used], return_inverse=True)
        ps = np.bincount(inverse, weights=q.probs) / np.bincount(inverse)
        want = np.clip(np.interp(values, xs, ps, left=0.0, right=1.0) * 100.0, 0.0, 100.0)
        got, got_k = q.percentile(values, k)
        assert got_k == used and np.array_equal(got, want)
    assert set(q._tables) == {50, 5000}


def test_nearest_k_on_a_log_scale() -> None:
    q = LoglikQuantiles.from_card(card_with({"50": list(range(101)), "5000": list(range(101))}))
    assert q is not None
    assert [q.nearest_k(k) for k in (1, 50, 100, 400, 500, 501, 5000, 20000)] == [
        50,
        50,
        50,
        50,
        5000,
        5000,
        5000,
        5000,
    ]


@pytest.mark.parametrize(
    ("quantiles", "message"),
    [
        ([1, 2], "must be an object"),
        ({"probs": [0.0, 1.0]}, "must be an object"),
        ({"probs": [0.5, 0.1], "by_k": {"5": [1, 2]}}, "increasing"),
        ({"probs": [0.0, 1.0], "by_k": {}}, "non-empty"),
        ({"probs": [0.0, 1.0], "by_k": {"k50": [1, 2]}}, "positive integer"),
        ({"probs": [0.0, 1.0], "by_k": {"0": [1, 2]}}, "positive integer"),
        ({"probs": [0.0, 1.0], "by_k": {"5": [1, 2, 3]}}, "2 ascending values"),
        ({"probs": [0.0, 1.0], "by_k": {"5": [2, 1]}}, "2 ascending values"),
        ({"probs": [0.0, 1.0], "by_k": {"5": [1, "x"]}}, "list of numbers"),
        ({"probs": [0.0, 1.0], "by_k": {"5": [1, float("inf")]}}, "finite"),
    ],
)
def test_malformed_card_quantiles_are_named(quantiles: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoglikQuantiles.from_card({"eval": {"test": {"quantiles": quantiles}}})


def test_no_quantiles_in_card() -> None:
    assert LoglikQuantiles.from_card({}) is None
    assert LoglikQuantiles.from_card({"eval": {"test": {"loglik": -90.0}}}) is None


async def test_loglik_reports_percentiles_against_the_nearest_k(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model(seed=0)
    x = (torch.rand(64, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float()

    def loglik(k: int, images: torch.Tensor, seed: int) -> torch.Tensor:
        noise = model.draw_noise(k, images.shape[0], generator=torch.Generator().manual_seed(seed))
        return bound_stats(engine_log_weights(model, images, noise)).loglik

    by_k = {"2": percentiles.test_quantiles(loglik(2, x, 0)), "64": percentiles.test_quantiles(loglik(64, x, 0))}
    write_checkpoint(tmp_path / "tiny.safetensors", model, card_with(by_k))
    write_checkpoint(tmp_path / "plain.safetensors", tiny_model(seed=1))
    write_checkpoint(tmp_path / "bad.safetensors", tiny_model(seed=2), card_with({"5": [3.0, 2.0]}, [0.0, 1.0]))
    caplog.set_level(logging.WARNING, logger="iwae.service")
    async with serve_in_process(Settings(models=[tmp_path], default_model="tiny", device="cpu")) as svc:
        images = x[:5].tolist()
        for k, want_k in ((40, 64), (3, 2)):
            r = await svc.client.post(f"/loglik?k={k}&seed=3", json={"images": images})
            body = r.json()
            assert r.status_code == 200 and body["percentile_k"] == want_k
            got = np.array([row["percentile"] for row in body["results"]])
            ll = np.array([row["loglik"] for row in body["results"]])
            q = LoglikQuantiles.from_card(card_with(by_k))
            assert q is not None
            np.testing.assert_allclose(got, q.percentile(ll, k)[0], rtol=0, atol=1e-9)
            assert ((got >= 0) & (got <= 100)).all() and got.std() > 0
        for name in ("plain", "bad"):
            body = (await svc.client.post(f"/loglik?k=4&model={name}", json={"images": images})).json()
            assert body["percentile_k"] is None and all(row["percentile"] is None for row in body["results"])
        # The Python client carries them too.
        async with AsyncIWAEClient("http://iwae.test", transport=svc.transport) as client:
            r = await client.loglik(x[:5].numpy(), k=40, seed=3)
            assert r.percentile_k == 64 and r.percentile is not None
            np.testing.assert_allclose(r.percentile, q.percentile(r.loglik, 40)[0], rtol=0, atol=1e-9)
            plain = await client.loglik(x[:5].numpy(), k=4, model="plain")
            assert plain.percentile is None and plain.percentile_k is None
    assert any("bad" in rec.message and "quantiles" in rec.message for rec in caplog.records)


@pytest.mark.skipif(not HAVE_MNIST, reason="real MNIST not in the data dir (set IWAE_DATA_DIR)")
async def test_real_digits_are_typical_and_noise_is_not(tmp_path: Path) -> None:
    from training.datasets import load_dataset

    model, card, data_mean = from_bytes(ZOO_MODEL.read_bytes(), source=str(ZOO_MODEL))
    test = load_dataset("mnist").test
    gen = torch.Generator().manual_seed(0)
    digits = torch.bernoulli(test[:1300], generator=gen)
    k = 50
    with torch.no_grad():
        noise = model.draw_noise(k, 1000, generator=torch.Generator().manual_seed(1))
        reference = bound_stats(engine_log_weights(model, digits[:1000], noise)).loglik
    card = {
        **card,
        "eval": {
            "test": {
                **card.get("eval", {}).get("test", {}),
                **card_with({str(k): percentiles.test_quantiles(reference)})["eval"]["test"],
            }
        },
    }
    (tmp_path / "zoo.safetensors").write_bytes(to_bytes(model, card=card, data_mean=data_mean))

    async def pct(images: torch.Tensor) -> np.ndarray:
        r = await svc.client.post(f"/loglik?k={k}&seed=5", json={"images": images.tolist()})
        assert r.status_code == 200, r.text
        assert r.json()["percentile_k"] == k
        return np.array([row["percentile"] for row in r.json()["results"]])

    async with serve_in_process(Settings(models=[tmp_path], default_model="zoo", device="cpu")) as svc:
        held_out = await pct(digits[1000:1300])  # test digits not used for the quantiles
        coin = await pct(torch.bernoulli(torch.full((20, 784), 0.5), generator=gen))
        sparse = await pct(torch.bernoulli(torch.full((20, 784), 0.1), generator=gen))
        white = await pct(torch.ones(2, 784))
        black = await pct(torch.zeros(2, 784))
    inside = ((held_out >= 5) & (held_out <= 95)).mean()
    assert inside >= 0.8, f"only {inside:.0%} of held-out test digits between the 5th and 95th percentile"
    assert 35 <= np.median(held_out) <= 65
    assert (coin < 1).all() and (sparse < 1).all() and (white < 1).all()
    # A blank (all-black) pad is *more* likely than almost every test digit: density models favour simple
    # inputs (Nalisnick et al., 2019), so an anomaly reading must look at both tails.
    assert (black > 99).all()
