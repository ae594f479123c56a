"""The coordinator over gRPC: every acceptance and every rejection, and that rejections store
nothing."""

from __future__ import annotations

import re

import grpc
import pytest

from crowdsft.envelope import (
    CONTRIBUTION_TAG,
    contribution_id,
    new_nonce,
    now_ms,
    sign_contribution,
    sign_envelope,
    verify_receipt,
)
from crowdsft.keys import Identity
from crowdsft.v1 import contribution_pb2, coordinator_pb2, envelope_pb2


def payload(n: int = 1, *, nonce: bytes | None = None, ts: int | None = None, **ex):
    """A contribution of ``n`` examples, each its own unless the test fixes the prompt (copies
    of stored examples are rejected)."""
    tag = new_nonce().hex()[:12]
    examples = [
        {"prompt": f"What is SFT? ({tag}-{i})", "response": "Supervised fine-tuning."} | ex
        for i in range(n)
    ]
    return contribution_pb2.ContributionPayload(
        examples=[contribution_pb2.Example(**e) for e in examples],
        nonce=nonce or new_nonce(),
        timestamp_ms=ts if ts is not None else now_ms(),
    )


def rejected(coord, call, envelope, code: grpc.StatusCode, match: str):
    """Send ``envelope``; assert the status and message, and that nothing was stored."""
    before = coord.counts()
    with pytest.raises(grpc.RpcError) as info:
        call(envelope, timeout=10)
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()
    assert coord.counts() == before
    return info.value


def test_accepts_and_returns_a_verifiable_receipt(coord, identity):
    with coord.client() as client:
        env = sign_envelope(identity, payload(3), coord.public_key)
        resp = client.stub.SubmitContribution(env, timeout=10)
    receipt = verify_receipt(
        resp.receipt,
        coord.public_key,
        expected_contribution_id=contribution_id(env.payload),
        expected_node_id=identity.node_id,
    )
    assert receipt.example_count == 3
    assert abs(receipt.accepted_at_ms - now_ms()) < 60_000
    assert coord.counts() == {"nodes": 1, "contributions": 1, "nonces": 1}


def test_info_and_health(coord):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with coord.client() as client:
        info = client.info()
        assert info.public_key == coord.public_key
        assert info.protocol == "crowdsft.v1"
        assert info.max_examples_per_contribution == 64
        health = health_pb2_grpc.HealthStub(client.channel)
        for service in ("", "crowdsft.v1.Coordinator"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_api(coord):
    """Generic gRPC tools find the services and their messages without our .proto files."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(coord.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"crowdsft.v1.Coordinator", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(db)
        service = pool.FindServiceByName("crowdsft.v1.Coordinator")
        methods = {m.name for m in service.methods}
        assert "SubmitContribution" in methods
        submit = service.methods_by_name["SubmitContribution"]
        assert submit.input_type.full_name == "crowdsft.v1.SignedEnvelope"


def test_tampered_payload(coord, identity):
    env = sign_envelope(identity, payload(), coord.public_key)
    env.payload = env.payload.replace(b"SFT", b"RLHF")
    with coord.client() as c:
        rejected(
            coord,
            c.stub.SubmitContribution,
            env,
            grpc.StatusCode.UNAUTHENTICATED,
            "signature does not verify",
        )


def test_wrong_key(coord, identity):
    env = sign_envelope(identity, payload(), coord.public_key)
    env.public_key = Identity.generate().public_key
    with coord.client() as c:
        rejected(
            coord,
            c.stub.SubmitContribution,
            env,
            grpc.StatusCode.UNAUTHENTICATED,
            "signature does not verify",
        )


def test_wrong_length_key(coord, identity):
    env = sign_envelope(identity, payload(), coord.public_key)
    env.public_key = identity.public_key[:31]
    with coord.client() as c:
        rejected(
            coord,
            c.stub.SubmitContribution,
            env,
            grpc.StatusCode.UNAUTHENTICATED,
            "public_key has 31 bytes",
        )


@pytest.mark.parametrize("skew_s", [-3600, 3600])
def test_timestamp_outside_window(coord, identity, skew_s):
    env = sign_envelope(identity, payload(ts=now_ms() + skew_s * 1000), coord.public_key)
    direction = "ahead of" if skew_s > 0 else "behind"
    with coord.client() as c:
        err = rejected(
            coord,
            c.stub.SubmitContribution,
            env,
            grpc.StatusCode.FAILED_PRECONDITION,
            f"s {direction} the coordinator clock",
        )
    # the skew as the server saw it: the call itself takes a moment on a busy machine
    seen = float(re.search(r"timestamp is ([\d.]+)s", err.details()).group(1))
    assert abs(seen - 3600) < 5


def test_replayed_nonce_also_after_restart(coord, identity):
    nonce = new_nonce()
    with coord.client() as c:
        c.stub.SubmitContribution(
            sign_envelope(identity, payload(nonce=nonce), coord.public_key), timeout=10
        )
        other = sign_envelope(
            identity, payload(nonce=nonce, response="A different answer."), coord.public_key
        )
        rejected(
            coord, c.stub.SubmitContribution, other, grpc.StatusCode.FAILED_PRECONDITION, "replay"
        )
    coord.restart()
    with coord.client() as c:
        again = sign_envelope(
            identity, payload(nonce=nonce, response="Yet another answer."), coord.public_key
        )
        rejected(
            coord, c.stub.SubmitContribution, again, grpc.StatusCode.FAILED_PRECONDITION, "replay"
        )
    # The same nonce from another node is that node's business.
    with coord.client() as c:
        c.stub.SubmitContribution(
            sign_envelope(Identity.generate(), payload(nonce=nonce), coord.public_key)
        )


def test_duplicate_returns_original_receipt(coord, identity):
    env = sign_envelope(identity, payload(), coord.public_key)
    with coord.client() as c:
        first = c.stub.SubmitContribution(env, timeout=10).receipt
        err = rejected(
            coord,
            c.stub.SubmitContribution,
            env,
            grpc.StatusCode.ALREADY_EXISTS,
            "already accepted",
        )
        trailer = dict(err.trailing_metadata())["crowdsft-receipt-bin"]
        assert envelope_pb2.SignedReceipt.FromString(trailer) == first
        # The client turns that into a safe retry.
        receipt, duplicate = c.submit_one(env)
        assert duplicate and receipt == first
    coord.restart()
    with coord.client() as c:
        receipt, duplicate = c.submit_one(env)
        assert duplicate and receipt == first


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: payload(prompt=""), "examples[0].prompt is empty"),
        (lambda: payload(response="   "), "examples[0].response is empty"),
        (lambda: payload(response="x" * 40_000), "examples[0].response is 40000 bytes"),
        (lambda: payload(65), "contribution has more than 64 examples; the limit is 64"),
        (lambda: payload(0), "contribution has no examples"),
        (lambda: payload(nonce=b"short"), "nonce has 5 bytes"),
        (lambda: payload(ts=0), "timestamp_ms is missing"),
        (
            lambda: payload(history=[contribution_pb2.Turn(user="hi", assistant=" ")]),
            "examples[0].history[0].assistant is empty",
        ),
        (
            lambda: payload(history=[contribution_pb2.Turn(user="u", assistant="a")] * 65),
            "examples[0].history has 65 turns; the limit is 64",
        ),
    ],
)
def test_invalid_payloads(coord, identity, make, match):
    with coord.client() as c:
        rejected(
            coord,
            c.stub.SubmitContribution,
            sign_envelope(identity, make(), coord.public_key),
            grpc.StatusCode.INVALID_ARGUMENT,
            match,
        )


def test_malformed_payload_bytes(coord, identity):
    junk = b"\x0a\xff\xff\xff\xff\x0f"
    env = envelope_pb2.SignedEnvelope(
        payload=junk,
        signature=identity.sign(CONTRIBUTION_TAG + junk),
        public_key=identity.public_key,
    )
    with coord.client() as c:
        rejected(
            coord,
            c.stub.SubmitContribution,
            env,
            grpc.StatusCode.INVALID_ARGUMENT,
            "payload is not a valid crowdsft.v1.ContributionPayload",
        )


def test_oversized_message_is_refused_by_the_server(make_coordinator, identity):
    coord = make_coordinator(protocol={"max_message_bytes": 64 * 1024})
    big = payload(4, response="y" * 30_000)
    with coord.client() as c:
        rejected(
            coord,
            c.stub.SubmitContribution,
            sign_envelope(identity, big, coord.public_key),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
        )


def test_allowlist(make_coordinator, identity):
    admitted = Identity.generate()
    coord = make_coordinator(
        admission={"policy": "allowlist", "allowlist": (admitted.public_key.hex(),)}
    )
    with coord.client() as c:
        rejected(
            coord,
            c.stub.SubmitContribution,
            sign_envelope(identity, payload(), coord.public_key),
            grpc.StatusCode.PERMISSION_DENIED,
            "not on this coordinator's allowlist",
        )
        register = sign_envelope(
            identity,
            contribution_pb2.RegisterPayload(nonce=new_nonce(), timestamp_ms=now_ms()),
            coord.public_key,
        )
        rejected(
            coord, c.stub.RegisterNode, register, grpc.StatusCode.PERMISSION_DENIED, "allowlist"
        )
        c.stub.SubmitContribution(sign_envelope(admitted, payload(), coord.public_key), timeout=10)
    assert coord.counts()["contributions"] == 1


def test_allowlist_file(tmp_path, make_coordinator, identity):
    f = tmp_path / "allow.txt"
    f.write_text(f"# admitted nodes\n{identity.node_id}  # alice\n")
    coord = make_coordinator(admission={"policy": "allowlist", "allowlist_file": f})
    with coord.client() as c:
        c.stub.SubmitContribution(sign_envelope(identity, payload(), coord.public_key), timeout=10)


def test_rate_limit(make_coordinator, identity):
    coord = make_coordinator(rate_limit={"contributions_per_s": 0.01, "burst": 3})
    with coord.client() as c:
        for _ in range(3):
            c.stub.SubmitContribution(
                sign_envelope(identity, payload(), coord.public_key), timeout=10
            )
        err = rejected(
            coord,
            c.stub.SubmitContribution,
            sign_envelope(identity, payload(), coord.public_key),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "over the rate limit",
        )
        assert int(dict(err.trailing_metadata())["crowdsft-retry-after-ms"]) > 1000
        # Another node has its own bucket.
        c.stub.SubmitContribution(
            sign_envelope(Identity.generate(), payload(), coord.public_key), timeout=10
        )


def test_stream_answers_each_envelope_in_order(coord, identity):
    good = [sign_envelope(identity, payload(), coord.public_key) for _ in range(5)]
    bad = sign_envelope(identity, payload(prompt=""), coord.public_key)
    forged = sign_envelope(identity, payload(), coord.public_key)
    forged.signature = bytes(64)
    envelopes = [good[0], bad, good[1], good[0], forged, *good[2:]]
    with coord.client() as c:
        results = list(c.submit_stream(envelopes, timeout=30))
    assert [r.index for r in results] == list(range(len(envelopes)))
    codes = [grpc.StatusCode.OK.value[0]] * len(envelopes)
    codes[1] = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    codes[3] = grpc.StatusCode.ALREADY_EXISTS.value[0]
    codes[4] = grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert [r.code for r in results] == codes
    assert results[3].receipt == results[0].receipt
    for r, env in zip(results, envelopes, strict=True):
        assert r.contribution_id == contribution_id(env.payload)
        if r.code == 0:
            verify_receipt(r.receipt, coord.public_key, expected_contribution_id=r.contribution_id)
    assert coord.counts()["contributions"] == 5


def test_register_and_status(coord, identity):
    with coord.client() as c:
        first = c.register(identity, "alice")
        assert first.newly_registered and first.node_id == identity.node_id
        assert not c.register(identity).newly_registered
        c.stub.SubmitContribution(sign_envelope(identity, payload(2), coord.public_key), timeout=10)
        st = c.status(identity)
    assert (st.node_id, st.registered, st.display_name) == (identity.node_id, True, "alice")
    assert (st.contributions, st.examples, st.points) == (1, 2, 0.0)
    assert isinstance(st, coordinator_pb2.NodeStatus)


def test_status_request_cannot_be_replayed(coord, identity):
    env = sign_envelope(
        identity,
        contribution_pb2.StatusRequestPayload(nonce=new_nonce(), timestamp_ms=now_ms()),
        coord.public_key,
    )
    with coord.client() as c:
        c.stub.GetNodeStatus(env, timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            c.stub.GetNodeStatus(env, timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_second_coordinator_on_a_busy_port_fails_clearly(coord, capfd):
    from crowdsft.coordinator.server.app import Coordinator
    from crowdsft.errors import ConfigError

    capfd.readouterr()
    with pytest.raises(ConfigError, match=r"cannot listen on .*: the port is in use"):
        Coordinator(coord.config.with_listen(coord.address))
    # one clear line, before gRPC's core tries (and logs its own "Failed to add port")
    assert "add_port" not in capfd.readouterr().err


# -- payloads bound to one coordinator (docs/protocol.md 4.4; #25 item 9) -----------------------


def test_a_payload_signed_for_one_coordinator_is_refused_by_another(make_coordinator, identity):
    """Before: a node's signed envelopes for coordinator X were accepted by coordinator Y,
    which then paid the node for them."""
    x, y = make_coordinator(), make_coordinator()
    for_x = sign_contribution(
        identity, [{"prompt": "p", "response": "r"}], coordinator=x.public_key
    )
    with y.client() as c, pytest.raises(grpc.RpcError) as err:
        c.stub.SubmitContribution(for_x, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"is for coordinator {x.public_key.hex()[:16]}" in err.value.details()
    assert y.counts()["contributions"] == 0
    with x.client() as c:  # where it was meant to go, it is accepted
        assert c.stub.SubmitContribution(for_x, timeout=10).receipt.receipt
    status = sign_envelope(
        identity,
        contribution_pb2.StatusRequestPayload(nonce=new_nonce(), timestamp_ms=now_ms()),
        x.public_key,
    )
    with y.client() as c, pytest.raises(grpc.RpcError) as err:
        c.stub.GetNodeStatus(status, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_old_unbound_form_is_refused_with_a_clear_error(coord, identity):
    old = sign_envelope(
        identity,
        contribution_pb2.ContributionPayload(
            examples=[contribution_pb2.Example(prompt="p", response="r")],
            nonce=new_nonce(),
            timestamp_ms=now_ms(),
        ),
    )
    register = sign_envelope(
        identity, contribution_pb2.RegisterPayload(nonce=new_nonce(), timestamp_ms=now_ms())
    )
    with coord.client() as c:
        for call, env in ((c.stub.SubmitContribution, old), (c.stub.RegisterNode, register)):
            with pytest.raises(grpc.RpcError) as err:
                call(env, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "names no coordinator" in err.value.details()
    assert coord.counts()["contributions"] == 0


def test_a_node_signs_again_what_it_kept_in_the_old_form(coord, identity, tmp_path):
    """Contributions a node signed before payloads named their coordinator, kept unsent, are
    signed again for the coordinator they go to (the old bytes would be refused)."""
    from crowdsft.datafiles import Record
    from crowdsft.node.state import NodeState, Submission
    from crowdsft.node.submit import Metadata, chunk_key, upload

    recs = [Record(1, "an old question", "an old answer")]
    old = sign_envelope(
        identity,
        contribution_pb2.ContributionPayload(
            examples=[contribution_pb2.Example(prompt="an old question", response="an old answer")],
            nonce=new_nonce(),
            timestamp_ms=now_ms(),
        ),
    )
    with coord.client() as client, NodeState(tmp_path / "s.sqlite3") as state:
        key = client.info().public_key
        state.put_pending(
            key,
            Submission(
                chunk_key=chunk_key(recs, Metadata()),
                contribution_id=contribution_id(old.payload),
                payload=old.payload,
                signature=old.signature,
                example_count=1,
                source="f:1",
            ),
        )
        report = upload(client, identity, state, recs)
    assert report.accepted == 1
    (stored,) = coord.contribution_ids()
    assert stored != contribution_id(old.payload)
