"""Optional API keys: `Authorization: Bearer <key>` on every endpoint but the probes.

With `IWAE_API_KEYS` set (comma-separated keys, or the path of a file with one key per line), a request
without a valid key gets 401 with `WWW-Authenticate: Bearer` and the usual JSON error, before anything
reads its body: the check is an ASGI middleware that answers without calling `receive`. Keys are compared
in constant time (every key, every time) and never logged: logs and metrics only ever see how many there are.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import UnauthorizedError

log = logging.getLogger("iwae.service")

# The probes stay open: orchestrators call them without credentials.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
METRICS_PATH = "/metrics"


class ApiKeyError(ValueError):
    """IWAE_API_KEYS names an unreadable file or holds no usable key."""


def load_api_keys(spec: str | None) -> tuple[bytes, ...]:
    """The keys from an IWAE_API_KEYS value: a path to a file of keys (one per line, `#` comments), or
    comma-separated keys. Empty or unset: no keys (authentication off)."""
    if spec is None or not spec.strip():
        return ()
    text = spec.strip()
    path = Path(text).expanduser()
    looks_like_path = "," not in text and ("/" in text or text.startswith(".") or path.suffix != "")
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ApiKeyError(f"cannot read the API key file {path}: {type(e).__name__}") from None
        keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        source = f"file {path}"
    elif looks_like_path:
        raise ApiKeyError(f"IWAE_API_KEYS looks like a path but {path} is not a readable file")
    else:
        keys = [k.strip() for k in text.split(",") if k.strip()]
        source = "the setting"
    bad = [i for i, k in enumerate(keys) if any(c.isspace() for c in k) or not k.isprintable()]
    if bad:
        raise ApiKeyError(f"API key number {bad[0] + 1} from {source} contains whitespace or control characters")
    if not keys:
        raise ApiKeyError(f"no API keys in {source}")
    return tuple(k.encode() for k in keys)


def key_matches(given: bytes, keys: Iterable[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``, in time independent of where (or whether) it matches."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's `Authorization: Bearer <token>` header (None if absent or another scheme)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, n_keys: int) -> bool:
    """Log a warning when serving beyond this machine without keys; True if it warned."""
    if n_keys or is_loopback(host):
        return False
    log.warning(
        "serving on %s without API keys: anyone who can reach the port can use the service "
        "(set IWAE_API_KEYS, or bind 127.0.0.1 behind a proxy that authenticates)",
        host,
    )
    return True


class ApiKeyMiddleware:
    """401 for HTTP requests without a valid key, except the probes (and /metrics when ``metrics_public``)."""

    def __init__(
        self,
        app: ASGIApp,
        keys: tuple[bytes, ...],
        metrics_public: bool = False,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = OPEN_PATHS | ({METRICS_PATH} if metrics_public else set())
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and key_matches(token, self.keys):
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject()
        await self._refuse(send, token is not None)

    @staticmethod
    async def _refuse(send: Send, had_token: bool) -> None:
        detail = "invalid API key" if had_token else "missing API key: send the header 'Authorization: Bearer <key>'"
        body = json.dumps({"error": UnauthorizedError.default_code.value, "detail": detail}).encode()
        challenge = b'Bearer error="invalid_token"' if had_token else b"Bearer"
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", challenge),
            # The body was never read: close the connection rather than drain it.
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": UnauthorizedError.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
