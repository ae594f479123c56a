import pytest

from crowdsft.envelope import (
    contribution_id,
    new_nonce,
    now_ms,
    sign_envelope,
    sign_receipt,
    verify_envelope,
    verify_receipt,
)
from crowdsft.errors import AuthenticationError, InvalidPayloadError, ReceiptError
from crowdsft.keys import Identity
from crowdsft.v1 import contribution_pb2, envelope_pb2


def _payload(**kw):
    kw.setdefault("examples", [contribution_pb2.Example(prompt="p", response="r")])
    kw.setdefault("nonce", new_nonce())
    kw.setdefault("timestamp_ms", now_ms())
    return contribution_pb2.ContributionPayload(**kw)


def test_round_trip(identity):
    payload = _payload()
    env = sign_envelope(identity, payload)
    verified, parsed = verify_envelope(env, contribution_pb2.ContributionPayload)
    assert verified.node_id == identity.node_id
    assert verified.payload_bytes == env.payload
    assert parsed == payload
    assert contribution_id(env.payload) == contribution_id(payload.SerializeToString())


def test_tampered_payload_is_rejected(identity):
    env = sign_envelope(identity, _payload())
    tampered = bytearray(env.payload)
    tampered[-1] ^= 0x01
    env.payload = bytes(tampered)
    with pytest.raises(AuthenticationError, match="does not verify"):
        verify_envelope(env, contribution_pb2.ContributionPayload)


def test_wrong_key_is_rejected(identity):
    env = sign_envelope(identity, _payload())
    env.public_key = Identity.generate().public_key
    with pytest.raises(AuthenticationError, match="does not verify"):
        verify_envelope(env, contribution_pb2.ContributionPayload)


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_wrong_length_key_is_rejected(identity, length):
    env = sign_envelope(identity, _payload())
    env.public_key = b"\x07" * length
    with pytest.raises(AuthenticationError, match=f"public_key has {length} bytes"):
        verify_envelope(env, contribution_pb2.ContributionPayload)


def test_wrong_length_signature_is_rejected(identity):
    env = sign_envelope(identity, _payload())
    env.signature = env.signature[:63]
    with pytest.raises(AuthenticationError, match="signature has 63 bytes"):
        verify_envelope(env, contribution_pb2.ContributionPayload)


def test_domain_tag_separates_message_types(identity):
    """A signed status request cannot be passed off as a contribution (or the reverse)."""
    status = contribution_pb2.StatusRequestPayload(nonce=new_nonce(), timestamp_ms=now_ms())
    env = sign_envelope(identity, status)
    with pytest.raises(AuthenticationError):
        verify_envelope(env, contribution_pb2.ContributionPayload)


def test_signed_garbage_is_invalid_argument_not_auth(identity):
    from crowdsft.envelope import CONTRIBUTION_TAG

    junk = b"\xff\xff\xff\xff"
    env = envelope_pb2.SignedEnvelope(
        payload=junk,
        signature=identity.sign(CONTRIBUTION_TAG + junk),
        public_key=identity.public_key,
    )
    with pytest.raises(InvalidPayloadError, match=r"not a valid crowdsft\.v1\.ContributionPayload"):
        verify_envelope(env, contribution_pb2.ContributionPayload)


def test_receipt_verification(identity):
    coordinator = Identity.generate()
    receipt = envelope_pb2.Receipt(
        contribution_id=b"\x01" * 32,
        node_id=identity.node_id,
        accepted_at_ms=123,
        example_count=1,
        coordinator_public_key=coordinator.public_key,
    )
    signed = sign_receipt(coordinator, receipt)
    got = verify_receipt(
        signed,
        coordinator.public_key,
        expected_contribution_id=b"\x01" * 32,
        expected_node_id=identity.node_id,
    )
    assert got == receipt
    with pytest.raises(ReceiptError, match="does not verify"):
        verify_receipt(signed, Identity.generate().public_key)
    with pytest.raises(ReceiptError, match="not 0202"):
        verify_receipt(signed, coordinator.public_key, expected_contribution_id=b"\x02" * 32)
    with pytest.raises(ReceiptError, match="is for node"):
        verify_receipt(signed, coordinator.public_key, expected_node_id="someone else")
    forged = envelope_pb2.SignedReceipt(
        receipt=signed.receipt + b"\x00", signature=signed.signature
    )
    with pytest.raises(ReceiptError):
        verify_receipt(forged, coordinator.public_key)
