"""The web page and POST /reconstruct: the page's files are served (and shipped as package data), the
reconstructions match the model, and in headless Chromium a drawn digit gets the very numbers /loglik gives.

The browser test needs Debian's `chromium` and the `playwright` package (`make venv` installs both); without
them it is skipped. It writes docs/figures/web.png.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import numpy as np
import pytest
import torch

from models.checkpoint import from_bytes, to_bytes
from models.engine import bound_stats, engine_log_weights
from models.noise import request_noise
from models.percentiles import LoglikQuantiles, test_quantiles
from models.posterior import reconstruct
from service.routes.web import STATIC_DIR
from service.settings import DEFAULT_MODELS_DIR, Settings
from service.testing import InProcessService, serve_in_process, service_process, tiny_model, write_checkpoint
from training.datasets import data_dir

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "figures" / "web.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
PAGE_MODELS = ("mnist-iwae-k50-1l", "mnist-iwae-k5-1l")


def binary_images(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 784)) < 0.3).astype(np.float64)


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[InProcessService]:
    write_checkpoint(tmp_path / "tiny.safetensors", tiny_model(seed=0))
    write_checkpoint(tmp_path / "tiny2l.safetensors", tiny_model(latent_dims=(4, 3), seed=1))
    async with serve_in_process(
        Settings(models=[tmp_path], default_model="tiny", device="cpu", max_n=20)
    ) as s:  # max_n bounds /reconstruct's output
        yield s


async def test_page_and_static_files_are_served(svc: InProcessService) -> None:
    page = await svc.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    # Everything the page loads comes from this server: no CDN, no inline script.
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert url.startswith(("/", "#", "data:")), url
    assert "<script>" not in html
    for asset in ("/static/app.js", "/static/style.css"):
        r = await svc.client.get(asset)
        assert r.status_code == 200 and len(r.content) > 1000, asset
    # Every control has a label.
    for control in re.findall(r'<(?:select|input)[^>]*id="([^"]+)"', html):
        assert f'<label for="{control}">' in html, control
    assert (await svc.client.head("/")).status_code == 200
    assert (await svc.client.get("/static/nope.js")).status_code == 404
    for sneaky in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fweb.py"):
        r = await svc.client.get(sneaky)
        assert r.status_code == 404 and "def " not in r.text, sneaky
    assert svc.metric("iwae_requests_total", {"route": "/static/{path:path}", "method": "GET", "status": "200"}) == 2


def test_static_files_are_package_data() -> None:
    """A wheel and an editable install both ship service/static: pyproject's package-data covers every file."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    shipped = {p for pattern in patterns for p in (ROOT / "service").glob(pattern)}
    assert {p for p in STATIC_DIR.iterdir() if p.is_file()} <= shipped
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in shipped}


async def test_reconstruct_decodes_the_posterior(svc: InProcessService, tmp_path: Path) -> None:
    x = binary_images(2, seed=1)
    r = await svc.client.post("/reconstruct?samples=3&seed=4", json={"images": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["n_images"], body["samples"], body["seed"], body["image_shape"]) == (2, 3, 4, [28, 28])
    model, _, _ = from_bytes((tmp_path / "tiny.safetensors").read_bytes())
    xt = torch.tensor(x, dtype=torch.float32)
    with torch.no_grad():
        mean, _ = model.q[0](xt)
        want_mean = torch.sigmoid(model.p[0](mean))
        lat = model.sample_latents(xt, 3, noise=request_noise(model, 3, 2, 4))
        want_draws = torch.sigmoid(model.p[0](lat.h[0])).transpose(0, 1)
    np.testing.assert_allclose(body["mean"], want_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(body["draws"], want_draws.numpy(), rtol=1e-6, atol=1e-7)
    # The draws decode the samples /encode returns for the same seed (and /loglik weighs with k=3).
    enc = (await svc.client.post("/encode?samples=3&seed=4", json={"images": x.tolist()})).json()
    h1 = torch.tensor(enc["layers"][0]["samples"], dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(body["draws"], torch.sigmoid(model.p[0](h1)).numpy(), rtol=1e-5, atol=1e-6)
    none = (await svc.client.post("/reconstruct?seed=4", json={"images": x.tolist()})).json()
    assert none["draws"] is None and none["mean"] == body["mean"]
    two = await svc.client.post("/reconstruct?model=tiny2l&samples=2&seed=0", json={"images": x.tolist()})
    assert two.status_code == 200 and np.array(two.json()["draws"]).shape == (2, 2, 784)
    direct = reconstruct(model, xt, None)
    assert direct[1].shape == (0, 2, 784)


async def test_reconstruct_refuses_bad_requests(svc: InProcessService) -> None:
    x = {"images": binary_images(3).tolist()}
    big = await svc.client.post("/reconstruct?samples=6", json=x)  # 3 × 7 = 21 decoded images > max_n 20
    assert big.status_code == 413 and "IWAE_MAX_N" in big.json()["detail"]
    assert (await svc.client.post("/reconstruct?samples=-1", json=x)).status_code == 422
    assert (await svc.client.post("/reconstruct?k=5", json=x)).json()["error"] == "unknown_parameter"
    assert (await svc.client.post("/reconstruct?model=nope", json=x)).status_code == 404
    gray = await svc.client.post("/reconstruct", json={"images": [[0.5] * 784]})
    assert gray.status_code == 422 and gray.json()["error"] == "not_binary"


# --- the page in headless Chromium against a real server -------------------------------------------------
def _page_models(folder: Path) -> int:
    """Copies of two zoo models. The default one gets test-set quantiles at k=50 from 1000 real test digits
    when its card has none and MNIST is at hand. Returns the k the page should score with."""
    for name in PAGE_MODELS:
        shutil.copy(DEFAULT_MODELS_DIR / f"{name}.safetensors", folder / f"{name}.safetensors")
    path = folder / f"{PAGE_MODELS[0]}.safetensors"
    model, card, data_mean = from_bytes(path.read_bytes())
    if LoglikQuantiles.from_card(card) is not None:
        return 5000
    if not any((data_dir() / "mnist").glob("t10k-images*")):
        return 5000
    from training.datasets import load_dataset

    digits = torch.bernoulli(load_dataset("mnist").test[:1000], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        noise = model.draw_noise(50, 1000, generator=torch.Generator().manual_seed(0))
        ll = bound_stats(engine_log_weights(model, digits, noise)).loglik
    test = {**card.get("eval", {}).get("test", {}), "quantiles": {"probs": [i / 100 for i in range(101)]}}
    test["quantiles"]["by_k"] = {"50": test_quantiles(ll)}
    path.write_bytes(to_bytes(model, {**card, "eval": {**card.get("eval", {}), "test": test}}, data_mean))
    return 50


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium; `make venv` does it as root)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    folder = tmp_path_factory.mktemp("page-models")
    k = _page_models(folder)
    env = {
        "IWAE_MODELS": str(folder),
        "IWAE_DEVICE": "cpu",
        "IWAE_THREADS": "1",
        "IWAE_ENGINE_COMPILE": "0",
    }
    with service_process(env, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url, k


def _same(shown: str | None, value: float | None) -> bool:
    return (value is None and shown == "null") or (value is not None and shown is not None and float(shown) == value)


def test_page_scores_a_drawn_digit_like_the_api(page_server: tuple[str, int], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, k = page_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # The page forbids eval (its CSP); Playwright's polling evaluates strings, so it bypasses the CSP.
            page = browser.new_page(bypass_csp=True, viewport={"width": 1200, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready=true]")
            assert page.locator("#model option").count() == len(PAGE_MODELS)
            assert page.input_value("#model") == PAGE_MODELS[0]  # the default model
            assert page.locator("#cards article").count() == len(PAGE_MODELS)

            # A "7" with the mouse: a bar, then the diagonal.
            box = page.locator("#pad").bounding_box()
            assert box is not None

            def at(fx: float, fy: float) -> tuple[float, float]:
                return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

            page.mouse.move(*at(0.3, 0.25))
            page.mouse.down()
            page.mouse.move(*at(0.7, 0.25), steps=8)
            page.mouse.move(*at(0.45, 0.8), steps=12)
            page.mouse.up()
            # A short stroke with the keyboard: the pen starts at the centre (column 15, row 15).
            page.focus("#pad")
            page.keyboard.press("Space")
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            page.keyboard.press("Space")
            assert "column 18, row 15" in page.inner_text("#pen-position")
            drawn = page.evaluate(
                "Array.from(document.getElementById('pad').getContext('2d').getImageData(0, 0, 28, 28).data)"
                ".filter((_, i) => i % 4 === 0).map((v) => (v > 127 ? 1 : 0))"
            )
            ink = np.array(drawn).reshape(28, 28)
            assert ink[7, 8] == 1 and ink[7, 19] == 1 and ink[22, 12] == 1  # stroke ends: (0.3, 0.25) ... (0.45, 0.8)
            assert ink[14, 14:18].all()  # the keyboard stroke
            assert 40 < ink.sum() < 200

            page.fill("#k", str(k))
            page.fill("#seed", "7")
            with page.expect_request(lambda r: "/loglik" in r.url) as sent:
                page.click("#score")
            page.wait_for_selector("#recons canvas")
            request = sent.value
            query = {key: v[0] for key, v in parse_qs(urlparse(request.url).query).items()}
            image = np.array(request.post_data_json["images"][0])
            assert image.shape == (28, 28) and (image == ink).all()  # what was drawn is what was sent
            assert query == {"model": PAGE_MODELS[0], "k": str(k), "seed": "7"}

            want = httpx.post(f"{url}/loglik", params=query, json={"images": [image.tolist()]}).json()
            row = want["results"][0]
            shown = {key: page.get_attribute(f"#{key}", "data-value") for key in ("loglik", "stderr", "bpd", "ess")}
            assert _same(shown["loglik"], row["loglik"]) and _same(shown["stderr"], row["stderr"])
            assert _same(shown["bpd"], row["bits_per_dim"]) and _same(shown["ess"], row["ess"])
            assert page.inner_text("#loglik") == f"{row['loglik']:.2f}"
            assert page.inner_text("#stderr") == f"{row['stderr']:.2f}"
            assert _same(page.get_attribute("#percentile", "data-value"), row["percentile"])
            reading = page.inner_text("#reading")
            if row["percentile"] is None:
                assert "no test-set percentiles" in reading
            else:
                assert page.inner_text("#percentile").endswith(f"(k = {want['percentile_k']})")
                assert re.search(r"(Typical of MNIST|Unusual|Atypical)", reading), reading
            assert page.locator("#recons canvas").count() == 4  # the posterior mean and three draws

            # The samples grid loads; "New samples" draws others.
            loaded = (
                "(() => { const i = document.getElementById('samples'); return i.complete && i.naturalWidth > 0; })()"
            )
            page.wait_for_function(loaded)
            first = page.get_attribute("#samples", "src")
            page.click("#new-samples")
            page.wait_for_function(loaded)
            assert page.get_attribute("#samples", "src") != first
            page.click("#clear")
            assert page.evaluate(
                "Array.from(document.getElementById('pad').getContext('2d').getImageData(0, 0, 28, 28).data)"
                ".every((v, i) => i % 4 === 3 || v === 0)"
            )
            assert not errors, errors

            # Phone width: nothing overflows sideways.
            phone = browser.new_page(bypass_csp=True, viewport={"width": 390, "height": 844}, has_touch=True)
            phone.goto(url + "/")
            phone.wait_for_selector("body[data-ready=true]")
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390
            phone.screenshot(path=str(tmp_path / "web-390.png"), full_page=True)
        finally:
            browser.close()
    _screenshot(url, k)


def _screenshot(url: str, k: int) -> None:
    """docs/figures/web.png: a drawn 3 scored with the default model."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(bypass_csp=True, viewport={"width": 1100, "height": 880})
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready=true]")
            box = page.locator("#pad").bounding_box()
            assert box is not None
            strokes = [[(0.35, 0.25), (0.55, 0.2), (0.65, 0.32), (0.5, 0.47), (0.65, 0.6), (0.6, 0.75), (0.35, 0.78)]]
            for stroke in strokes:
                page.mouse.move(box["x"] + stroke[0][0] * box["width"], box["y"] + stroke[0][1] * box["height"])
                page.mouse.down()
                for fx, fy in stroke[1:]:
                    page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"], steps=6)
                page.mouse.up()
            page.fill("#k", str(k))
            page.fill("#seed", "0")
            page.click("#score")
            page.wait_for_selector("#recons canvas")
            page.wait_for_function("document.getElementById('samples').naturalWidth > 0")
            page.evaluate("window.scrollTo(0, 0)")
            FIGURE.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(FIGURE))
        finally:
            browser.close()
