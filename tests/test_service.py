"""The service in-process (httpx ASGI transport): results agree with the L_k engine, inputs in every format,
encode / sample / active units / models / health / metrics, and a model whose inputs are not 28 × 28."""

from __future__ import annotations

import io
import math
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.bounds import effective_sample_size, elbo, iwae_bound
from models.checkpoint import from_bytes
from models.engine import bound_stats, engine_log_weights, reference_log_weights
from models.noise import request_noise
from models.uncertainty import lk_stderr
from service.settings import Settings
from service.testing import InProcessService, serve_in_process, tiny_model, write_checkpoint

EVAL_CARD = {"eval": {"test": {"loglik": -91.5, "stderr": 0.01, "elbo": -95.0, "k": 5000, "active_units": [3]}}}


def binary_images(n: int, seed: int = 0, x_dim: int = 784) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, x_dim)) < 0.3).astype(np.float64)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    write_checkpoint(tmp_path / "tiny.safetensors", tiny_model(seed=0), EVAL_CARD)
    write_checkpoint(tmp_path / "tiny2l.safetensors", tiny_model(latent_dims=(4, 3), seed=1))
    write_checkpoint(tmp_path / "vec10.safetensors", tiny_model(x_dim=10, seed=2))
    return tmp_path


@pytest.fixture
async def svc(model_dir: Path) -> AsyncIterator[InProcessService]:
    async with serve_in_process(Settings(models=[model_dir], default_model="tiny", device="cpu")) as s:
        yield s


def load(model_dir: Path, name: str) -> torch.nn.Module:
    path = model_dir / f"{name}.safetensors"
    model, _, _ = from_bytes(path.read_bytes(), source=str(path))
    return model


async def test_loglik_agrees_with_engine_and_float64_reference(svc: InProcessService, model_dir: Path) -> None:
    x = binary_images(3, seed=1)
    r = await svc.client.post("/loglik", params={"k": 64, "seed": 7}, json={"images": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["k"], body["seed"], body["n_images"]) == ("tiny", 64, 7, 3)
    got = {key: np.array([row[key] for row in body["results"]]) for key in ("loglik", "stderr", "ess", "elbo")}

    model = load(model_dir, "tiny")
    noise = model.draw_noise(64, 3, generator=torch.Generator().manual_seed(7))
    xt = torch.tensor(x, dtype=torch.float32)
    ref32 = bound_stats(engine_log_weights(model, xt, noise, chunk_rows=1000))
    np.testing.assert_allclose(got["loglik"], ref32.loglik.numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(got["stderr"], ref32.stderr.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["ess"], ref32.ess.numpy(), rtol=1e-4)
    np.testing.assert_allclose(got["elbo"], ref32.elbo.numpy(), rtol=1e-6, atol=1e-4)

    # Independent float64 check: the textbook computation on the same noise.
    log_w64 = reference_log_weights(model.double(), xt.double(), [e.double() for e in noise])
    np.testing.assert_allclose(got["loglik"], iwae_bound(log_w64).numpy(), rtol=0, atol=2e-3)
    np.testing.assert_allclose(got["elbo"], elbo(log_w64).numpy(), rtol=0, atol=2e-3)
    np.testing.assert_allclose(got["ess"], effective_sample_size(log_w64).numpy(), rtol=1e-3)
    np.testing.assert_allclose(got["stderr"], lk_stderr(log_w64).numpy(), rtol=1e-3)
    bpd = np.array([row["bits_per_dim"] for row in body["results"]])
    np.testing.assert_allclose(bpd, -iwae_bound(log_w64).numpy() / (784 * math.log(2)), rtol=1e-5)


async def test_same_seed_same_answer_and_random_seed_is_returned(svc: InProcessService) -> None:
    x = {"images": binary_images(2, seed=2).tolist()}
    a = (await svc.client.post("/loglik?k=20&seed=11", json=x)).json()
    b = (await svc.client.post("/loglik?k=20&seed=11", json=x)).json()
    c = (await svc.client.post("/loglik?k=20&seed=12", json=x)).json()
    assert a["results"] == b["results"]
    assert a["results"][0]["loglik"] != c["results"][0]["loglik"]
    unseeded = (await svc.client.post("/loglik?k=20", json=x)).json()
    replay = (await svc.client.post(f"/loglik?k=20&seed={unseeded['seed']}", json=x)).json()
    assert isinstance(unseeded["seed"], int)
    assert replay["results"] == unseeded["results"]


async def test_k1_stderr_is_null_and_ess_is_one(svc: InProcessService) -> None:
    r = (await svc.client.post("/loglik?k=1&seed=0", json={"images": binary_images(1).tolist()})).json()
    assert r["results"][0]["stderr"] is None
    assert r["results"][0]["ess"] == pytest.approx(1.0)
    assert r["results"][0]["loglik"] == pytest.approx(r["results"][0]["elbo"], abs=1e-5)


async def test_input_formats_agree(svc: InProcessService) -> None:
    x = binary_images(2, seed=3)
    flat = (await svc.client.post("/loglik?k=10&seed=1", json={"images": x.tolist()})).json()
    nested = (await svc.client.post("/loglik?k=10&seed=1", json={"images": x.reshape(2, 28, 28).tolist()})).json()
    buf = io.BytesIO()
    np.save(buf, x.reshape(2, 28, 28).astype(np.uint8))
    npy = await svc.client.post(
        "/loglik?k=10&seed=1", content=buf.getvalue(), headers={"content-type": "application/x-npy"}
    )
    files = []
    for i, img in enumerate(x.reshape(2, 28, 28)):
        png = io.BytesIO()
        Image.fromarray((img * 255).astype(np.uint8), mode="L").save(png, format="PNG")
        files.append(("files", (f"d{i}.png", png.getvalue(), "image/png")))
    multipart = await svc.client.post("/loglik?k=10&seed=1", files=files)
    assert npy.status_code == 200 and multipart.status_code == 200, (npy.text, multipart.text)
    assert flat["results"] == nested["results"] == npy.json()["results"] == multipart.json()["results"]
    # Arrays np.save writes differently (big-endian, Fortran order, bool) decode to the same images.
    for arr in (x.astype(">f8"), np.asfortranarray(x), x.astype(bool)):
        buf = io.BytesIO()
        np.save(buf, arr)
        r = await svc.client.post(
            "/loglik?k=10&seed=1", content=buf.getvalue(), headers={"content-type": "application/x-npy"}
        )
        assert r.json()["results"] == flat["results"], arr.dtype


async def test_binarize_options(svc: InProcessService) -> None:
    gray = np.random.default_rng(4).random((2, 784))
    thr = (await svc.client.post("/loglik?k=10&seed=1&binarize=threshold", json={"images": gray.tolist()})).json()
    explicit = (
        await svc.client.post("/loglik?k=10&seed=1", json={"images": (gray > 0.5).astype(float).tolist()})
    ).json()
    assert thr["results"] == explicit["results"]
    assert thr["binarize"] == "threshold"
    s1 = (await svc.client.post("/loglik?k=10&seed=5&binarize=stochastic", json={"images": gray.tolist()})).json()
    s2 = (await svc.client.post("/loglik?k=10&seed=5&binarize=stochastic", json={"images": gray.tolist()})).json()
    s3 = (await svc.client.post("/loglik?k=10&seed=6&binarize=stochastic", json={"images": gray.tolist()})).json()
    assert s1["results"] == s2["results"]
    assert s1["results"] != s3["results"]
    # A stochastic binarization of an already binary image changes nothing.
    b = binary_images(1, seed=9).tolist()
    sb = (await svc.client.post("/loglik?k=10&seed=5&binarize=stochastic", json={"images": b})).json()
    nb = (await svc.client.post("/loglik?k=10&seed=5", json={"images": b})).json()
    assert sb["results"] == nb["results"]


async def test_png_resize(svc: InProcessService) -> None:
    big = np.zeros((56, 56), dtype=np.uint8)
    big[10:40, 20:30] = 255
    png = io.BytesIO()
    Image.fromarray(big, mode="L").save(png, format="PNG")
    files = [("files", ("big.png", png.getvalue(), "image/png"))]
    refused = await svc.client.post("/loglik?k=5", files=files)
    assert refused.status_code == 422 and "resize=true" in refused.json()["detail"]
    ok = await svc.client.post("/loglik?k=5&seed=0&resize=true&binarize=threshold", files=files)
    assert ok.status_code == 200, ok.text
    assert ok.json()["n_images"] == 1


async def test_encode_matches_model(svc: InProcessService, model_dir: Path) -> None:
    x = binary_images(2, seed=5)
    r = await svc.client.post("/encode?samples=3&seed=4", json={"images": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    model = load(model_dir, "tiny")
    xt = torch.tensor(x, dtype=torch.float32)
    with torch.no_grad():
        mean, log_std = model.q[0](xt)
        lat = model.sample_latents(xt, 3, noise=request_noise(model, 3, 2, 4))
    (layer,) = body["layers"]
    assert layer["layer"] == 1 and layer["dim"] == 4 and layer["exact"] is True
    np.testing.assert_allclose(layer["mean"], mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer["std"], torch.exp(log_std).numpy(), rtol=1e-6)
    # [images][samples][dim]: the same draws /loglik weighs with k=3 and seed 4.
    np.testing.assert_allclose(layer["samples"], lat.h[0].transpose(0, 1).numpy(), rtol=1e-6, atol=1e-6)
    no_samples = (await svc.client.post("/encode?seed=4", json={"images": x.tolist()})).json()
    assert no_samples["layers"][0]["samples"] is None


async def test_encode_two_layers_reports_upper_layer_moments(svc: InProcessService) -> None:
    r = await svc.client.post("/encode?model=tiny2l&samples=2&seed=1", json={"images": binary_images(2).tolist()})
    assert r.status_code == 200, r.text
    layers = r.json()["layers"]
    assert [(lay["layer"], lay["dim"], lay["exact"]) for lay in layers] == [(1, 4, True), (2, 3, False)]
    assert np.array(layers[1]["samples"]).shape == (2, 2, 3)
    assert (np.array(layers[1]["std"]) > 0).all()


async def test_sample_json_and_png(svc: InProcessService) -> None:
    a = (await svc.client.get("/sample?n=5&seed=3")).json()
    b = (await svc.client.get("/sample?n=5&seed=3")).json()
    c = (await svc.client.get("/sample?n=5&seed=4")).json()
    assert a == b
    assert a["probs"] != c["probs"]
    probs, binary = np.array(a["probs"]), np.array(a["binary"])
    assert probs.shape == binary.shape == (5, 784)
    assert ((probs > 0) & (probs < 1)).all()
    assert set(np.unique(binary)) <= {0, 1}
    assert a["image_shape"] == [28, 28]
    r = await svc.client.get("/sample?n=4&seed=3&format=png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    # A 2 × 2 grid of 28 × 28 images with 2-pixel gaps.
    assert img.size == (2 * 30 + 2, 2 * 30 + 2)
    grid = np.asarray(img, dtype=np.float64) / 255
    first = np.array(b["probs"][0]).reshape(28, 28)
    np.testing.assert_allclose(grid[2:30, 2:30], first, atol=1 / 255)


async def test_active_units_match_direct_computation(svc: InProcessService, model_dir: Path) -> None:
    x = binary_images(20, seed=6)
    r = await svc.client.post("/active-units?seed=2", json={"images": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    model = load(model_dir, "tiny")
    means = model.posterior_means(torch.tensor(x, dtype=torch.float32), samples=100)
    a_u = means[0].double().var(dim=0, unbiased=True).numpy()
    (layer,) = body["layers"]
    np.testing.assert_allclose(layer["variances"], a_u, rtol=1e-5)
    assert layer["active"] == int((a_u > 1e-2).sum()) == body["active_total"]
    assert layer["active_units"] == np.flatnonzero(a_u > 1e-2).tolist()
    assert body["threshold"] == 0.01 and body["n_images"] == 20


async def test_active_units_two_layers_is_seeded(svc: InProcessService) -> None:
    x = {"images": binary_images(10, seed=7).tolist()}
    a = (await svc.client.post("/active-units?model=tiny2l&seed=3&samples=20", json=x)).json()
    b = (await svc.client.post("/active-units?model=tiny2l&seed=3&samples=20", json=x)).json()
    assert a == b
    assert [lay["dim"] for lay in a["layers"]] == [4, 3]
    assert a["active_total"] == sum(lay["active"] for lay in a["layers"])


async def test_models_and_card_passthrough(svc: InProcessService) -> None:
    listing = (await svc.client.get("/models")).json()
    assert listing["default"] == "tiny"
    assert [m["name"] for m in listing["models"]] == ["tiny", "tiny2l", "vec10"]
    one = (await svc.client.get("/models/tiny")).json()
    assert one["card"]["eval"] == EVAL_CARD["eval"]
    assert one["default"] is True and one["device"] == "cpu"
    assert one["n_parameters"] == tiny_model().n_parameters()
    assert one["config"] == {"x_dim": 784, "latent_dims": [4], "hidden_dims": [[16]]}
    assert one["image_shape"] == [28, 28]
    assert (await svc.client.get("/models/vec10")).json()["image_shape"] is None


async def test_health_ready_and_metrics(svc: InProcessService) -> None:
    assert (await svc.client.get("/healthz")).json() == {"status": "ok"}
    ready = await svc.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["tiny", "tiny2l", "vec10"]
    before = svc.metric("iwae_rows_computed_total", {"model": "tiny"})
    await svc.client.post("/loglik?k=30&seed=0", json={"images": binary_images(3).tolist()})
    await svc.client.post("/loglik?k=0", json={"images": binary_images(1).tolist()})
    text = (await svc.client.get("/metrics")).text
    assert 'iwae_requests_total{method="POST",route="/loglik",status="200"} 1.0' in text
    assert 'iwae_requests_total{method="POST",route="/loglik",status="422"} 1.0' in text
    assert "iwae_request_duration_seconds_bucket" in text
    assert "iwae_job_queue_wait_seconds_count" in text and "iwae_engine_call_seconds_bucket" in text
    assert 'iwae_queued_cost{model="tiny"} 0.0' in text
    assert 'iwae_rejections_total{reason="queue_full"} 0.0' in text
    assert svc.metric("iwae_rows_computed_total", {"model": "tiny"}) == before + 3 * 30
    assert svc.metric("iwae_ready") == 1.0


async def test_openapi_documents_every_parameter_and_error(svc: InProcessService) -> None:
    spec = (await svc.client.get("/openapi.json")).json()
    for path in ("/loglik", "/encode", "/active-units"):
        op = spec["paths"][path]["post"]
        assert {"400", "404", "413", "415", "422", "503", "504"} <= set(op["responses"])
        assert all(p.get("description") for p in op["parameters"]), path
        assert set(op["requestBody"]["content"]) == {"application/json", "multipart/form-data", "application/x-npy"}
    loglik_params = {p["name"] for p in spec["paths"]["/loglik"]["post"]["parameters"]}
    assert loglik_params == {"k", "model", "seed", "binarize", "resize", "timeout_ms", "target_stderr"}
    sample = spec["paths"]["/sample"]["get"]
    assert all(p.get("description") for p in sample["parameters"])
    assert (await svc.client.get("/docs")).status_code == 200


async def test_non_image_model_takes_flat_vectors(svc: InProcessService, model_dir: Path) -> None:
    x = binary_images(3, seed=8, x_dim=10)
    js = await svc.client.post("/loglik?model=vec10&k=16&seed=2", json={"images": x.tolist()})
    buf = io.BytesIO()
    np.save(buf, x)
    npy = await svc.client.post(
        "/loglik?model=vec10&k=16&seed=2", content=buf.getvalue(), headers={"content-type": "application/x-npy"}
    )
    assert js.status_code == 200 and npy.status_code == 200
    assert js.json()["results"] == npy.json()["results"]
    model = load(model_dir, "vec10")
    noise = model.draw_noise(16, 3, generator=torch.Generator().manual_seed(2))
    ref = bound_stats(engine_log_weights(model, torch.tensor(x, dtype=torch.float32), noise))
    np.testing.assert_allclose([r["loglik"] for r in js.json()["results"]], ref.loglik.numpy(), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(
        [r["bits_per_dim"] for r in js.json()["results"]], -ref.loglik.numpy() / (10 * math.log(2)), rtol=1e-5
    )
    wrong = await svc.client.post("/loglik?model=vec10", json={"images": binary_images(1).tolist()})
    assert wrong.status_code == 422 and "flat list of 10 values" in wrong.json()["detail"]
    png = await svc.client.get("/sample?model=vec10&format=png")
    assert png.status_code == 422 and "format=json" in png.json()["detail"]
    sample = (await svc.client.get("/sample?model=vec10&n=2&seed=0")).json()
    assert sample["image_shape"] is None and np.array(sample["probs"]).shape == (2, 10)
