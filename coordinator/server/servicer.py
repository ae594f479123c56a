"""The gRPC servicer (``grpc.aio``): a thin adapter that decodes requests, runs
``CoordinatorService`` calls on a bounded thread pool, and answers every domain error through
one table (``ERROR_TABLE`` and ``answer``), for unary and streaming calls alike.

Nothing here holds a thread while it waits on a client: idle or slow callers cost a coroutine,
not a worker, so they cannot starve honest nodes or the health service. Streams are bounded:
an upload must send its first message within ``first_message_s`` and then keep sending (or
wait for its answers) within ``idle_s``, with a bounded window (``upload``); watch, ledger and
upload streams are capped per peer address and in total (``StreamSlots``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from crowdsft.config import ServerConfig
from crowdsft.errors import (
    AuthenticationError,
    DuplicateContributionError,
    DuplicateExampleError,
    InvalidPayloadError,
    NotAdmittedError,
    ProtocolError,
    RateLimitedError,
    ReplayError,
    StorageFullError,
    UnavailableError,
)
from crowdsft.v1 import coordinator_pb2, coordinator_pb2_grpc, envelope_pb2

from .ratelimit import peer_host
from .service import CoordinatorService
from .upload import upload

if TYPE_CHECKING:
    from .metrics import Metrics

logger = logging.getLogger(__name__)

RECEIPT_TRAILER = "crowdsft-receipt-bin"
RETRY_AFTER_TRAILER = "crowdsft-retry-after-ms"
# gRPC's own retry pushback (gRFC A6): clients with retry policies honour it as they are
PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
WRITE_TIMEOUT_S = 60.0
WATCH_POLL_S = 0.5
UNAVAILABLE_RETRY_MS = 1000

Code = grpc.StatusCode

# The one table from domain errors to gRPC statuses. The most specific class wins (a lookup
# along the exception's MRO); a ProtocolError subclass defined elsewhere (a plugin's) answers
# with its own ``status_name``; anything else is INTERNAL and logged.
ERROR_TABLE: dict[type[BaseException], grpc.StatusCode] = {
    ProtocolError: Code.INVALID_ARGUMENT,
    AuthenticationError: Code.UNAUTHENTICATED,
    InvalidPayloadError: Code.INVALID_ARGUMENT,
    ReplayError: Code.FAILED_PRECONDITION,
    DuplicateContributionError: Code.ALREADY_EXISTS,
    DuplicateExampleError: Code.ALREADY_EXISTS,
    RateLimitedError: Code.RESOURCE_EXHAUSTED,
    StorageFullError: Code.RESOURCE_EXHAUSTED,
    NotAdmittedError: Code.PERMISSION_DENIED,
    UnavailableError: Code.UNAVAILABLE,
    TimeoutError: Code.UNAVAILABLE,  # the store did not commit in time
}
INTERNAL_MESSAGE = "internal error; see the coordinator log"


@dataclass(frozen=True)
class Answer:
    """How a call that failed is answered: status, message, and the extras a client acts on
    (the original receipt of a duplicate; when to retry)."""

    code: grpc.StatusCode
    message: str
    receipt: envelope_pb2.SignedReceipt | None = None
    retry_after_ms: int = 0

    def trailers(self) -> tuple[tuple[str, str | bytes], ...]:
        out: list[tuple[str, str | bytes]] = []
        if self.receipt is not None:
            out.append((RECEIPT_TRAILER, self.receipt.SerializeToString()))
        if self.retry_after_ms:
            out.append((RETRY_AFTER_TRAILER, str(self.retry_after_ms)))
            out.append((PUSHBACK_TRAILER, str(self.retry_after_ms)))
        return tuple(out)


def _code(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a failure, by ``ERROR_TABLE`` (None: an internal error)."""
    code = next((ERROR_TABLE[c] for c in type(exc).__mro__ if c in ERROR_TABLE), None)
    if isinstance(exc, ProtocolError) and type(exc) not in ERROR_TABLE:
        code = getattr(Code, exc.status_name, code)
    return code


def code_name(exc: BaseException) -> str:
    """The name of the status code a failure is answered with (``INTERNAL`` where unknown)."""
    return (_code(exc) or Code.INTERNAL).name


def answer(exc: BaseException) -> Answer:
    """The answer to a failed call, by ``ERROR_TABLE``."""
    code = _code(exc)
    if code is None:
        logger.error("internal error", exc_info=exc)
        return Answer(Code.INTERNAL, INTERNAL_MESSAGE)
    if isinstance(exc, TimeoutError):
        message = "the store did not commit in time; retry"
    else:
        message = str(exc)
    receipt = exc.receipt if isinstance(exc, DuplicateContributionError) else None
    hint = getattr(exc, "retry_after_s", None)
    if hint is not None:
        retry = int(hint * 1000) + 1
    else:
        retry = UNAVAILABLE_RETRY_MS if code == Code.UNAVAILABLE else 0
    return Answer(code, message, receipt, retry)  # type: ignore[arg-type]


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    a = answer(exc)
    if a.trailers():
        context.set_trailing_metadata(a.trailers())
    await context.abort(a.code, a.message)


T = TypeVar("T")


def unary(method: Callable[..., Any]) -> Callable[..., Any]:
    """A unary RPC whose domain errors are answered through ``answer``."""

    @functools.wraps(method)
    async def call(self: CoordinatorServicer, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:
            if isinstance(exc, RateLimitedError):
                await self.tarpit.hold(context.peer())
            await _abort(context, exc)

    return call


def _drop(counts: Counter[str], key: str) -> int:
    """One fewer for ``key``, forgetting it at zero; returns what is left."""
    counts[key] -= 1
    left = counts[key]
    if not left:
        del counts[key]
    return left


class StreamSlots:
    """Concurrent streams of one kind, capped per peer address and in total."""

    def __init__(self, kind: str, total: int, per_peer: int) -> None:
        self.kind, self.total, self.per_peer = kind, total, per_peer
        self._open: Counter[str] = Counter()
        self._count = 0
        self._lock = threading.Lock()

    def acquire(self, peer: str) -> str:
        host = peer_host(peer)
        with self._lock:
            if self._count >= self.total:
                raise RateLimitedError(
                    f"the coordinator serves {self.total} {self.kind} streams at most; retry later",
                    retry_after_s=5.0,
                )
            if self._open[host] >= self.per_peer:
                raise RateLimitedError(
                    f"peer {host} has {self.per_peer} {self.kind} streams open already, the "
                    "most one address may hold; close one first",
                    retry_after_s=5.0,
                )
            self._open[host] += 1
            self._count += 1
        return host

    def release(self, host: str) -> None:
        with self._lock:
            self._count -= 1
            _drop(self._open, host)


class Tarpit:
    """Refusals for being over a rate limit are answered after ``delay_s``, holding no
    worker: a client that ignores the retry hint and sends again at once is slowed to
    ``max_streams_per_connection / delay_s`` calls a second per connection, instead of costing
    the server a refusal as fast as it can answer. At most ``per_peer`` calls of one address
    and ``total`` in all are held at once; past either, refusals are answered at once (so
    held calls cannot fill the server's call slots; a client on many connections is slowed
    only up to the per-address bound)."""

    def __init__(self, delay_s: float, per_peer: int, total: int) -> None:
        self.delay_s, self.per_peer, self.total = delay_s, per_peer, total
        self._held: Counter[str] = Counter()
        self._count = 0

    async def hold(self, peer: str) -> None:
        host = peer_host(peer)
        if not self.delay_s or self._held[host] >= self.per_peer or self._count >= self.total:
            return
        self._count += 1
        self._held[host] += 1
        try:
            # Jittered, so that a flood's held calls do not all come back at once.
            await asyncio.sleep(self.delay_s * (1 + random.random()))
        finally:
            self._count -= 1
            _drop(self._held, host)

    def __len__(self) -> int:
        return self._count


class PeerLanes:
    """Worker-pool turns, at most ``per_peer`` at a time for one peer address. A flood from
    one address then waits on its own semaphore, on the event loop, and the pool's queue holds
    a few of its jobs at most: another peer's call is served next, not after the flood."""

    def __init__(self, per_peer: int) -> None:
        self.per_peer = per_peer
        self._lanes: dict[str, asyncio.Semaphore] = {}
        self._callers: Counter[str] = Counter()  # holding or waiting for a host's lane

    @contextlib.asynccontextmanager
    async def turn(self, peer: str) -> AsyncIterator[None]:
        host = peer_host(peer)
        lane = self._lanes.get(host)
        if lane is None:
            lane = self._lanes[host] = asyncio.Semaphore(self.per_peer)
        self._callers[host] += 1
        try:
            async with lane:
                yield
        finally:
            if not _drop(self._callers, host):
                del self._lanes[host]

    def __len__(self) -> int:
        return len(self._lanes)


class RoundFeed:
    """Round events, polled from the store by one task for every watcher (a thousand
    watchers cost one query per poll, not a thousand)."""

    def __init__(self, service: CoordinatorService, run: Callable[..., Any]) -> None:
        self.service = service
        self._run = run
        self.events: list[coordinator_pb2.RoundEvent] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watchers = 0

    async def _poll(self) -> None:
        seen: list[bytes] = []
        while self._watchers:
            try:
                events = await self._run(self.service.round_events, 0)
            except Exception as exc:  # the store is closing: the watchers end with the server
                logger.debug("round feed: %s", exc)
                events = self.events
            marks = [e.SerializeToString() for e in events]
            if marks != seen:
                seen, self.events = marks, events
                self._changed.set()
                self._changed = asyncio.Event()
            await asyncio.sleep(WATCH_POLL_S)
        self._task = None

    async def watch(self, after: int, stopping: asyncio.Event) -> AsyncIterator[Any]:
        self._watchers += 1
        if self._task is None:
            self._task = asyncio.ensure_future(self._poll())
        cursor = {"planned": after, "finished": after}
        try:
            while not stopping.is_set():
                changed = self._changed
                for event in self.events:
                    if event.round_id > cursor[event.kind]:
                        cursor[event.kind] = event.round_id
                        yield event
                waiter = asyncio.ensure_future(changed.wait())
                stop = asyncio.ensure_future(stopping.wait())
                try:
                    await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stop.cancel()
        finally:
            self._watchers -= 1

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self, service: CoordinatorService, config: ServerConfig, executor: Executor
    ) -> None:
        self.service = service
        self.config = config
        self.executor = executor
        self.metrics: Metrics | None = None  # set where [metrics] listen serves them
        self.stopping = asyncio.Event()  # set on shutdown: ends the watch streams
        self.watch_slots = StreamSlots(
            "watch",
            config.max_watch_streams,
            min(config.max_streams_per_peer, config.max_watch_streams_per_peer),
        )
        self.ledger_slots = StreamSlots(
            "ledger", config.max_ledger_streams, config.max_streams_per_peer
        )
        self.upload_slots = StreamSlots(
            "upload", config.max_upload_streams, config.max_streams_per_peer
        )
        self.feed = RoundFeed(service, self._run)
        self.lanes = PeerLanes(config.worker_turns_per_peer)
        self.tarpit = Tarpit(
            config.refusal_delay_s, config.max_streams_per_peer, config.max_held_refusals
        )

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the worker pool (store reads and writes, signature checks)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(fn, *args)
        )

    async def _run_for(self, peer: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the worker pool, in the peer's lane (``PeerLanes``)."""
        async with self.lanes.turn(peer):
            return await self._run(fn, *args)

    def _admit(self, context: Any, request: Any) -> None:
        """The peer's budget (requests, bytes, bad signatures), checked here on the event
        loop before any worker, signature or store is involved."""
        self.service.ingest.peers.admit(context.peer(), request.ByteSize())

    @unary
    async def GetCoordinatorInfo(self, request, context):
        self._admit(context, request)
        return self.service.info()

    @unary
    async def RegisterNode(self, request, context):
        self._admit(context, request)
        return await self._run_for(context.peer(), self.service.register, request, context.peer())

    @unary
    async def GetNodeStatus(self, request, context):
        self._admit(context, request)
        return await self._run_for(
            context.peer(), self.service.node_status, request, context.peer()
        )

    @unary
    async def GetInclusionProofs(self, request, context):
        self._admit(context, request)
        ids = list(request.contribution_ids)
        return await self._run_for(context.peer(), self.service.inclusion_proofs, ids)

    @unary
    async def GetTreeHead(self, request, context):
        self._admit(context, request)
        return await self._run_for(context.peer(), self.service.tree_head, request.first_size)

    @unary
    async def SubmitContribution(self, request, context):
        began = time.perf_counter()
        try:
            self._admit(context, request)
            peer = context.peer()
            future = await self._run_for(peer, self.service.submit_async, request, peer)
            receipt = await asyncio.wait_for(asyncio.wrap_future(future), WRITE_TIMEOUT_S)
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.submitted(code_name(exc), time.perf_counter() - began)
            raise
        if self.metrics is not None:
            self.metrics.submitted("OK", time.perf_counter() - began)
        return coordinator_pb2.SubmitContributionResponse(receipt=receipt)

    async def _open(self, slots: StreamSlots, context: Any, request: Any = None) -> str:
        """Admit a stream (the peer's budget, then a slot of its kind), or answer why not."""
        try:
            if request is not None:
                self._admit(context, request)
            return slots.acquire(context.peer())
        except ProtocolError as exc:
            if isinstance(exc, RateLimitedError):
                await self.tarpit.hold(context.peer())
            await _abort(context, exc)
            raise  # unreachable: abort raises

    async def WatchRounds(self, request, context):
        host = await self._open(self.watch_slots, context, request)
        try:
            # the headers now, not with the first event (which may be hours away): the node
            # can tell "connected, waiting for a round" from "still connecting"
            await context.send_initial_metadata(())
            async for event in self.feed.watch(request.after_round_id, self.stopping):
                yield event
        finally:
            self.watch_slots.release(host)

    async def GetLedger(self, request, context):
        host = await self._open(self.ledger_slots, context, request)
        try:
            after = request.after_round_id
            while True:
                try:
                    entries = await self._run_for(context.peer(), self.service.ledger, after)
                except Exception as exc:
                    await _abort(context, exc)
                if not entries:
                    return
                for e in entries:
                    yield coordinator_pb2.LedgerEntry(
                        round_id=e.round_id, record=e.record, signature=e.signature
                    )
                after = entries[-1].round_id
        finally:
            self.ledger_slots.release(host)

    async def SubmitContributions(self, request_iterator, context):
        peer = context.peer()
        host = await self._open(self.upload_slots, context)  # envelopes are admitted one by one
        try:
            run = functools.partial(self._run_for, peer)
            stream = upload(context, peer, self.service, run, self.config, self.tarpit.hold)
            async for index, cid, ok, value in stream:
                if self.metrics is not None:
                    self.metrics.submitted("OK" if ok else code_name(value))
                # A client that stops reading its results would hold the stream open (the
                # write waits on flow control) however short idle_s is: bound each write.
                try:
                    await asyncio.wait_for(
                        context.write(result(index, cid, ok, value)), self.config.idle_s
                    )
                except TimeoutError:
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no result was read within {self.config.idle_s:g}s; the upload "
                        "stream was closed",
                    )
        finally:
            self.upload_slots.release(host)


def result(index: int, cid: bytes, ok: bool, value: Any) -> coordinator_pb2.SubmitResult:
    """One upload stream result: the receipt, or the failure answered as in unary calls."""
    out = coordinator_pb2.SubmitResult(index=index, contribution_id=cid)
    if ok:
        out.receipt.CopyFrom(value)
        return out
    a = answer(value)
    out.code = a.code.value[0]
    out.message = a.message
    if a.receipt is not None:
        out.receipt.CopyFrom(a.receipt)
    if a.retry_after_ms:
        out.retry_after_ms = a.retry_after_ms
    return out
