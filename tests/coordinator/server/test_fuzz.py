"""Hostile input: at least 10,000 random and mutated envelopes (hypothesis) against the
servicer. Every one is answered with a status (never INTERNAL, never an exception, never a
hang), and nothing invalid is stored."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crowdsft.coordinator.server.servicer import answer
from crowdsft.envelope import (
    CONTRIBUTION_TAG,
    RECEIPT_TAG,
    domain_tag,
    new_nonce,
    now_ms,
    sign_envelope,
)
from crowdsft.keys import Identity, verify_signature
from crowdsft.testing.load import one_address
from crowdsft.v1 import contribution_pb2, envelope_pb2
from crowdsft.validation import Limits, payload_problems

ANSWERED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
}
FUZZ = settings(
    max_examples=2600,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
IDENTITIES = [Identity.generate() for _ in range(3)]


class _Coordinator:
    def __init__(self, root) -> None:
        import dataclasses

        from crowdsft.config import load_coordinator_config
        from crowdsft.coordinator.server.app import Coordinator
        from crowdsft.coordinator.server.scaffold import init_coordinator
        from crowdsft.node.client import CoordinatorClient

        config = load_coordinator_config(init_coordinator(root, listen="127.0.0.1:0"))
        config = one_address(config)
        config = dataclasses.replace(
            config,
            rate_limit=dataclasses.replace(
                config.rate_limit,
                node_calls_per_s=1e6,
                node_calls_burst=1_000_000,
                # Junk with bad signatures on purpose: this test wants every envelope
                # verified, not the peer slowed down (tests/coordinator/server/test_hostile.py).
                peer_bad_signature_burst=1_000_000,
            ),
        )
        self.coordinator = Coordinator(config).start()
        self.public_key = self.coordinator.identity.public_key
        self.client = lambda: CoordinatorClient(self.coordinator.address, timeout=60)


@pytest.fixture(scope="module")
def fuzz_coord(tmp_path_factory):
    h = _Coordinator(tmp_path_factory.mktemp("fuzz"))
    yield h
    h.coordinator.stop(0)


# The service call behind each RPC; failures are answered through the servicer's table.
CALLS = {"SubmitContribution": "submit", "RegisterNode": "register", "GetNodeStatus": "node_status"}


def send(coord, env: envelope_pb2.SignedEnvelope, method: str = "SubmitContribution") -> None:
    call = getattr(coord.coordinator.service, CALLS[method])
    try:
        response = call(env)
    except Exception as exc:
        a = answer(exc)
        assert a.code in ANSWERED, f"{a.code.name}: {a.message}"
        return
    assert response is not None


def signed(identity: Identity, payload: bytes, tag: bytes = CONTRIBUTION_TAG):
    return envelope_pb2.SignedEnvelope(
        payload=payload, signature=identity.sign(tag + payload), public_key=identity.public_key
    )


def valid(
    identity: Identity, n: int = 1, text: str = "x", *, coordinator: bytes
) -> envelope_pb2.SignedEnvelope:
    return sign_envelope(
        identity,
        contribution_pb2.ContributionPayload(
            examples=[
                contribution_pb2.Example(prompt=f"{text} {i} {new_nonce().hex()}", response="r")
                for i in range(n)
            ],
            nonce=new_nonce(),
            timestamp_ms=now_ms(),
        ),
        coordinator,
    )


@FUZZ
@given(
    payload=st.binary(max_size=600),
    signature=st.binary(max_size=80),
    key=st.one_of(st.binary(max_size=40), st.sampled_from([i.public_key for i in IDENTITIES])),
)
def test_random_envelopes(fuzz_coord, payload, signature, key):
    env = envelope_pb2.SignedEnvelope(payload=payload, signature=signature, public_key=key)
    send(fuzz_coord, env)


MUTATIONS = st.sampled_from(
    ["flip_payload", "flip_signature", "flip_key", "truncate", "extend", "swap_key", "wrong_tag"]
)


@FUZZ
@given(
    mutation=MUTATIONS,
    where=st.integers(0, 10_000),
    bit=st.integers(0, 7),
    extra=st.binary(min_size=1, max_size=30),
)
def test_mutated_envelopes(fuzz_coord, mutation, where, bit, extra):
    ident = IDENTITIES[where % 3]
    env = valid(ident, 1 + where % 3, coordinator=fuzz_coord.public_key)
    p, s, k = bytearray(env.payload), bytearray(env.signature), bytearray(env.public_key)
    if mutation == "flip_payload":
        p[where % len(p)] ^= 1 << bit
    elif mutation == "flip_signature":
        s[where % len(s)] ^= 1 << bit
    elif mutation == "flip_key":
        k[where % len(k)] ^= 1 << bit
    elif mutation == "truncate":
        p = p[: where % len(p)]
    elif mutation == "extend":
        p += extra
    elif mutation == "swap_key":
        k = bytearray(IDENTITIES[(where + 1) % 3].public_key)
    else:
        tag = domain_tag(contribution_pb2.RegisterPayload)
        env = signed(ident, bytes(p), tag)
        s = bytearray(env.signature)
    send(
        fuzz_coord,
        envelope_pb2.SignedEnvelope(payload=bytes(p), signature=bytes(s), public_key=bytes(k)),
    )


TEXT = st.text(max_size=60) | st.sampled_from(["", " ", "\x00", "é" * 40, "x" * 40_000])


@FUZZ
@given(
    examples=st.lists(st.tuples(TEXT, TEXT, st.none() | TEXT), max_size=70),
    nonce=st.binary(max_size=80),
    ts=st.integers(-(2**63), 2**63 - 1) | st.just(0) | st.just(-1),
    fresh=st.booleans(),
    junk_bytes=st.binary(max_size=200),
    license_=st.text(max_size=300),
)
def test_signed_payloads_with_hostile_fields(
    fuzz_coord, examples, nonce, ts, fresh, junk_bytes, license_
):
    """Correctly signed, so they reach validation: odd sizes, empty fields, bad nonces,
    timestamps anywhere, unknown trailing bytes."""
    msg = contribution_pb2.ContributionPayload(
        nonce=new_nonce() if fresh else nonce,
        timestamp_ms=now_ms() if fresh else ts,
    )
    msg.metadata.license = license_
    for p, r, s in examples:
        e = msg.examples.add(prompt=p, response=r)
        if s is not None:
            e.system = s
    payload = msg.SerializeToString()
    if junk_bytes and not fresh:
        payload += junk_bytes
    send(fuzz_coord, signed(IDENTITIES[0], payload))


@FUZZ
@given(
    payload=st.binary(max_size=300),
    which=st.sampled_from(["RegisterNode", "GetNodeStatus"]),
    tagged=st.booleans(),
)
def test_other_signed_calls(fuzz_coord, payload, which, tagged):
    message = (
        contribution_pb2.RegisterPayload
        if which == "RegisterNode"
        else contribution_pb2.StatusRequestPayload
    )
    env = (
        signed(IDENTITIES[1], payload, domain_tag(message))
        if tagged
        else envelope_pb2.SignedEnvelope(payload=payload)
    )
    send(fuzz_coord, env, which)


def test_a_stream_of_junk_gets_one_answer_each(fuzz_coord):
    import random

    rng = random.Random(0)
    envs = []
    for i in range(400):
        if i % 4 == 0:
            envs.append(valid(IDENTITIES[i % 3], 1, "stream", coordinator=fuzz_coord.public_key))
        else:
            envs.append(
                envelope_pb2.SignedEnvelope(
                    payload=rng.randbytes(rng.randint(0, 200)),
                    signature=rng.randbytes(64),
                    public_key=IDENTITIES[i % 3].public_key,
                )
            )
    with fuzz_coord.client() as c:
        results = list(c.submit_stream(envs, timeout=60))
    assert [r.index for r in results] == list(range(400))
    assert sum(r.code == 0 for r in results) == 100
    assert all(r.code in {s.value[0] for s in ANSWERED} for r in results if r.code)


def check_store(coord) -> int:
    """Every stored contribution re-verifies: its signature, its payload under the limits,
    its receipt. Returns how many there are."""
    store = coord.coordinator.store
    rows = store.query(
        "SELECT c.payload, c.payload_file, c.id, c.signature, n.public_key, c.receipt, "
        "c.receipt_signature FROM contributions c JOIN nodes n ON n.node_id = c.node_id"
    )
    limits = Limits()
    for stored, name, cid, sig, key, receipt, rsig in rows:
        payload = store.load_payload(stored, name, bytes(cid))  # large ones live in files
        assert verify_signature(key, sig, CONTRIBUTION_TAG + payload)
        msg = contribution_pb2.ContributionPayload.FromString(payload)
        assert not payload_problems(msg, limits)
        assert verify_signature(coord.public_key, rsig, RECEIPT_TAG + receipt)
    return len(rows)


@pytest.fixture(autouse=True)
def _store_checked_after_each_test(fuzz_coord):
    """The store is checked after every test of this module, whichever ran and in whatever
    order (alone, with -k, shuffled)."""
    yield
    check_store(fuzz_coord)


def test_nothing_invalid_is_stored(fuzz_coord):
    """Valid and invalid envelopes side by side: exactly the valid ones are stored, and
    everything stored re-verifies."""
    before = check_store(fuzz_coord)
    good = [
        valid(IDENTITIES[i % 3], 1, "final", coordinator=fuzz_coord.public_key) for i in range(20)
    ]
    for env in good:
        bad = envelope_pb2.SignedEnvelope()
        bad.CopyFrom(env)
        bad.signature = bytes(64)
        send(fuzz_coord, bad)
        send(fuzz_coord, env)
    assert check_store(fuzz_coord) == before + len(good)
