"""The gRPC servicer: a thin adapter that decodes, calls CoordinatorService, and maps domain
errors to gRPC statuses through one table."""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import grpc

from crowdsft.errors import DuplicateContributionError, ProtocolError, RateLimitedError
from crowdsft.node.envelope import contribution_id
from crowdsft.v1 import coordinator_pb2, coordinator_pb2_grpc, envelope_pb2

from .service import CoordinatorService
from .store import BatchOp

logger = logging.getLogger(__name__)

RECEIPT_TRAILER = "crowdsft-receipt-bin"
RETRY_AFTER_TRAILER = "crowdsft-retry-after-ms"
# Contributions of one upload stream that may wait for their commit at once.
STREAM_WINDOW = 256
WRITE_TIMEOUT_S = 60.0
WATCH_POLL_S = 0.5

STATUS: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}


def _status(exc: ProtocolError) -> grpc.StatusCode:
    return STATUS.get(exc.status_name, grpc.StatusCode.INTERNAL)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, service: CoordinatorService) -> None:
        self.service = service
        self.stopping = threading.Event()  # set on shutdown: ends the watch streams

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: BaseException):
        if isinstance(exc, ProtocolError):
            trailers: list[tuple[str, str | bytes]] = []
            if isinstance(exc, DuplicateContributionError):
                trailers.append((RECEIPT_TRAILER, exc.receipt.SerializeToString()))  # type: ignore[attr-defined]
            if isinstance(exc, RateLimitedError):
                trailers.append((RETRY_AFTER_TRAILER, str(int(exc.retry_after_s * 1000) + 1)))
            if trailers:
                context.set_trailing_metadata(tuple(trailers))
            context.abort(_status(exc), str(exc))
        if isinstance(exc, FutureTimeout):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the store did not commit in time; retry")
        logger.error("internal error", exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL, "internal error; see the coordinator log")

    def GetCoordinatorInfo(self, request, context):
        return self.service.info()

    def RegisterNode(self, request, context):
        try:
            return self.service.register(request)
        except Exception as exc:
            self._abort(context, exc)

    def GetNodeStatus(self, request, context):
        try:
            return self.service.node_status(request)
        except Exception as exc:
            self._abort(context, exc)

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
                self._abort(context, exc)
            if not entries:
                return
            for e in entries:
                yield coordinator_pb2.LedgerEntry(
                    round_id=e.round_id, record=e.record, signature=e.signature
                )
            after = entries[-1].round_id

    def GetInclusionProofs(self, request, context):
        try:
            return self.service.inclusion_proofs(list(request.contribution_ids))
        except Exception as exc:
            self._abort(context, exc)

    def SubmitContribution(self, request, context):
        try:
            receipt = self.service.submit(request, timeout=WRITE_TIMEOUT_S)
        except Exception as exc:
            self._abort(context, exc)
        return coordinator_pb2.SubmitContributionResponse(receipt=receipt)

    def SubmitContributions(
        self, request_iterator: Iterator[envelope_pb2.SignedEnvelope], context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.SubmitResult]:
        # A reader thread verifies envelopes and queues their writes while this generator sends
        # the results in order, so one stream keeps many contributions in flight and the store
        # commits them in groups. A semaphore bounds what one stream may have in flight.
        results: queue.SimpleQueue[tuple[int, bytes, bool, Any] | BaseException | None] = (
            queue.SimpleQueue()
        )
        window = threading.BoundedSemaphore(STREAM_WINDOW)
        stopped = threading.Event()

        def answer(index: int, cid: bytes, ok: bool, value: Any) -> None:
            results.put((index, cid, ok, value))

        def read() -> None:
            try:
                for index, envelope in enumerate(request_iterator):
                    while not window.acquire(timeout=1.0):
                        if stopped.is_set():
                            return
                    cid = contribution_id(envelope.payload) if envelope.payload else b""
                    self.service.submit_with(envelope, functools.partial(answer, index, cid))
                # Every queued write has answered once the writer runs this marker.
                self.service.store.submit_with(_Marker(), lambda ok, value: results.put(None))
            except BaseException as exc:  # the client went away or the stream broke
                results.put(exc)

        threading.Thread(target=read, name="upload-reader", daemon=True).start()
        try:
            while True:
                item = results.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    if context.is_active():
                        logger.info("upload stream ended with an error: %s", item)
                    return
                window.release()
                yield self._result(*item)
        finally:
            stopped.set()

    @staticmethod
    def _result(index: int, cid: bytes, ok: bool, value: Any) -> coordinator_pb2.SubmitResult:
        result = coordinator_pb2.SubmitResult(index=index, contribution_id=cid)
        if ok:
            result.receipt.CopyFrom(value)
            return result
        exc = value
        if isinstance(exc, ProtocolError):
            result.code = _status(exc).value[0]
            result.message = str(exc)
            if isinstance(exc, DuplicateContributionError):
                result.receipt.CopyFrom(exc.receipt)  # type: ignore[arg-type]
            if isinstance(exc, RateLimitedError):
                result.retry_after_ms = int(exc.retry_after_s * 1000) + 1
            if exc.status_name == "UNAVAILABLE":
                result.retry_after_ms = 1000
        else:
            logger.error("internal error on contribution %s", cid.hex(), exc_info=exc)
            result.code = grpc.StatusCode.INTERNAL.value[0]
            result.message = "internal error; see the coordinator log"
        return result


class _Marker(BatchOp):
    """Writes nothing; its callback tells an upload stream that its writes have all answered."""

    @classmethod
    def run_batch(cls, conn: Any, ops: list[Any]) -> list[Any]:
        return [None] * len(ops)
