"""The test vectors of docs/protocol.md, recomputed with the library (and, where the spec gives
a formula, from the formula with hashlib and ``cryptography``): the spec and the code must say
the same thing about the same bytes."""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import Message

from crowdsft.envelope import (
    contribution_id,
    domain_tag,
    sign_envelope,
    sign_receipt,
    verify_envelope,
    verify_receipt,
)
from crowdsft.errors import AuthenticationError
from crowdsft.keys import Identity, node_id_from_public_key
from crowdsft.ledger import (
    GENESIS_HASH,
    LEDGER_TAG,
    LedgerEntry,
    MerkleTree,
    canonical,
    sign_record,
    verify_inclusion,
    verify_ledger,
)
from crowdsft.v1 import contribution_pb2, envelope_pb2
from crowdsft.validation import Limits, check_payload

SPEC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

# The signed payload vectors: name in the block, message type.
SIGNED: dict[str, type[Message]] = {
    "contribution": contribution_pb2.ContributionPayload,
    "register": contribution_pb2.RegisterPayload,
    "status_request": contribution_pb2.StatusRequestPayload,
}


@cache
def vectors() -> dict[str, Any]:
    """The fenced ```json block right under the "Test vectors" heading."""
    text = SPEC.read_text(encoding="utf-8")
    heading = re.search(r"^#+ [\d.]*\s*Test vectors\s*$", text, re.MULTILINE)
    assert heading is not None, "docs/protocol.md has no 'Test vectors' heading"
    block = re.search(r"^```json\n(.*?)^```$", text[heading.end() :], re.MULTILINE | re.DOTALL)
    assert block is not None, "no ```json block under the 'Test vectors' heading"
    return json.loads(block.group(1))


def identity(seed_hex: str) -> Identity:
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)))


def node() -> Identity:
    return identity(vectors()["node_key"]["seed"])


def coordinator() -> Identity:
    return identity(vectors()["coordinator_key"]["seed"])


def ed25519_verifies(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """RFC 8032 verification with ``cryptography`` (OpenSSL), apart from the library's own."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except InvalidSignature:
        return False
    return True


def build(name: str) -> Message:
    """The payload message the vector's fields describe: a missing ``system`` key is an absent
    field, ``"system": ""`` a present, empty one; bytes are hex."""
    fields = vectors()[name]["fields"]
    if name == "contribution":
        msg = contribution_pb2.ContributionPayload(
            nonce=bytes.fromhex(fields["nonce"]), timestamp_ms=fields["timestamp_ms"]
        )
        for ex in fields["examples"]:
            example = msg.examples.add(prompt=ex["prompt"], response=ex["response"])
            if "system" in ex:
                example.system = ex["system"]
        meta = fields["metadata"]
        msg.metadata.license = meta["license"]
        msg.metadata.consent = meta["consent"]
        msg.metadata.labels.update(meta["labels"])
        msg.coordinator_key = bytes.fromhex(fields["coordinator_key"])
        return msg
    hexed = ("nonce", "coordinator_key")
    return SIGNED[name](**{k: bytes.fromhex(v) if k in hexed else v for k, v in fields.items()})


# -- keys and node ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["node_key", "coordinator_key"])
def test_public_key_from_seed(which):
    v = vectors()[which]
    seed = bytes.fromhex(v["seed"])
    assert len(seed) == 32
    raw = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    assert raw.hex() == v["public_key"]
    assert identity(v["seed"]).public_key == raw


def test_node_id_is_the_first_16_bytes_of_the_key_hash_in_lowercase_hex():
    v = vectors()["node_key"]
    key = bytes.fromhex(v["public_key"])
    assert v["node_id"] == hashlib.sha256(key).digest()[:16].hex()
    assert v["node_id"] == node_id_from_public_key(key) == node().node_id
    assert re.fullmatch(r"[0-9a-f]{32}", v["node_id"])


# -- signed payloads -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_domain_tag(name):
    tag = vectors()[name]["domain_tag"]
    assert tag == f"crowdsft.v1.{SIGNED[name].DESCRIPTOR.name}\n"
    assert tag.encode() == domain_tag(SIGNED[name])


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_signed_payload(name):
    v = vectors()[name]
    payload = bytes.fromhex(v["payload"])
    signature = bytes.fromhex(v["signature"])
    msg = build(name)
    # the bytes the reference encoder produces for these fields
    assert msg.SerializeToString() == payload
    # Ed25519 over domain tag || payload: equal (deterministic) and verifiable by anyone
    env = sign_envelope(node(), msg)
    assert env.payload == payload
    assert env.signature == signature
    assert env.public_key.hex() == vectors()["node_key"]["public_key"]
    assert ed25519_verifies(env.public_key, signature, v["domain_tag"].encode() + payload)
    assert not ed25519_verifies(env.public_key, signature, payload)  # the tag is signed too
    # the coordinator's check: the node id of the key, and the fields back
    verified, parsed = verify_envelope(env, SIGNED[name])
    assert verified.node_id == vectors()["node_key"]["node_id"]
    assert parsed == msg
    # under another payload type's tag the same bytes do not verify
    other = next(t for n, t in SIGNED.items() if n != name)
    with pytest.raises(AuthenticationError):
        verify_envelope(env, other)


def test_contribution_id_is_the_sha256_of_the_payload_bytes():
    v = vectors()["contribution"]
    payload = bytes.fromhex(v["payload"])
    assert hashlib.sha256(payload).hexdigest() == v["contribution_id"]
    assert contribution_id(payload).hex() == v["contribution_id"]


def test_contribution_vector_is_a_valid_contribution_with_empty_and_absent_system():
    msg = contribution_pb2.ContributionPayload.FromString(
        bytes.fromhex(vectors()["contribution"]["payload"])
    )
    assert check_payload(msg, Limits()).problems == []
    assert [e.HasField("system") for e in msg.examples] == [True, True, False]
    assert msg.examples[1].system == ""
    # a present, empty system is on the wire as field 3 with length 0
    assert b"\x1a\x00" in msg.examples[1].SerializeToString()
    assert b"\x1a" not in msg.examples[2].SerializeToString()


def spec_fingerprint(system: str, turns: list[tuple[str, str]], prompt: str, response: str):
    """The fingerprint by the formula of §6.1, written out apart from the library's."""
    import unicodedata

    def normalise(t: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", t).casefold().split())

    text = "\x1f".join([normalise(system), normalise(prompt), normalise(response)])
    for user, assistant in turns:
        text += "\x1f" + normalise(user) + "\x1f" + normalise(assistant)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_conversation_vector_bytes_and_fingerprint():
    v = vectors()["conversation"]
    f = v["fields"]
    turns = [(t["user"], t["assistant"]) for t in f["history"]]
    example = contribution_pb2.Example(
        prompt=f["prompt"], response=f["response"], system=f["system"]
    )
    for user, assistant in turns:
        example.history.add(user=user, assistant=assistant)
    assert example.SerializeToString().hex() == v["example"]
    payload = contribution_pb2.ContributionPayload(
        examples=[example], nonce=bytes(16), timestamp_ms=1
    )
    checked = check_payload(payload, Limits())
    assert checked.problems == []
    assert checked.fingerprints[0].hex() == v["fingerprint"]
    assert spec_fingerprint(f["system"], turns, f["prompt"], f["response"]) == v["fingerprint"]
    # the same last turn without its history is another example
    assert spec_fingerprint(f["system"], [], f["prompt"], f["response"]) != v["fingerprint"]


def test_single_turn_fingerprints_follow_the_formula():
    msg = build("contribution")
    for example, fp in zip(msg.examples, check_payload(msg, Limits()).fingerprints, strict=True):
        assert fp.hex() == spec_fingerprint(example.system, [], example.prompt, example.response)


# -- receipts ------------------------------------------------------------------------------------


def test_receipt():
    v = vectors()["receipt"]
    fields = v["fields"]
    coord = coordinator()
    receipt = envelope_pb2.Receipt(
        contribution_id=bytes.fromhex(fields["contribution_id"]),
        node_id=fields["node_id"],
        accepted_at_ms=fields["accepted_at_ms"],
        example_count=fields["example_count"],
        coordinator_public_key=bytes.fromhex(fields["coordinator_public_key"]),
    )
    data = bytes.fromhex(v["receipt"])
    signature = bytes.fromhex(v["signature"])
    assert receipt.SerializeToString() == data
    assert v["domain_tag"].encode() == domain_tag(envelope_pb2.Receipt)
    signed = sign_receipt(coord, receipt)
    assert signed.receipt == data
    assert signed.signature == signature
    assert ed25519_verifies(coord.public_key, signature, v["domain_tag"].encode() + data)
    # what a node checks: the pinned key, its contribution id, its node id
    payload = bytes.fromhex(vectors()["contribution"]["payload"])
    checked = verify_receipt(
        envelope_pb2.SignedReceipt(receipt=data, signature=signature),
        coord.public_key,
        expected_contribution_id=hashlib.sha256(payload).digest(),
        expected_node_id=node().node_id,
    )
    assert checked.coordinator_public_key == coord.public_key
    assert checked.example_count == len(vectors()["contribution"]["fields"]["examples"])
    assert not ed25519_verifies(node().public_key, signature, v["domain_tag"].encode() + data)


# -- Merkle trees --------------------------------------------------------------------------------


def _mth(leaves: list[bytes]) -> bytes:
    """The Merkle tree hash as docs/protocol.md section 11.5 writes it."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


def test_merkle_root_and_inclusion_proof():
    v = vectors()["merkle"]
    leaves = [bytes.fromhex(x) for x in v["leaves"]]
    path = [bytes.fromhex(p) for p in v["path"]]
    root = bytes.fromhex(v["root"])
    assert len(leaves) == v["tree_size"]
    assert leaves[v["leaf_index"]].hex() == vectors()["contribution"]["contribution_id"]
    assert _mth(leaves) == root
    tree = MerkleTree(leaves)
    assert tree.root == root
    assert tree.proof(v["leaf_index"]) == path
    assert verify_inclusion(leaves[v["leaf_index"]], v["leaf_index"], v["tree_size"], path, root)
    assert not verify_inclusion(leaves[0], v["leaf_index"], v["tree_size"], path, root)


# -- the ledger ----------------------------------------------------------------------------------


def _entries() -> list[LedgerEntry]:
    return [
        LedgerEntry(r["round_id"], r["record"].encode("utf-8"), bytes.fromhex(r["signature"]))
        for r in vectors()["ledger"]["records"]
    ]


def test_ledger_records_bytes_hashes_signatures_and_chain():
    v = vectors()["ledger"]
    coord = coordinator()
    assert v["domain_tag"].encode() == LEDGER_TAG
    prev = GENESIS_HASH
    for expected_id, (r, entry) in enumerate(zip(v["records"], _entries(), strict=True), 1):
        data = json.loads(entry.record)
        assert canonical(data) == entry.record  # the canonical serialisation
        assert sign_record(coord.sign, data) == (entry.record, entry.signature)
        assert ed25519_verifies(coord.public_key, entry.signature, LEDGER_TAG + entry.record)
        assert hashlib.sha256(entry.record).hexdigest() == r["hash"] == entry.hash.hex()
        assert data["round_id"] == entry.round_id == expected_id
        assert data["prev_hash"] == prev.hex()
        assert data["coordinator"] == coord.public_key.hex()
        prev = entry.hash
    first = json.loads(v["records"][0]["record"])
    merkle = vectors()["merkle"]
    assert first["contributions"] == {"count": merkle["tree_size"], "merkle_root": merkle["root"]}


def test_ledger_verifies_and_points_follow_the_rank_rule():
    report = verify_ledger(_entries(), coordinator().public_key)
    assert report.ok, [str(p) for p in report.problems]
    assert report.points == vectors()["ledger"]["points_after"]
    # the rank rule and points-squared influence as section 12 writes them
    awarded: dict[str, float] = {}
    for r in vectors()["ledger"]["records"]:
        rec = json.loads(r["record"])
        assert rec["strategies"]["reward"] == "rank"
        assert rec["strategies"]["influence"] == "points-squared"
        weights = [[(1.0 + awarded.get(n, 0.0)) ** 2 for n in g] for g in rec["groups"]]
        assert rec["weights"] == weights
        n_groups = len(rec["groups"])
        if "consolidated" in rec:  # section 12.6: everyone, at the same influence
            members = rec["consolidated"]["members"]
            assert members == rec["population"]
            assert rec["consolidated"]["weights"] == [(1.0 + awarded[n]) ** 2 for n in members]
            assert rec["candidates"][n_groups]["consolidated"] is True
            assert rec["winner"] == n_groups and rec["consumed"]["nodes"] == []
        after = dict(awarded)
        if rec["updated"]:
            groups_order = [g for g in rec["ranking"] if g < n_groups]
            for rank, g in enumerate(groups_order):
                for n in rec["groups"][g]:
                    after[n] = after.get(n, 0.0) + n_groups - rank
        changed = {n: [awarded.get(n, 0.0), a] for n, a in after.items() if a != awarded.get(n)}
        assert rec["points"] == changed
        awarded = after
    assert awarded == vectors()["ledger"]["points_after"]


def test_a_changed_record_fails_verification():
    entries = _entries()
    bad = entries[0].record.replace(b'"score":-0.6', b'"score":-0.4')
    assert bad != entries[0].record
    entries[0] = LedgerEntry(1, bad, entries[0].signature)
    report = verify_ledger(entries, coordinator().public_key)
    assert {p.kind for p in report.problems} >= {"signature", "link"}
