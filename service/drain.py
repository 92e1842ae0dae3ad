"""Graceful drain: on SIGTERM or SIGINT, finish the work in hand, refuse new work, then exit 0.

uvicorn's own handler stops accepting connections at once and, once it has shut down, re-raises the
signal (so the process dies of SIGTERM, status 143). `DrainingServer` replaces that handler: the first
signal starts a drain instead. Every registered `Drainable` (the app's state, one per app in the process)
flips to draining at once (/readyz answers 503, new jobs get 503 with Retry-After) while the port stays
open, so clients get an answer rather than a reset. When the queued and running jobs are done, or
`IWAE_DRAIN_S` has passed, the server shuts down normally (in-flight responses are sent, lifespan shutdown
fails whatever is left) and `serve` returns, exit status 0. A second SIGINT forces an immediate exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from types import FrameType
from typing import Any, Protocol

import uvicorn
from uvicorn.supervisors import multiprocess

log = logging.getLogger("iwae.service")

# Time left for uvicorn's own shutdown (sending the last responses) when the jobs are done.
SHUTDOWN_MARGIN_S = 5.0
# After the work is done, go on answering 503 this long before closing the port: a client whose job just
# finished and that sends its next request at once gets a 503 with Retry-After, not a refused connection.
LINGER_S = 1.0


class Drainable(Protocol):
    def begin_drain(self) -> None:
        """Refuse new work from now on (and say so on /readyz)."""

    async def drained(self, timeout: float) -> bool:
        """Wait until queued and running work is done (True) or ``timeout`` s passed (False)."""


_registered: list[Drainable] = []
_lock = threading.Lock()


def register(target: Drainable) -> None:
    """Called by an app at startup: its work is drained on SIGTERM/SIGINT."""
    with _lock:
        _registered.append(target)


def unregister(target: Drainable) -> None:
    with _lock:
        if target in _registered:
            _registered.remove(target)


def registered() -> list[Drainable]:
    with _lock:
        return list(_registered)


async def drain_all(grace_s: float) -> bool:
    """Start draining every registered target, then wait up to ``grace_s`` s for them; True if all finished."""
    targets = registered()
    for t in targets:
        t.begin_drain()
    end = time.monotonic() + grace_s
    done = True
    for t in targets:
        done &= await t.drained(max(0.0, end - time.monotonic()))
    return done


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT drain the app first (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain_s: float) -> None:
        super().__init__(config)
        self.drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._draining = False

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the exit status
        # would be the signal's rather than 0.
        if self._loop is None:  # not serving yet: nothing to drain
            self.should_exit = True
            return
        if self._draining:
            if sig == signal.SIGINT:  # a second Ctrl-C: stop now
                self.should_exit = self.force_exit = True
            return
        self._draining = True
        log.info("%s received: draining (up to %g s), then exiting", signal.Signals(sig).name, self.drain_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        start = time.monotonic()
        try:
            finished = await drain_all(self.drain_s)
        except Exception:  # a failing drain must still end in a shutdown
            log.exception("drain failed")
            finished = False
        if finished:
            log.info("drained in %.1f s", time.monotonic() - start)
            await asyncio.sleep(max(0.0, min(LINGER_S, self.drain_s - (time.monotonic() - start))))
        else:
            log.warning("drain grace of %g s is over: remaining jobs are cancelled", self.drain_s)
        left = self.drain_s - (time.monotonic() - start)
        self.config.timeout_graceful_shutdown = max(1.0, min(SHUTDOWN_MARGIN_S, left))
        self.should_exit = True


class DrainingProcess(multiprocess.Process):
    """A uvicorn worker process whose server drains (for `IWAE_WORKERS` > 1; it reads IWAE_DRAIN_S)."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            from service.settings import Settings

            self._server = DrainingServer(self.config, Settings().drain_s)
        return self._server


def serve(
    app: Any, host: str, port: int, log_level: str, drain_s: float, workers: int = 1, access_log: bool = True
) -> None:
    """Run uvicorn with draining servers. ``workers`` > 1 needs ``app`` as a factory import string; the
    supervisor passes SIGTERM on to every worker, which drains and exits 0, and then exits itself."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=access_log, workers=workers, factory=workers > 1
    )
    if workers > 1:
        multiprocess.Process = DrainingProcess  # type: ignore[misc]  # the supervisor makes its workers by this name
        multiprocess.Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server = DrainingServer(config, drain_s)
    server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn's "startup failed" status
