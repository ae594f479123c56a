"""The coordinator client: every call with an explicit deadline, transient failures retried
with exponential backoff and jitter."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import grpc

from crowdsft.errors import CoordinatorError
from crowdsft.node.envelope import new_nonce, now_ms, sign_envelope
from crowdsft.node.keys import Identity
from crowdsft.v1 import contribution_pb2, coordinator_pb2, coordinator_pb2_grpc, envelope_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")

RECEIPT_TRAILER = "crowdsft-receipt-bin"
RETRY_AFTER_TRAILER = "crowdsft-retry-after-ms"
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class Backoff:
    """Exponential backoff with full jitter: ``base * 2**attempt``, capped, randomised."""

    def __init__(
        self,
        base: float = 0.2,
        cap: float = 10.0,
        attempts: int = 8,
        rng: random.Random | None = None,
    ) -> None:
        self.base, self.cap, self.attempts = base, cap, attempts
        self.rng = rng or random.Random()

    def delay(self, attempt: int, floor: float = 0.0) -> float:
        return max(floor, self.rng.uniform(0, min(self.cap, self.base * 2**attempt)))


def _trailer(err: grpc.RpcError, key: str) -> bytes | str | None:
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for k, v in trailing or ():
        if k == key:
            return v
    return None


class CoordinatorClient:
    def __init__(
        self,
        address: str,
        timeout: float = 30.0,
        backoff: Backoff | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        for attempt in range(self.backoff.attempts):
            try:
                return call()
            except grpc.RpcError as err:
                code = err.code()
                if code not in TRANSIENT or attempt == self.backoff.attempts - 1:
                    raise CoordinatorError(
                        f"{what} failed: {code.name}: {err.details()}",
                        code.name,
                    ) from None
                hint = _trailer(err, RETRY_AFTER_TRAILER)
                wait = self.backoff.delay(attempt, float(hint) / 1000 if hint else 0.0)
                logger.info("%s: %s; retrying in %.2fs", what, code.name, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def info(self) -> coordinator_pb2.CoordinatorInfo:
        return self._retry(
            f"contacting the coordinator at {self.address}",
            lambda: self.stub.GetCoordinatorInfo(
                coordinator_pb2.GetCoordinatorInfoRequest(),
                timeout=self.timeout,
                wait_for_ready=False,
            ),
        )

    def register(
        self, identity: Identity, display_name: str = ""
    ) -> coordinator_pb2.RegisterNodeResponse:
        env = sign_envelope(
            identity,
            contribution_pb2.RegisterPayload(
                nonce=new_nonce(), timestamp_ms=now_ms(), display_name=display_name
            ),
        )
        return self._retry("registering", lambda: self.stub.RegisterNode(env, timeout=self.timeout))

    def status(self, identity: Identity) -> coordinator_pb2.NodeStatus:
        def call() -> coordinator_pb2.NodeStatus:
            env = sign_envelope(
                identity,
                contribution_pb2.StatusRequestPayload(nonce=new_nonce(), timestamp_ms=now_ms()),
            )
            return self.stub.GetNodeStatus(env, timeout=self.timeout)

        return self._retry("asking for the node status", call)

    def submit_one(
        self, envelope: envelope_pb2.SignedEnvelope
    ) -> tuple[envelope_pb2.SignedReceipt, bool]:
        """Submit one contribution; returns (receipt, was_duplicate). Retries transient errors;
        ALREADY_EXISTS is a success that returns the original receipt."""

        def call() -> tuple[envelope_pb2.SignedReceipt, bool]:
            try:
                return self.stub.SubmitContribution(envelope, timeout=self.timeout).receipt, False
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.ALREADY_EXISTS:
                    raw = _trailer(err, RECEIPT_TRAILER)
                    if isinstance(raw, bytes):
                        return envelope_pb2.SignedReceipt.FromString(raw), True
                raise

        return self._retry("submitting", call)

    def submit_stream(
        self, envelopes: Iterable[envelope_pb2.SignedEnvelope], timeout: float
    ) -> Iterator[coordinator_pb2.SubmitResult]:
        """One upload stream (no retries here: the caller resends what got no final answer)."""
        return self.stub.SubmitContributions(iter(envelopes), timeout=timeout)

    def watch_rounds(
        self, after_round_id: int = 0, timeout: float | None = None
    ) -> Iterator[coordinator_pb2.RoundEvent]:
        """Round events as they happen (``timeout=None``: until cancelled)."""
        return self.stub.WatchRounds(
            coordinator_pb2.WatchRoundsRequest(after_round_id=after_round_id), timeout=timeout
        )
