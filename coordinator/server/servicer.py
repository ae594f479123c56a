"""The gRPC servicer: a thin adapter that decodes requests, calls ``CoordinatorService``, and
answers every domain error through one table (``ERROR_TABLE`` and ``answer``), for unary and
streaming calls alike."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

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

from .service import CoordinatorService

logger = logging.getLogger(__name__)

RECEIPT_TRAILER = "crowdsft-receipt-bin"
RETRY_AFTER_TRAILER = "crowdsft-retry-after-ms"
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
    FutureTimeout: Code.UNAVAILABLE,  # the store did not commit in time
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
        return tuple(out)


def answer(exc: BaseException) -> Answer:
    """The answer to a failed call, by ``ERROR_TABLE``."""
    code = next((ERROR_TABLE[c] for c in type(exc).__mro__ if c in ERROR_TABLE), None)
    if isinstance(exc, ProtocolError) and type(exc) not in ERROR_TABLE:
        code = getattr(Code, exc.status_name, code)
    if code is None:
        logger.error("internal error", exc_info=exc)
        return Answer(Code.INTERNAL, INTERNAL_MESSAGE)
    if isinstance(exc, FutureTimeout):
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


T = TypeVar("T")


def unary(method: Callable[..., T]) -> Callable[..., T]:
    """A unary RPC whose domain errors are answered through ``answer``."""

    @functools.wraps(method)
    def call(self: CoordinatorServicer, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return method(self, request, context)
        except Exception as exc:
            a = answer(exc)
            if a.trailers():
                context.set_trailing_metadata(a.trailers())
            context.abort(a.code, a.message)
            raise  # unreachable: abort raises

    return call


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, service: CoordinatorService) -> None:
        self.service = service
        self.stopping = threading.Event()  # set on shutdown: ends the watch streams

    @unary
    def GetCoordinatorInfo(self, request, context):
        return self.service.info()

    @unary
    def RegisterNode(self, request, context):
        return self.service.register(request)

    @unary
    def GetNodeStatus(self, request, context):
        return self.service.node_status(request)

    @unary
    def GetInclusionProofs(self, request, context):
        return self.service.inclusion_proofs(list(request.contribution_ids))

    @unary
    def SubmitContribution(self, request, context):
        receipt = self.service.submit(request, timeout=WRITE_TIMEOUT_S)
        return coordinator_pb2.SubmitContributionResponse(receipt=receipt)

    def WatchRounds(self, request, context):
        cursor = {"planned": request.after_round_id, "finished": request.after_round_id}
        while context.is_active() and not self.stopping.is_set():
            low = min(cursor.values())
            for event in self.service.round_events(low):
                if event.round_id > cursor[event.kind]:
                    cursor[event.kind] = event.round_id
                    yield event
            self.stopping.wait(WATCH_POLL_S)

    def GetLedger(self, request, context):
        after = request.after_round_id
        while True:
            try:
                entries = self.service.ledger(after)
            except Exception as exc:
                a = answer(exc)
                context.abort(a.code, a.message)
            if not entries:
                return
            for e in entries:
                yield coordinator_pb2.LedgerEntry(
                    round_id=e.round_id, record=e.record, signature=e.signature
                )
            after = entries[-1].round_id

    def SubmitContributions(
        self, request_iterator: Iterator[envelope_pb2.SignedEnvelope], context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.SubmitResult]:
        for index, cid, ok, value in self.service.ingest.stream(request_iterator):
            yield result(index, cid, ok, value)


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
