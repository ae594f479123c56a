"""Uploading a file of examples: sign once, keep the bytes, stream, retry, verify receipts."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from crowdsft.datafiles import Record
from crowdsft.envelope import contribution_id, now_ms, sign_contribution, verify_receipt
from crowdsft.errors import CoordinatorError, InputError, ReceiptError
from crowdsft.keys import Identity
from crowdsft.node.client import CODE_NAMES, TRANSIENT, CoordinatorClient
from crowdsft.node.state import NodeState, Submission
from crowdsft.v1 import contribution_pb2, coordinator_pb2, envelope_pb2
from crowdsft.validation import Limits, example_problems

logger = logging.getLogger(__name__)

OK = grpc.StatusCode.OK.value[0]
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
TRANSIENT_CODES = frozenset(code.value[0] for code in TRANSIENT)
MAX_RESIGN = 2


@dataclass(frozen=True)
class Metadata:
    license: str = ""
    consent: bool = False
    labels: tuple[tuple[str, str], ...] = ()

    def to_proto(self) -> contribution_pb2.ContributionMetadata:
        return contribution_pb2.ContributionMetadata(
            license=self.license, consent=self.consent, labels=dict(self.labels)
        )


@dataclass
class Failure:
    source: str
    status: str
    message: str


@dataclass
class UploadReport:
    coordinator: str
    node_id: str
    contributions: int = 0
    examples: int = 0
    accepted: int = 0
    already_submitted: int = 0
    acknowledged_again: int = 0
    failures: list[Failure] = field(default_factory=list)
    receipts: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {
            "coordinator": self.coordinator,
            "node_id": self.node_id,
            "contributions": self.contributions,
            "examples": self.examples,
            "accepted": self.accepted,
            "already_submitted": self.already_submitted,
            "acknowledged_again": self.acknowledged_again,
            "failed": len(self.failures),
            "failures": [f.__dict__ for f in self.failures],
            "receipts": self.receipts,
        }


def chunk_key(records: Sequence[Record], metadata: Metadata) -> bytes:
    """What identifies a contribution's content, independent of its nonce and time."""
    doc = {
        "examples": [r.as_dict() for r in records],
        "metadata": [metadata.license, metadata.consent, sorted(metadata.labels)],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).digest()


def _source(records: Sequence[Record], name: str) -> str:
    a, b = records[0].line, records[-1].line
    return f"{name}:{a}" if a == b else f"{name}:{a}-{b}"


def _sign(
    identity: Identity,
    records: Sequence[Record],
    metadata: Metadata,
    key: bytes,
    source: str,
    coordinator: bytes,
) -> Submission:
    env = sign_contribution(
        identity, [r.as_dict() for r in records], metadata.to_proto(), coordinator=coordinator
    )
    return Submission(
        chunk_key=key,
        contribution_id=contribution_id(env.payload),
        payload=env.payload,
        signature=env.signature,
        example_count=len(records),
        source=source,
    )


def _addressed_to(payload: bytes, coordinator: bytes) -> bool:
    """Whether a stored, signed payload names ``coordinator`` (§4.4)."""
    try:
        return contribution_pb2.ContributionPayload.FromString(payload).coordinator_key == (
            coordinator
        )
    except Exception:
        return False


def limits_of(info: coordinator_pb2.CoordinatorInfo) -> Limits:
    return Limits(
        max_examples_per_contribution=info.max_examples_per_contribution or 1,
        max_field_bytes=info.max_field_bytes or Limits().max_field_bytes,
        max_message_bytes=info.max_message_bytes or Limits().max_message_bytes,
    )


def check_against(records: Sequence[Record], limits: Limits, name: str) -> None:
    problems = [
        f"line {r.line}: {p}"
        for r in records
        for p in example_problems(r.prompt, r.response, r.system, limits, history=r.history)
    ]
    if problems:
        raise InputError(
            f"{name}: {len(problems)} problem(s) under the coordinator's limits; nothing was "
            "sent:\n  " + "\n  ".join(problems[:20])
        )


def upload(
    client: CoordinatorClient,
    identity: Identity,
    state: NodeState,
    records: Sequence[Record],
    *,
    source_name: str = "input",
    examples_per_contribution: int = 1,
    metadata: Metadata | None = None,
    trust_new_key: bool = False,
    progress: Callable[[int], None] | None = None,
    stream_timeout_s: float | None = None,
) -> UploadReport:
    """Submit ``records`` as contributions of ``examples_per_contribution`` examples each.

    Contributions that already hold a receipt in ``state`` are skipped; ones signed earlier
    but never receipted are resent byte for byte. Returns a report; raises CoordinatorError
    when the coordinator stays unreachable, ReceiptError when a receipt does not verify.
    """
    metadata = metadata or Metadata()
    info = client.info()
    coord_key = info.public_key
    state.pin(client.address, coord_key, now_ms(), trust_new_key)
    limits = limits_of(info)
    check_against(records, limits, source_name)
    k = max(1, min(examples_per_contribution, limits.max_examples_per_contribution))

    report = UploadReport(coordinator=client.address, node_id=identity.node_id)
    todo: dict[bytes, Submission] = {}
    chunks: dict[bytes, tuple[Sequence[Record], str]] = {}
    fresh: list[Submission] = []
    for i in range(0, len(records), k):
        chunk = records[i : i + k]
        key = chunk_key(chunk, metadata)
        source = _source(chunk, source_name)
        chunks[key] = (chunk, source)
        report.contributions += 1
        report.examples += len(chunk)
        known = state.get(coord_key, key)
        if known is not None and known.receipt is not None:
            report.already_submitted += 1
            if progress:
                progress(1)
            continue
        if known is not None and not _addressed_to(known.payload, coord_key):
            known = None  # signed before payloads named their coordinator: sign it again
        if known is None:
            known = _sign(identity, chunk, metadata, key, source, coord_key)
            fresh.append(known)
        todo[key] = known
    state.put_pending_many(coord_key, fresh)  # durable before anything is sent

    resigned: dict[bytes, int] = {}
    attempt = 0  # rounds in a row that settled nothing
    while todo:
        before = len(todo)
        order = list(todo.values())
        timeout = stream_timeout_s or (60.0 + 0.05 * len(order))
        envelopes = (
            envelope_pb2.SignedEnvelope(
                payload=s.payload, signature=s.signature, public_key=identity.public_key
            )
            for s in order
        )
        retry_after = 0.0
        answered: list[tuple[Submission, envelope_pb2.SignedReceipt, bool]] = []
        stream_error: grpc.RpcError | None = None
        try:
            for result in client.submit_stream(envelopes, timeout=timeout):
                sub = order[result.index]
                if result.code == OK or (
                    result.code == ALREADY_EXISTS and result.HasField("receipt")
                ):
                    answered.append((sub, result.receipt, result.code == ALREADY_EXISTS))
                    if len(answered) >= 256:
                        _record(state, coord_key, identity, answered, report, todo, progress)
                elif (
                    result.code == FAILED_PRECONDITION
                    and resigned.get(sub.chunk_key, 0) < MAX_RESIGN
                ):
                    # Stale or replayed: it was never accepted (a duplicate would say so), so a
                    # fresh signature over a new nonce and time is safe.
                    resigned[sub.chunk_key] = resigned.get(sub.chunk_key, 0) + 1
                    chunk, source = chunks[sub.chunk_key]
                    new = _sign(identity, chunk, metadata, sub.chunk_key, source, coord_key)
                    state.put_pending(coord_key, new)
                    todo[sub.chunk_key] = new
                elif result.code in TRANSIENT_CODES:
                    retry_after = max(retry_after, result.retry_after_ms / 1000)
                else:
                    report.failures.append(
                        Failure(
                            sub.source,
                            CODE_NAMES.get(result.code, str(result.code)),
                            result.message,
                        )
                    )
                    del todo[sub.chunk_key]
                    if progress:
                        progress(1)
        except grpc.RpcError as err:
            stream_error = err
        _record(state, coord_key, identity, answered, report, todo, progress)
        if not todo:
            break
        if stream_error is not None:
            code = stream_error.code()
            if code not in TRANSIENT:
                raise CoordinatorError(
                    f"upload to {client.address} failed: {code.name}: {stream_error.details()}",
                    code.name,
                )
        # Rate limiting makes slow progress, not none; a round that settles nothing is a failure.
        attempt = 0 if len(todo) < before else attempt + 1
        if attempt > client.backoff.attempts:
            raise CoordinatorError(
                f"upload to {client.address} kept failing ({len(todo)} contributions unsent; "
                "run the same command again to resume)",
                "UNAVAILABLE",
            )
        wait = client.backoff.delay(attempt, retry_after)
        reason = stream_error.code().name if stream_error is not None else "coordinator busy"
        logger.info("%s; %d contributions left, resending in %.1fs", reason, len(todo), wait)
        time.sleep(wait)
    return report


def _record(
    state: NodeState,
    coord_key: bytes,
    identity: Identity,
    answered: list[tuple[Submission, envelope_pb2.SignedReceipt, bool]],
    report: UploadReport,
    todo: dict[bytes, Submission],
    progress: Callable[[int], None] | None,
) -> None:
    if not answered:
        return
    with state.transaction():
        for sub, signed, duplicate in answered:
            try:
                receipt = verify_receipt(
                    signed,
                    coord_key,
                    expected_contribution_id=sub.contribution_id,
                    expected_node_id=identity.node_id,
                )
            except ReceiptError as exc:
                raise ReceiptError(f"{sub.source}: {exc}") from None
            state.record_receipt(
                coord_key, sub.chunk_key, signed.receipt, signed.signature, receipt.accepted_at_ms
            )
            todo.pop(sub.chunk_key, None)
            if duplicate:
                report.acknowledged_again += 1
            else:
                report.accepted += 1
            report.receipts.append(
                {
                    "source": sub.source,
                    "contribution_id": sub.contribution_id.hex(),
                    "accepted_at_ms": receipt.accepted_at_ms,
                    "examples": receipt.example_count,
                    "duplicate": duplicate,
                }
            )
    if progress:
        progress(len(answered))
    answered.clear()
