"""One upload stream (``SubmitContributions``) on the event loop: read envelopes with
deadlines, check the peer's limits, hand each envelope to ingest on the worker pool, and
yield the results in order as the store commits them, keeping at most ``STREAM_WINDOW``
contributions and ``STREAM_BYTES`` bytes in flight."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from crowdsft.config import ServerConfig
from crowdsft.envelope import contribution_id
from crowdsft.errors import ProtocolError, RateLimitedError

from .ratelimit import peer_host
from .service import CoordinatorService

logger = logging.getLogger(__name__)

Code = grpc.StatusCode
# Contributions, and bytes of them, that one upload stream may have waiting for their commit.
STREAM_WINDOW = 256
STREAM_BYTES = 16 * 1024 * 1024


async def upload(
    context: Any,
    peer: str,
    service: CoordinatorService,
    run: Callable[..., Any],
    config: ServerConfig,
    hold: Callable[[str], Awaitable[None]] | None = None,
) -> AsyncIterator[tuple[int, bytes, bool, Any]]:
    """Read envelopes (with deadlines), hand each to ingest on the worker pool, and yield
    the results in order as the store commits them."""
    loop = asyncio.get_running_loop()
    results: asyncio.Queue[Any] = asyncio.Queue()
    budget = asyncio.Condition()
    in_flight = {"count": 0, "bytes": 0}
    ended: dict[str, Any] = {}

    def room(size: int) -> bool:
        """Whether the window and the byte budget admit one more envelope of ``size``."""
        if in_flight["count"] >= STREAM_WINDOW:
            return False
        return in_flight["bytes"] + size <= STREAM_BYTES or not in_flight["bytes"]

    def done(index: int, cid: bytes, size: int, ok: bool, value: Any) -> None:
        if not loop.is_closed():  # after shutdown nobody is listening
            loop.call_soon_threadsafe(results.put_nowait, (index, cid, size, ok, value))

    async def read() -> None:
        index = 0
        try:
            while True:
                limit = config.first_message_s if index == 0 else config.idle_s
                try:
                    envelope = await asyncio.wait_for(context.read(), limit)
                except TimeoutError:
                    which = "first message" if index == 0 else "next message"
                    ended["error"] = (
                        Code.DEADLINE_EXCEEDED,
                        f"no {which} within {limit:g}s; the upload stream was closed",
                    )
                    return
                except DecodeError:
                    ended["error"] = (
                        Code.INVALID_ARGUMENT,
                        f"message {index} is not a valid SignedEnvelope (protobuf wire format)",
                    )
                    return
                if envelope is grpc.aio.EOF:
                    return
                size = envelope.ByteSize()
                async with budget:
                    await budget.wait_for(functools.partial(room, size))
                    in_flight["count"] += 1
                    in_flight["bytes"] += size
                cid = contribution_id(envelope.payload) if envelope.payload else b""
                answered = functools.partial(done, index, cid, size)
                try:
                    service.ingest.peers.admit(peer, size)
                except ProtocolError as exc:
                    service.ingest.reject(exc, answered)
                    if hold is not None and isinstance(exc, RateLimitedError):
                        await hold(peer)  # read the next envelope later (see ``Tarpit``)
                else:
                    await run(service.submit_with, envelope, answered, peer)
                index += 1
        except Exception as exc:  # the client went away or the stream broke
            logger.info("upload stream from %s ended: %s", peer_host(peer), exc)
        finally:
            ended["sent"] = index
            loop.call_soon_threadsafe(results.put_nowait, None)

    reader = asyncio.ensure_future(read())
    answered = 0
    try:
        while True:
            item = await results.get()
            if item is None:
                if answered >= ended.get("sent", 0):
                    break
                continue  # the reader is done; its last writes are still committing
            index, cid, size, ok, value = item
            answered += 1
            async with budget:
                in_flight["count"] -= 1
                in_flight["bytes"] -= size
                budget.notify_all()
            yield index, cid, ok, value
            if "sent" in ended and answered >= ended["sent"]:
                break
    finally:
        reader.cancel()
    if "error" in ended:
        await context.abort(*ended["error"])
