"""The coordinator client: every call with an explicit deadline, transient failures retried
with exponential backoff and jitter."""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from crowdsft.envelope import new_nonce, now_ms, sign_envelope
from crowdsft.errors import ConfigError, CoordinatorError
from crowdsft.keys import Identity
from crowdsft.ledger import LedgerEntry, SignedTreeHead
from crowdsft.v1 import contribution_pb2, coordinator_pb2, coordinator_pb2_grpc, envelope_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")

RECEIPT_TRAILER = "crowdsft-receipt-bin"
RETRY_AFTER_TRAILER = "crowdsft-retry-after-ms"
PUSHBACK_TRAILER = "grpc-retry-pushback-ms"  # gRPC's standard name, sent beside ours
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

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry ``attempt`` (from 0): ``base * 2**attempt``, capped
        (the exponent bounded, so that a client retrying for good never overflows)."""
        return min(self.cap, self.base * 2 ** min(attempt, 64))

    def delay(self, attempt: int, floor: float = 0.0) -> float:
        return max(floor, self.rng.uniform(0, self.ceiling(attempt)))

    def longest(self) -> float:
        """The most that all the waits between ``attempts`` tries can add up to."""
        waits = self.attempts - 1
        growing = next((a for a in range(min(waits, 65)) if self.ceiling(a) >= self.cap), waits)
        return sum(self.ceiling(a) for a in range(growing)) + self.cap * (waits - growing)


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
        tls: TLSClient | None = None,
    ) -> None:
        """``tls``: connect over TLS, verifying the coordinator's certificate (None: plaintext,
        for loopback and trusted networks only)."""
        self.address = address
        self._coordinator_key: bytes | None = None
        self.tls = tls
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A restarted coordinator is found again within seconds (gRPC's default reconnect
            # backoff grows to two minutes); the retries above pace the calls themselves.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5000),
            # A connection of its own, even beside other clients in the same process (gRPC
            # shares one by default): coordinators limit the calls open on one connection.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if tls is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self.channel = grpc.secure_channel(address, tls.credentials(), options=options)
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
                    advice = self._hint() if code == grpc.StatusCode.UNAVAILABLE else ""
                    raise CoordinatorError(
                        f"{what} failed: {code.name}: {err.details()}{advice}",
                        code.name,
                    ) from None
                hint = _trailer(err, RETRY_AFTER_TRAILER) or _trailer(err, PUSHBACK_TRAILER)
                wait = self.backoff.delay(attempt, float(hint) / 1000 if hint else 0.0)
                if attempt == 0:  # one line says it; each retry after it only with -vv
                    logger.info(
                        "%s: %s (%s); retrying up to %d more times (about %.0f s with backoff, "
                        "longer where the coordinator asks for it)",
                        what,
                        code.name,
                        err.details(),
                        self.backoff.attempts - 1,
                        self.backoff.longest(),
                    )
                logger.debug("%s: %s; retry %d in %.2fs", what, code.name, attempt + 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _hint(self) -> str:
        if self.tls is None:
            return (
                f" (is a coordinator serving at {self.address}? If it serves TLS, pass "
                "--tls-ca CERT, or --tls for a certificate from a public CA)"
            )
        return (
            f" (is a coordinator serving TLS at {self.address}, with a certificate that "
            "--tls-ca trusts for this name? --tls-server-name sets the name to check)"
        )

    def info(self) -> coordinator_pb2.CoordinatorInfo:
        return self._retry(
            f"contacting the coordinator at {self.address}",
            lambda: self.stub.GetCoordinatorInfo(
                coordinator_pb2.GetCoordinatorInfoRequest(),
                timeout=self.timeout,
                wait_for_ready=False,
            ),
        )

    @property
    def coordinator_key(self) -> bytes:
        """The coordinator's public key (asked once): every payload this node signs for it
        names it, and no other coordinator accepts them."""
        if self._coordinator_key is None:
            self._coordinator_key = bytes(self.info().public_key)
        return self._coordinator_key

    def register(
        self, identity: Identity, display_name: str = "", invite_token: str = ""
    ) -> coordinator_pb2.RegisterNodeResponse:
        """Register (idempotent). Every attempt is signed afresh: a retry after a lost reply
        must not resend a nonce the coordinator has already spent."""

        def call() -> coordinator_pb2.RegisterNodeResponse:
            env = sign_envelope(
                identity,
                contribution_pb2.RegisterPayload(
                    nonce=new_nonce(),
                    timestamp_ms=now_ms(),
                    display_name=display_name,
                    invite_token=invite_token,
                ),
                self.coordinator_key,
            )
            return self.stub.RegisterNode(env, timeout=self.timeout)

        return self._retry("registering", call)

    def status(self, identity: Identity) -> coordinator_pb2.NodeStatus:
        def call() -> coordinator_pb2.NodeStatus:
            env = sign_envelope(
                identity,
                contribution_pb2.StatusRequestPayload(nonce=new_nonce(), timestamp_ms=now_ms()),
                self.coordinator_key,
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

    def watch_rounds(self, after_round_id: int = 0, timeout: float | None = None) -> Any:
        """Round events as they happen (``timeout=None``: until cancelled): gRPC's streaming
        call, an iterator of ``RoundEvent`` with ``initial_metadata``, ``done`` and
        ``cancel``."""
        return self.stub.WatchRounds(
            coordinator_pb2.WatchRoundsRequest(after_round_id=after_round_id), timeout=timeout
        )

    def ledger(self, after_round_id: int = 0) -> list[LedgerEntry]:
        """Every signed round record after ``after_round_id``, in order."""

        def call() -> list[LedgerEntry]:
            return [
                LedgerEntry(e.round_id, e.record, e.signature)
                for e in self.stub.GetLedger(
                    coordinator_pb2.GetLedgerRequest(after_round_id=after_round_id),
                    timeout=self.timeout,
                )
            ]

        return self._retry("fetching the ledger", call)

    def tree_head(self, first_size: int = 0) -> tuple[SignedTreeHead, list[bytes]]:
        """The coordinator's signed tree head over its ledger, and the consistency proof from
        the tree of ``first_size`` records (docs/protocol.md 11.8)."""

        def call() -> coordinator_pb2.TreeHead:
            return self.stub.GetTreeHead(
                coordinator_pb2.GetTreeHeadRequest(first_size=first_size), timeout=self.timeout
            )

        got = self._retry("fetching the tree head", call)
        head = SignedTreeHead(self.coordinator_key, bytes(got.head), bytes(got.signature))
        return head, [bytes(p) for p in got.consistency]

    def inclusion_proofs(
        self, ids: list[bytes], batch: int = 4096
    ) -> list[coordinator_pb2.InclusionProof]:
        out: list[coordinator_pb2.InclusionProof] = []
        for start in range(0, len(ids), batch):
            request = coordinator_pb2.InclusionProofsRequest(
                contribution_ids=ids[start : start + batch]
            )
            response: coordinator_pb2.InclusionProofs = self._retry(
                "fetching inclusion proofs",
                functools.partial(self.stub.GetInclusionProofs, request, timeout=self.timeout),
            )
            out += response.proofs
        return out


@dataclass(frozen=True)
class TLSClient:
    """How a node checks the coordinator over TLS: ``ca`` is the PEM of the certificate (or
    CA) to trust (None: the system's roots); ``cert``/``key`` a client certificate for mutual
    TLS; ``server_name`` overrides the name checked in the certificate."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        server_name: str | None = None,
    ) -> TLSClient:
        if (cert is None) != (key is None):
            raise ConfigError("a client certificate needs its key, and a key its certificate")

        def read(p: Path | None, what: str) -> bytes | None:
            if p is None:
                return None
            try:
                return Path(p).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read the {what} {p}: {exc.strerror}") from None

        return cls(
            read(ca, "CA certificate"),
            read(cert, "client certificate"),
            read(key, "client key"),
            server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
