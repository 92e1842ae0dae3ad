"""API keys (service/auth.py): parsing IWAE_API_KEYS, the middleware's 401s (body unread), open probes,
/metrics protection, and the warning for exposed servers without keys (keys never logged)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from service.auth import ApiKeyError, ApiKeyMiddleware, key_matches, load_api_keys, warn_if_exposed

KEY = "s3cret-key-123"


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    message = await receive()
    body = b"ok:" + scope["path"].encode() + b":" + message.get("body", b"")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://iwae.test")


def test_keys_from_a_list_or_a_file(tmp_path: Path) -> None:
    assert load_api_keys(None) == () and load_api_keys("  ") == ()
    assert load_api_keys(" a1 , b2,,") == (b"a1", b"b2")
    f = tmp_path / "keys.txt"
    f.write_text("# service keys\nalpha\n\n  beta  \n")
    assert load_api_keys(str(f)) == (b"alpha", b"beta")
    with pytest.raises(ApiKeyError, match="not a readable file"):
        load_api_keys(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ApiKeyError, match="no API keys"):
        load_api_keys(str(tmp_path / "empty.txt"))
    with pytest.raises(ApiKeyError, match="whitespace"):
        load_api_keys(str(_write(tmp_path / "bad.txt", "one two\n")))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_key_matches_only_exact_keys() -> None:
    keys = (b"alpha", b"beta")
    assert key_matches(b"beta", keys) and key_matches(b"alpha", keys)
    assert not key_matches(b"alph", keys) and not key_matches(b"alphaa", keys) and not key_matches(b"", keys)


async def test_requests_without_a_valid_key_get_401_and_the_body_is_never_read() -> None:
    rejected: list[int] = []
    reads: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def spy() -> Message:
            reads.append(scope["path"])
            return await receive()

        await echo_app(scope, spy, send)

    wrapped = ApiKeyMiddleware(app, (KEY.encode(), b"other"), on_reject=lambda: rejected.append(1))
    async with client(wrapped) as c:
        r = await c.post("/loglik", content=b"x" * 100_000)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer" and r.headers["connection"] == "close"
        assert r.json() == {"error": "unauthorized", "detail": r.json()["detail"]} and "Bearer" in r.json()["detail"]
        bad = await c.post("/loglik", content=b"x", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and "invalid_token" in bad.headers["www-authenticate"]
        assert (await c.get("/models", headers={"Authorization": f"Basic {KEY}"})).status_code == 401
        assert (await c.get("/metrics")).status_code == 401
        assert reads == []  # no 401 read the body
        assert len(rejected) == 4
        good = await c.post("/loglik", content=b"data", headers={"Authorization": f"Bearer {KEY}"})
        assert good.status_code == 200 and good.text == "ok:/loglik:data"
        assert (await c.get("/x", headers={"authorization": "bearer other"})).status_code == 200
        for probe in ("/healthz", "/readyz"):
            assert (await c.get(probe)).status_code == 200


async def test_metrics_can_be_public_and_no_keys_means_no_auth() -> None:
    async with client(ApiKeyMiddleware(echo_app, (KEY.encode(),), metrics_public=True)) as c:
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/models")).status_code == 401
    async with client(ApiKeyMiddleware(echo_app, ())) as c:
        assert (await c.get("/models")).status_code == 200


def test_warns_when_exposed_without_keys(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="iwae.service"):
        assert not warn_if_exposed("127.0.0.1", 0) and not warn_if_exposed("::1", 0)
        assert not warn_if_exposed("localhost", 0) and not warn_if_exposed("0.0.0.0", 2)
        assert caplog.records == []
        assert warn_if_exposed("0.0.0.0", 0)
    assert "without API keys" in caplog.text
