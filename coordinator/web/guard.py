"""Limits for the HTTP side, which shares the coordinator's process (its interpreter, its CPU
and its file descriptors) with the gRPC server:

* ``GuardedH11`` (the uvicorn protocol): a connection must send its request's headers within
  ``metrics.header_timeout_s`` of connecting or of its last answer (uvicorn alone waits
  forever for headers: slowloris), and past ``metrics.max_connections`` new connections are
  closed at once;
* ``Guard`` (ASGI middleware): requests per client address (429 past
  ``metrics.requests_per_s``), at most two requests computed at a time (the rest wait their
  turn: the page cannot take the interpreter from gRPC), a two-second cache of pages and JSON,
  and errors answered with a short 500 and one log line instead of a traceback;
* ``OncePer``: a log filter that lets one record of a kind through per interval and counts
  the rest (an accept loop out of descriptors logged a million lines in two minutes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from ..server.ratelimit import Buckets

logger = logging.getLogger(__name__)


class OncePer(logging.Filter):
    """One record per ``interval_s`` for each (logger, message template); the rest are
    dropped and counted, and the next record that passes says how many were."""

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._dropped: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like it in the last {self.interval_s:g}s)"
        if len(self._last) > 1000:
            self._last.clear()
        return True


def quiet_noisy_loggers(interval_s: float = 60.0) -> None:
    """Rate-limit the loggers that a client can make write without bound."""
    for name in ("asyncio", "uvicorn.error", "uvicorn.protocols", __name__):
        log = logging.getLogger(name)
        if not any(isinstance(f, OncePer) for f in log.filters):
            log.addFilter(OncePer(interval_s))


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for request headers and a connection cap."""

    class GuardedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()  # over the cap: closed before reading anything
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            before = getattr(self, "scope", None)
            super().handle_events()
            if getattr(self, "scope", None) is not before:
                self._disarm()  # a request's headers arrived

        def on_response_complete(self) -> None:
            before = getattr(self, "scope", None)
            super().on_response_complete()  # may start a pipelined request already read
            if not self.transport.is_closing() and getattr(self, "scope", None) is before:
                self._arm()  # the next request's headers, in time too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11


class Guard:
    """ASGI middleware: per-address rate, bounded concurrency, a short cache, quiet errors."""

    CACHED = ("/", "/api/")
    NOT_CACHED = ("/metrics", "/report/")

    def __init__(
        self,
        app: Any,
        requests_per_s: float,
        burst: float,
        concurrent: int = 2,
        cache_s: float = 2.0,
        cache_entries: int = 256,
        refusal_delay_s: float = 1.0,
    ) -> None:
        self.app = app
        self.refusal_delay_s = refusal_delay_s
        self.buckets = Buckets(requests_per_s, burst)
        self.concurrent = concurrent
        self._turns: asyncio.Semaphore | None = None
        self.cache_s = cache_s
        self.cache_entries = cache_entries
        self._cache: OrderedDict[bytes, tuple[float, list[dict[str, Any]]]] = OrderedDict()
        self.refused = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("unknown", 0)
        wait = self.buckets.take(str(client[0]))
        if wait > 0:
            self.refused += 1
            # answered after a delay: a client that ignores Retry-After would otherwise be
            # refused as fast as it asks (thousands a second, all on this process's CPU);
            # held connections count against max_connections, past which new ones are closed
            await asyncio.sleep(min(wait, self.refusal_delay_s))
            await _json(
                send,
                429,
                {"error": f"too many requests from {client[0]}; retry in {wait:.1f}s"},
                [(b"retry-after", str(max(1, round(wait))).encode())],
            )
            return
        path = scope.get("path", "")
        key = None
        if scope.get("method") == "GET" and not path.startswith(self.NOT_CACHED):
            key = path.encode() + b"?" + scope.get("query_string", b"")
            hit = self._cache.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.cache_s:
                for message in hit[1]:
                    await send(message)
                return
        if self._turns is None:
            self._turns = asyncio.Semaphore(self.concurrent)
        sent: list[dict[str, Any]] = []
        started = False

        async def recording_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            if key is not None:
                sent.append(message)
            await send(message)

        async with self._turns:
            try:
                await self.app(scope, receive, recording_send)
            except Exception as exc:
                logger.error(
                    "HTTP %s %s failed: %s: %s", scope.get("method"), path, type(exc).__name__, exc
                )
                if not started:
                    await _json(send, 500, {"error": "internal error (logged on the coordinator)"})
                return
        size = sum(len(m.get("body", b"")) for m in sent)
        if key is not None and sent and sent[0].get("status") == 200 and size <= 1 << 20:
            now = time.monotonic()
            for stale in [k for k, (at, _) in self._cache.items() if now - at >= self.cache_s]:
                del self._cache[stale]
            self._cache[key] = (now, sent)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)


async def _json(
    send: Any,
    status: int,
    body: dict[str, Any],
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
