"""ASGI middleware of our own (the metrics middleware lives with the metrics)."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLargeError


class BodyLimitMiddleware:
    """Refuses bodies over the limit without reading them: at the first read when Content-Length says so,
    else as soon as the bytes received pass the limit (chunked uploads)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, on_reject: Callable[[], None] | None = None) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        limit, on_reject = self.limit, self.on_reject
        received = 0

        def refuse(message: str) -> BodyTooLargeError:
            if on_reject is not None:
                on_reject()
            return BodyTooLargeError(message)

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise refuse(f"request body is {declared} bytes, over the limit of {limit} bytes (IWAE_MAX_BODY_BYTES)")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise refuse(f"request body is over the limit of {limit} bytes (IWAE_MAX_BODY_BYTES)")
            return message

        await self.app(scope, limited_receive, send)
