"""Signing and verifying envelopes and receipts.

Every signature covers a domain tag that names the message type, followed by the exact bytes
that travel. The verifier checks those bytes before it parses them and never re-serialises a
message to verify it (protobuf serialisation is not canonical).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from crowdsft.errors import AuthenticationError, InvalidPayloadError, ReceiptError
from crowdsft.keys import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    node_id_from_public_key,
    verify_signature,
)
from crowdsft.v1 import contribution_pb2, envelope_pb2

M = TypeVar("M", bound=Message)

NONCE_BYTES = 16


def domain_tag(message_type: type[Message]) -> bytes:
    """The domain tag for a message type, e.g. ``b"crowdsft.v1.ContributionPayload\\n"``."""
    return message_type.DESCRIPTOR.full_name.encode() + b"\n"


CONTRIBUTION_TAG = domain_tag(contribution_pb2.ContributionPayload)
RECEIPT_TAG = domain_tag(envelope_pb2.Receipt)


def contribution_id(payload: bytes) -> bytes:
    """The contribution id: SHA-256 of the payload bytes."""
    return hashlib.sha256(payload).digest()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def sign_envelope(
    identity: Identity, payload: Message, coordinator: bytes | None = None
) -> envelope_pb2.SignedEnvelope:
    """Serialise ``payload`` once and sign those bytes under the payload type's domain tag.
    ``coordinator``: the public key of the coordinator the payload is for, written into its
    ``coordinator_key`` field first (every node-signed payload has one; §4.4)."""
    if coordinator is not None:
        payload.coordinator_key = coordinator  # type: ignore[attr-defined]
    data = payload.SerializeToString()
    return envelope_pb2.SignedEnvelope(
        payload=data,
        signature=identity.sign(domain_tag(type(payload)) + data),
        public_key=identity.public_key,
    )


def sign_contribution(
    identity: Identity,
    examples: Sequence[Mapping[str, Any]],
    metadata: contribution_pb2.ContributionMetadata | None = None,
    *,
    coordinator: bytes,
) -> envelope_pb2.SignedEnvelope:
    """A signed contribution of ``examples`` (dicts with ``prompt``, ``response`` and
    optionally ``system`` and ``history``, a conversation's earlier turns as ``{"user",
    "assistant"}`` dicts), with a fresh nonce and the current time: the one way every sender
    (the node, the demo, the load test, the crash harness, the benchmarks) builds one.
    ``coordinator``: the public key of the coordinator it is for; no other accepts it."""
    from crowdsft.validation import examples_to_proto

    payload = contribution_pb2.ContributionPayload(
        examples=examples_to_proto(examples), nonce=new_nonce(), timestamp_ms=now_ms()
    )
    if metadata is not None:
        payload.metadata.CopyFrom(metadata)
    return sign_envelope(identity, payload, coordinator)


def check_addressed(payload: Message, coordinator_key: bytes) -> None:
    """Raise InvalidPayloadError unless ``payload`` names ``coordinator_key`` as the
    coordinator it is for (§4.4): a node's signed payload for one coordinator must not be
    accepted by another, which would otherwise store it, and pay for it, on its behalf."""
    named = bytes(payload.coordinator_key)  # type: ignore[attr-defined]
    kind = payload.DESCRIPTOR.full_name
    if not named:
        raise InvalidPayloadError(
            f"the {kind} names no coordinator (coordinator_key is empty): that is the form "
            "before payloads were bound to one coordinator, which any coordinator could be "
            "sent; sign it again with a current node (docs/protocol.md section 4.4)"
        )
    if named != coordinator_key:
        raise InvalidPayloadError(
            f"the {kind} is for coordinator {named.hex()[:16]}…, not this one "
            f"({coordinator_key.hex()[:16]}…): a payload signed for one coordinator is refused "
            "by every other"
        )


@dataclass(frozen=True)
class Verified:
    """An envelope whose signature checked out, with its parsed payload."""

    node_id: str
    public_key: bytes
    payload_bytes: bytes
    signature: bytes


def verify_envelope(
    envelope: envelope_pb2.SignedEnvelope,
    message_type: type[M],
    precheck: Callable[[str, bytes], None] | None = None,
) -> tuple[Verified, M]:
    """Verify the signature over the exact payload bytes, then (and only then) parse them.
    ``precheck(node_id, payload)`` runs between the two, for checks that need the proven key
    or only the wire bytes, sparing the parse of what would be refused anyway.

    Raises AuthenticationError for a missing or wrong-length key or a bad signature, and
    InvalidPayloadError for bytes that do not parse as ``message_type``.
    """
    pk = envelope.public_key
    if len(pk) != PUBLIC_KEY_BYTES:
        raise AuthenticationError(
            f"public_key has {len(pk)} bytes; an Ed25519 public key has {PUBLIC_KEY_BYTES}"
        )
    if len(envelope.signature) != SIGNATURE_BYTES:
        raise AuthenticationError(
            f"signature has {len(envelope.signature)} bytes; an Ed25519 signature has "
            f"{SIGNATURE_BYTES}"
        )
    if not verify_signature(pk, envelope.signature, domain_tag(message_type) + envelope.payload):
        raise AuthenticationError(
            f"signature does not verify for this payload and public key "
            f"(expected a {message_type.DESCRIPTOR.full_name} signed by the key's owner)"
        )
    if precheck is not None:
        precheck(node_id_from_public_key(pk), envelope.payload)
    message = message_type()
    try:
        message.ParseFromString(envelope.payload)
    except DecodeError as exc:
        raise InvalidPayloadError(
            f"payload is not a valid {message_type.DESCRIPTOR.full_name}: {exc}"
        ) from None
    verified = Verified(
        node_id=node_id_from_public_key(pk),
        public_key=pk,
        payload_bytes=envelope.payload,
        signature=envelope.signature,
    )
    return verified, message


def sign_receipt(identity: Identity, receipt: envelope_pb2.Receipt) -> envelope_pb2.SignedReceipt:
    data = receipt.SerializeToString()
    return envelope_pb2.SignedReceipt(receipt=data, signature=identity.sign(RECEIPT_TAG + data))


def verify_receipt(
    signed: envelope_pb2.SignedReceipt,
    coordinator_public_key: bytes,
    *,
    expected_contribution_id: bytes | None = None,
    expected_node_id: str | None = None,
) -> envelope_pb2.Receipt:
    """Check a receipt's signature against the coordinator key and what the node sent.

    Raises ReceiptError with the precise mismatch.
    """
    if not verify_signature(coordinator_public_key, signed.signature, RECEIPT_TAG + signed.receipt):
        raise ReceiptError("receipt signature does not verify against the coordinator's key")
    receipt = envelope_pb2.Receipt()
    try:
        receipt.ParseFromString(signed.receipt)
    except DecodeError:
        raise ReceiptError("receipt bytes do not parse") from None
    if receipt.coordinator_public_key != coordinator_public_key:
        raise ReceiptError("receipt names a different coordinator key than the one that signed it")
    if expected_contribution_id is not None and receipt.contribution_id != expected_contribution_id:
        raise ReceiptError(
            f"receipt is for contribution {receipt.contribution_id.hex()}, "
            f"not {expected_contribution_id.hex()}"
        )
    if expected_node_id is not None and receipt.node_id != expected_node_id:
        raise ReceiptError(f"receipt is for node {receipt.node_id}, not {expected_node_id}")
    return receipt
