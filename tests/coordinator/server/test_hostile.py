"""One client must not freeze the coordinator for honest nodes: each defect found by probing
the server as an attacker would, as a test (on loopback, bounded in count and time)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crowdsft.coordinator.server.app import SERVICE_NAME
from crowdsft.coordinator.store.queries import stats
from crowdsft.envelope import new_nonce, now_ms, sign_contribution, sign_envelope
from crowdsft.keys import Identity
from crowdsft.v1 import contribution_pb2, coordinator_pb2, envelope_pb2


def example(tag: str = "") -> dict[str, str]:
    return {"prompt": f"question {tag} {new_nonce().hex()}", "response": "an answer"}


def status_code(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def health(coord) -> int:
    with grpc.insecure_channel(coord.address) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
            .status
        )


def test_idle_streams_do_not_stop_an_honest_submit(make_coordinator, identity):
    """Before: 64 idle calls took every worker thread, and health checks, info and every
    submit timed out. Now waiting clients hold no thread."""
    # Every stream on one connection, and none refused for a cap: only threads are at stake.
    coord = make_coordinator(
        server={
            "max_streams_per_peer": 1000,
            "max_streams_per_connection": 1000,
            "max_calls_per_peer": 1000,
            "max_watch_streams_per_peer": 1000,
        }
    )
    release = threading.Event()

    def silent():
        release.wait(30)
        return
        yield  # an upload stream that never sends

    attacker = grpc.insecure_channel(coord.address)
    stub = coordinator_pb2_grpc_stub(attacker)
    watches = [stub.WatchRounds(coordinator_pb2.WatchRoundsRequest()) for _ in range(150)]
    uploads = [stub.SubmitContributions(silent()) for _ in range(50)]
    try:
        time.sleep(0.5)  # let them all open
        with coord.client(timeout=5) as c:
            receipt, _ = c.submit_one(
                sign_contribution(identity, [example()], coordinator=coord.public_key)
            )
            assert receipt.receipt
            assert c.info().public_key == coord.public_key
        assert health(coord) == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        for call in watches + uploads:
            call.cancel()
        attacker.close()


def coordinator_pb2_grpc_stub(channel):
    from crowdsft.v1 import coordinator_pb2_grpc

    return coordinator_pb2_grpc.CoordinatorStub(channel)


def test_streams_are_capped_per_peer(make_coordinator):
    coord = make_coordinator(server={"max_streams_per_peer": 2})
    with grpc.insecure_channel(coord.address) as ch:
        stub = coordinator_pb2_grpc_stub(ch)
        open_ = [stub.WatchRounds(coordinator_pb2.WatchRoundsRequest()) for _ in range(2)]
        time.sleep(0.3)
        third = stub.WatchRounds(coordinator_pb2.WatchRoundsRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            next(iter(third))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 watch streams open" in err.value.details()
        for call in open_:
            call.cancel()


def test_an_upload_stream_that_sends_nothing_is_closed(make_coordinator):
    coord = make_coordinator(server={"first_message_s": 0.5})
    release = threading.Event()

    def silent():
        release.wait(30)
        return
        yield

    with grpc.insecure_channel(coord.address) as ch:
        call = coordinator_pb2_grpc_stub(ch).SubmitContributions(silent(), timeout=20)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no first message within 0.5s" in err.value.details()


def test_a_long_run_of_combining_marks_is_refused_before_any_normalisation(
    coord, identity, monkeypatch
):
    """Before: normalising long runs of alternating combining marks was quadratic under the
    interpreter lock (one 200 KB envelope froze every thread for 8 s)."""
    import crowdsft.validation as validation

    def forbidden(text):
        raise AssertionError("normalised a text that should have been refused first")

    monkeypatch.setattr(validation, "normalise", forbidden)
    marks = "\u0301\u0316" * 5000  # 20 KB: under the size limit, far over the run limit
    big = "e" + "\u0301\u0316" * 100_000  # 400 KB: over the size limit too
    with coord.client(timeout=10) as c:
        for text in (marks, big):
            env = sign_contribution(
                identity, [{"prompt": "p", "response": text}], coordinator=coord.public_key
            )
            with pytest.raises(grpc.RpcError) as err:
                c.stub.SubmitContribution(env, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "combining marks" in err.value.details() or "bytes" in err.value.details()
    assert coord.counts()["contributions"] == 0


def test_error_messages_are_capped(coord, identity):
    """Before: an envelope of 520k identical examples produced a 19.6 MB error message."""
    many = contribution_pb2.ContributionPayload(
        examples=[contribution_pb2.Example(prompt="a", response="b")] * 100_000,
        nonce=new_nonce(),
        timestamp_ms=now_ms(),
    )
    empty = contribution_pb2.ContributionPayload(
        examples=[contribution_pb2.Example(prompt=" ", response=" ")] * 64,
        nonce=new_nonce(),
        timestamp_ms=now_ms(),
    )
    with coord.client(timeout=10) as c:
        for payload in (many, empty):
            with pytest.raises(grpc.RpcError) as err:
                c.stub.SubmitContribution(
                    sign_envelope(identity, payload, coord.public_key), timeout=10
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(err.value.details()) <= 1024
    assert "more problem" in err.value.details()


def test_unknown_fields_are_refused(coord, identity):
    """Before: unknown protobuf fields were stored verbatim, outside every limit."""
    payload = (
        contribution_pb2.ContributionPayload(
            examples=[contribution_pb2.Example(**example())],
            nonce=new_nonce(),
            timestamp_ms=now_ms(),
        ).SerializeToString()
        + bytes([0xA0, 0x06])
        + b"\x85\x80\x04"
    )  # field 100, a varint
    env = envelope_pb2.SignedEnvelope(
        payload=payload,
        signature=identity.sign(b"crowdsft.v1.ContributionPayload\n" + payload),
        public_key=identity.public_key,
    )
    with coord.client() as c, pytest.raises(grpc.RpcError) as err:
        c.stub.SubmitContribution(env, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fields this protocol does not define" in err.value.details()


def test_a_node_has_a_byte_quota(make_coordinator, identity):
    """Before: quotas counted contributions, not bytes (4 MB envelopes wrote 1.9 GB in 30 s)."""
    coord = make_coordinator(rate_limit={"bytes_per_s": 100.0, "burst_bytes": 5000})
    text = "x" * 1800
    with coord.client(timeout=5) as c:
        for _ in range(2):
            c.stub.SubmitContribution(
                sign_contribution(
                    identity,
                    [{"prompt": new_nonce().hex(), "response": text}],
                    coordinator=coord.public_key,
                ),
                timeout=5,
            )
        with pytest.raises(grpc.RpcError) as err:
            c.stub.SubmitContribution(
                sign_contribution(
                    identity,
                    [{"prompt": new_nonce().hex(), "response": text}],
                    coordinator=coord.public_key,
                ),
                timeout=5,
            )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "byte quota" in err.value.details()
    assert coord.counts()["contributions"] == 2


def test_registration_and_status_calls_are_rate_limited(make_coordinator, identity):
    """Before: RegisterNode and GetNodeStatus had no limit (24,600 junk nodes in 40 s)."""
    coord = make_coordinator(rate_limit={"node_calls_per_s": 0.01, "node_calls_burst": 5})

    def register():
        env = sign_envelope(
            identity,
            contribution_pb2.RegisterPayload(nonce=new_nonce(), timestamp_ms=now_ms()),
            coord.public_key,
        )
        return status_code(coord_stub(coord).RegisterNode, env, timeout=5)

    codes = [register() for _ in range(7)]
    assert codes[:5] == [grpc.StatusCode.OK] * 5
    assert codes[5:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


def coord_stub(coord):
    return coordinator_pb2_grpc_stub(grpc.insecure_channel(coord.address))


def test_a_peer_sending_bad_signatures_is_slowed_down(make_coordinator, identity):
    coord = make_coordinator(
        rate_limit={"peer_bad_signature_burst": 10, "peer_bad_signatures_per_s": 0.01}
    )
    stub = coord_stub(coord)
    forged = sign_contribution(identity, [example()], coordinator=coord.public_key)
    forged.signature = bytes(64)
    codes = [status_code(stub.SubmitContribution, forged, timeout=5) for _ in range(12)]
    assert codes[:10] == [grpc.StatusCode.UNAUTHENTICATED] * 10
    assert set(codes[10:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    # Refused unverified now, honest envelopes from the same address included, until the
    # allowance refills (another address is not affected: bench/hostile.py shows it).
    good = sign_contribution(identity, [example()], coordinator=coord.public_key)
    assert (
        status_code(stub.SubmitContribution, good, timeout=5) == grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_nonces_are_pruned_while_serving(make_coordinator, identity):
    """Before: nonces were pruned only when the coordinator started."""
    coord = make_coordinator(protocol={"timestamp_window_s": 1})
    with coord.client(timeout=5) as c:
        c.submit_one(sign_contribution(identity, [example()], coordinator=coord.public_key))
    assert coord.counts()["nonces"] == 1
    deadline = time.monotonic() + 15
    while coord.counts()["nonces"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert coord.counts()["nonces"] == 0
    assert coord.counts()["contributions"] == 1


def test_a_full_disk_answers_resource_exhausted_and_health_says_not_serving(coord, identity):
    """Before: a full disk returned INTERNAL (not retried by nodes), health stayed SERVING,
    and the accepted counter counted what was never stored."""
    store = coord.coordinator.store
    pages = store.query("PRAGMA page_count")[0][0]
    store.write(lambda conn: conn.execute(f"PRAGMA max_page_count={pages}"))
    stub = coord_stub(coord)
    filler = "x" * 30_000  # more than the free pages can hold
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitContribution(
            sign_contribution(
                identity, [{"prompt": "p", "response": filler}], coordinator=coord.public_key
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "disk is full" in err.value.details()
    assert "crowdsft-retry-after-ms" in dict(err.value.trailing_metadata())
    assert health(coord) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert coord.coordinator.service.counters.accepted == 0

    store.write(lambda conn: conn.execute("PRAGMA max_page_count=1073741823"))
    stub.SubmitContribution(
        sign_contribution(
            identity, [{"prompt": "p", "response": filler}], coordinator=coord.public_key
        ),
        timeout=10,
    )
    assert health(coord) == health_pb2.HealthCheckResponse.SERVING
    assert coord.coordinator.service.counters.accepted == 1


def test_display_names_with_control_characters_are_refused_and_old_ones_escaped(coord, identity):
    """Before: names with newlines or escape codes forged log lines and broke the stats table."""
    stub = coord_stub(coord)
    env = sign_envelope(
        identity,
        contribution_pb2.RegisterPayload(
            nonce=new_nonce(), timestamp_ms=now_ms(), display_name="eve\n12:00 INFO fake"
        ),
        coord.public_key,
    )
    assert status_code(stub.RegisterNode, env, timeout=5) == grpc.StatusCode.INVALID_ARGUMENT
    # A name stored before this rule is shown escaped by `coordinator stats`.
    other = Identity.generate()
    coord.coordinator.store.write(
        lambda conn: conn.execute(
            "INSERT INTO nodes(node_id, public_key, display_name, registered_at_ms) "
            "VALUES (?, ?, ?, 0)",
            (other.node_id, other.public_key, "mallory\x1b[31m\nred"),
        )
    )
    from click.testing import CliRunner

    from crowdsft.cli import main

    out = CliRunner().invoke(main, ["coordinator", "stats", "--config", str(coord.config.path)])
    assert out.exit_code == 0, out.output
    assert "\x1b" not in out.output and "mallory\\x1b[31m" in out.output
    assert stats(coord.coordinator.store.reader())["nodes"] == 1


@pytest.mark.parametrize(
    ("listen", "policy", "warned"),
    [
        ("127.0.0.1:50051", "open", False),
        ("[::1]:50051", "open", False),
        ("localhost:50051", "open", False),
        ("0.0.0.0:50051", "open", True),
        ("[::]:50051", "open", True),
        ("coordinator.example.org:50051", "open", True),
        ("0.0.0.0:50051", "invite", False),
        ("0.0.0.0:50051", "allowlist", False),
    ],
)
def test_open_admission_on_a_public_address_is_warned_about(listen, policy, warned):
    import dataclasses

    from crowdsft.config import AdmissionConfig, CoordinatorConfig, ServerConfig
    from crowdsft.coordinator.cli import open_admission_warning

    config = dataclasses.replace(
        CoordinatorConfig(),
        server=ServerConfig(listen=listen),
        admission=AdmissionConfig(policy=policy),
    )
    warning = open_admission_warning(config)
    assert bool(warning) == warned
    if warned:
        assert "Sybil" in warning and "invite" in warning and "allowlist" in warning


def test_connections_are_bounded_in_calls_and_lifetime():
    import dataclasses

    from crowdsft.config import CoordinatorConfig, ServerConfig
    from crowdsft.coordinator.server.app import server_options

    config = dataclasses.replace(
        CoordinatorConfig(),
        server=ServerConfig(
            max_streams_per_connection=7, max_connection_idle_s=5, max_connection_age_s=9
        ),
    )
    options = dict(server_options(config))
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.max_connection_idle_ms"] == 5000
    assert options["grpc.max_connection_age_ms"] == 9000
    assert options["grpc.keepalive_time_ms"] > 0


def test_a_caller_that_gives_up_cannot_break_the_store_writer(coord, identity):
    """A unary submit whose client gives up cancels its asyncio wrapper; the store's future
    must not be cancelled with it (the writer would die setting its result)."""
    store = coord.coordinator.store
    fut = store.submit(lambda conn: 1)
    assert not fut.cancel() and fut.result(5) == 1

    def boom(ok, value):
        raise RuntimeError("a callback that fails")

    store.submit_with(lambda conn: None, boom)
    stub = coord_stub(coord)
    for _ in range(5):  # deadlines far too short to be met
        status_code(
            stub.SubmitContribution,
            sign_contribution(identity, [example()], coordinator=coord.public_key),
            timeout=1e-4,
        )
    with coord.client(timeout=10) as c:
        receipt, _ = c.submit_one(
            sign_contribution(identity, [example()], coordinator=coord.public_key)
        )
    assert receipt.receipt


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.1:5000", "10.0.0.1"),
        ("ipv6:[::ffff:10.0.0.1]:5000", "10.0.0.1"),
        ("ipv6:%5B2001:db8::7%5D:5000", "2001:db8::/64"),
        ("ipv6:[2001:db8::8]:6000", "2001:db8::/64"),
        ("unix:/tmp/socket", "unix"),
        ("unix-abstract:name", "unix"),
    ],
)
def test_peers_count_by_address_and_ipv6_by_its_64(peer, host):
    from crowdsft.coordinator.server.ratelimit import peer_host

    assert peer_host(peer) == host


def test_stream_caps_leave_room_for_other_calls():
    from crowdsft.config import ServerConfig
    from crowdsft.errors import ConfigError

    with pytest.raises(ConfigError, match="must exceed the stream caps"):
        ServerConfig(max_concurrent_streams=1000)


# -- a flood's cost on others: tarpit, lanes, the heavy lane -------------------------------------


def test_a_refused_call_is_answered_after_the_refusal_delay(make_coordinator, identity):
    """A client ignoring the retry hint cannot make the server refuse it nonstop: each
    refusal for a rate limit is answered after ``server.refusal_delay_s`` (jittered up to 2x)."""
    delayed = make_coordinator(
        server={"refusal_delay_s": 0.3}, rate_limit={"peer_burst": 1, "peer_requests_per_s": 0.01}
    )
    at_once = make_coordinator(
        server={"refusal_delay_s": 0.0}, rate_limit={"peer_burst": 1, "peer_requests_per_s": 0.01}
    )
    took = {}
    for name, coord in (("delayed", delayed), ("at once", at_once)):
        stub = coord_stub(coord)
        first = status_code(stub.GetCoordinatorInfo, coordinator_pb2.GetCoordinatorInfoRequest())
        assert first == grpc.StatusCode.OK
        t = time.monotonic()
        code = status_code(stub.GetCoordinatorInfo, coordinator_pb2.GetCoordinatorInfoRequest())
        took[name] = time.monotonic() - t
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 0.3 <= took["delayed"] < 5
    assert took["at once"] < 0.3


def test_the_tarpit_holds_a_bounded_number_of_calls_per_peer():
    import asyncio

    from crowdsft.coordinator.server.servicer import Tarpit

    async def main():
        pit = Tarpit(delay_s=0.2, per_peer=3, total=5)
        held = [asyncio.ensure_future(pit.hold("ipv4:10.0.0.1:1000")) for _ in range(5)]
        others = [asyncio.ensure_future(pit.hold(f"ipv4:10.0.0.{i}:1000")) for i in (2, 3, 4)]
        await asyncio.sleep(0.05)
        waiting = sum(not h.done() for h in held)
        others_waiting = sum(not h.done() for h in others)
        total = len(pit)
        await asyncio.gather(*held, *others)
        return waiting, others_waiting, total, len(pit)

    waiting, others_waiting, total, after = asyncio.run(main())
    assert waiting == 3  # the two over the per-address cap were answered at once
    assert others_waiting == 2  # the third other address met the total cap
    assert total == 5
    assert after == 0


def test_one_peer_holds_at_most_its_turns_of_the_worker_pool():
    import asyncio

    from crowdsft.coordinator.server.servicer import PeerLanes

    async def main():
        lanes = PeerLanes(per_peer=2)
        inside = {"a": 0, "b": 0}
        most = {"a": 0, "b": 0}
        order = []

        async def job(host: str, i: int) -> None:
            async with lanes.turn(f"ipv4:{host}:1"):
                inside[host] += 1
                most[host] = max(most[host], inside[host])
                order.append((host, i))
                await asyncio.sleep(0.02)
                inside[host] -= 1

        flood = [asyncio.ensure_future(job("a", i)) for i in range(10)]
        await asyncio.sleep(0.001)
        honest = asyncio.ensure_future(job("b", 0))
        await asyncio.gather(*flood, honest)
        return most, order.index(("b", 0)), len(lanes)

    most, honest_position, left = asyncio.run(main())
    assert most == {"a": 2, "b": 1}
    assert honest_position <= 2  # served beside the flood's first turns, not after all ten
    assert left == 0


def test_the_node_budget_can_be_looked_at_without_spending_it():
    from crowdsft.config import RateLimitConfig
    from crowdsft.coordinator.server.ratelimit import RateLimiter
    from crowdsft.errors import RateLimitedError

    limiter = RateLimiter(RateLimitConfig(burst=2, contributions_per_s=0.001))
    for _ in range(5):
        limiter.check("n1", 10)
    limiter.take("n1", 10)
    limiter.take("n1", 10)
    with pytest.raises(RateLimitedError):
        limiter.check("n1", 10)


def _envelopes(identity, coordinator: bytes = bytes(32)):
    # the lane checks no coordinator (the serving process does): any key for lane-only tests
    """One of each: valid, bad signature, too many examples, unknown field, combining marks."""
    valid = sign_contribution(
        identity, [example("heavy valid"), example("another")], coordinator=coordinator
    )
    forged = sign_contribution(identity, [example("forged")], coordinator=coordinator)
    forged.signature = bytes(64)
    many = sign_envelope(
        identity,
        contribution_pb2.ContributionPayload(
            examples=[contribution_pb2.Example(prompt="a", response="b")] * 5000,
            nonce=new_nonce(),
            timestamp_ms=now_ms(),
        ),
        coordinator,
    )
    unknown_payload = (
        contribution_pb2.ContributionPayload(
            examples=[contribution_pb2.Example(prompt="q unknown", response="r")],
            nonce=new_nonce(),
            timestamp_ms=now_ms(),
        ).SerializeToString()
        + b"\xa2\x06\x03abc"
    )
    unknown = envelope_pb2.SignedEnvelope(
        payload=unknown_payload,
        signature=identity.sign(b"crowdsft.v1.ContributionPayload\n" + unknown_payload),
        public_key=identity.public_key,
    )
    marks = sign_contribution(
        identity, [{"prompt": "p", "response": "e" + "\u0301" * 40}], coordinator=coordinator
    )
    return {"valid": valid, "forged": forged, "many": many, "unknown": unknown, "marks": marks}


def test_the_heavy_lane_finds_what_the_in_process_checks_find(identity):
    from crowdsft.config import CoordinatorConfig
    from crowdsft.coordinator.server.heavy import inspect
    from crowdsft.validation import check_payload

    limits = CoordinatorConfig().protocol.limits()
    found = {k: inspect(e.SerializeToString(), limits) for k, e in _envelopes(identity).items()}
    assert found["valid"].problem == ""
    payload = contribution_pb2.ContributionPayload.FromString(_envelopes(identity)["valid"].payload)
    assert len(found["valid"].fingerprints) == len(check_payload(payload, limits).fingerprints)
    assert found["forged"].problem == "signature"
    assert found["many"].problem == "payload" and "more than" in found["many"].message
    assert found["unknown"].problem == "payload"
    assert "fields this protocol does not define" in found["unknown"].message
    assert found["marks"].problem == "payload" and "combining" in found["marks"].message


def test_large_contributions_are_answered_alike_through_the_heavy_lane(make_coordinator, identity):
    """Every contribution through the lane is answered as on the in-process path: the
    same codes, a receipt for the valid one, the bad signature charged to the peer."""
    codes = {}
    for lane in (1, 0):
        coord = make_coordinator(
            server={"heavy_envelope_bytes": 65536 * lane},
            rate_limit={"peer_bad_signatures_per_s": 1e-3},
        )
        assert (coord.coordinator.heavy is not None) == bool(lane)
        coord.coordinator.service.ingest.heavy_bytes = lane  # every contribution, in the test
        stub = coord_stub(coord)
        codes[lane] = {
            k: status_code(stub.SubmitContribution, e, timeout=30)
            for k, e in _envelopes(identity, coordinator=coord.public_key).items()
        }
        assert coord.counts()["contributions"] == 1
        bad = coord.coordinator.service.ingest.peers.bad
        assert bad.wait("127.0.0.1", bad.burst) > 0  # the forged envelope was charged
        assert bad.wait("127.0.0.1", bad.burst - 1) == 0  # once
    assert codes[1] == codes[0]
    assert codes[1]["valid"] == grpc.StatusCode.OK
    assert codes[1]["forged"] == grpc.StatusCode.UNAUTHENTICATED
    assert {codes[1][k] for k in ("many", "unknown", "marks")} == {grpc.StatusCode.INVALID_ARGUMENT}


def test_the_heavy_lane_refuses_rather_than_queues_past_its_bound(identity):
    from crowdsft.config import CoordinatorConfig
    from crowdsft.coordinator.server.heavy import HeavyLane
    from crowdsft.errors import UnavailableError

    lane = HeavyLane(max_waiting=1)
    try:
        assert lane._slots.acquire(blocking=False)  # one call is waiting for the worker
        with pytest.raises(UnavailableError, match="large contributions"):
            lane.inspect(_envelopes(identity)["valid"], CoordinatorConfig().protocol.limits())
        lane._slots.release()
        found = lane.inspect(_envelopes(identity)["valid"], CoordinatorConfig().protocol.limits())
        assert found.problem == ""
    finally:
        lane.close()


def test_a_forged_large_envelope_cannot_probe_another_nodes_budget(make_coordinator, identity):
    """The heavy lane looks at the claimed key's budget before verifying; a refusal found
    so is given only to the key's owner: a forgery is UNAUTHENTICATED and charged."""
    coord = make_coordinator(rate_limit={"burst": 1, "contributions_per_s": 1e-3})
    coord.coordinator.service.ingest.heavy_bytes = 1
    stub = coord_stub(coord)
    ok = status_code(
        stub.SubmitContribution,
        _envelopes(identity, coordinator=coord.public_key)["valid"],
        timeout=30,
    )
    assert ok == grpc.StatusCode.OK  # the node's one contribution: its budget is spent
    forged = sign_contribution(identity, [example("forged")], coordinator=coord.public_key)
    forged.signature = bytes(64)
    assert status_code(stub.SubmitContribution, forged, timeout=30) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    again = sign_contribution(identity, [example("again")], coordinator=coord.public_key)
    assert status_code(stub.SubmitContribution, again, timeout=30) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )


@pytest.mark.parametrize(
    "server, message",
    [
        ({"refusal_delay_s": float("nan")}, "refusal_delay_s"),
        ({"refusal_delay_s": 60}, "refusal_delay_s"),
        ({"heavy_envelope_bytes": 100}, "heavy_envelope_bytes"),
        ({"max_held_refusals": 2000}, "max_held_refusals"),
    ],
)
def test_hostile_client_settings_are_checked(server, message):
    import pydantic

    from crowdsft.config import ServerConfig
    from crowdsft.errors import ConfigError

    # NaN is refused by the type (a finite number) before the range check sees it
    with pytest.raises((ConfigError, pydantic.ValidationError), match=message):
        ServerConfig(**server)


# -- per-address limits at the transport (coordinator.server.transport) ----------------------

SMALL_SERVER = {
    "listen": "[::]:0",
    "max_concurrent_streams": 160,
    "max_upload_streams": 16,
    "max_watch_streams": 16,
    "max_ledger_streams": 16,
    "max_held_refusals": 16,
    "max_calls_per_peer": 24,
}


def _silent(release: threading.Event):
    def gen():
        release.wait(30)
        return
        yield

    return gen()


def _never_sent_unary(channel):
    """SubmitContribution opened as a stream that never sends its one message."""
    return channel.stream_unary(
        "/crowdsft.v1.Coordinator/SubmitContribution",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=coordinator_pb2.SubmitContributionResponse.FromString,
    )


def test_one_address_cannot_fill_the_server_wide_call_limit(make_coordinator, identity):
    """Before: 300 connections x 8 calls from one address (unary calls that never send their
    message, health watches) filled the server-wide limit, and honest submits from another
    address were refused. Now every call counts against its address from the moment it
    opens, and the address's calls past max_calls_per_peer are refused at once."""
    coord = make_coordinator(server=SMALL_SERVER)
    port = coord.coordinator.port
    release = threading.Event()
    # a connection each (channels to one target would share one otherwise)
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(25)
    ]
    calls = []
    try:
        for k, ch in enumerate(channels):  # 25 connections x 8 calls: 200 > 160 in all
            for j in range(8):
                if (k + j) % 2:
                    calls.append(_never_sent_unary(ch).future(_silent(release), timeout=30))
                else:
                    watch = health_pb2_grpc.HealthStub(ch).Watch(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30
                    )
                    calls.append(watch)
        peer_calls = coord.coordinator.peer_calls
        deadline = time.monotonic() + 20
        while peer_calls.open_calls() + sum(c.done() for c in calls) < len(calls):
            assert time.monotonic() < deadline, (peer_calls.open_calls(), peer_calls.refused)
            time.sleep(0.05)
        assert peer_calls.open_calls() == 24  # the rest refused at once, holding no slot
        assert peer_calls.refused == len(calls) - 24
        honest = grpc.insecure_channel(f"[::1]:{port}")
        try:
            for i in range(10):
                env = sign_contribution(identity, [example(str(i))], coordinator=coord.public_key)
                assert (
                    status_code(
                        coordinator_pb2_grpc_stub(honest).SubmitContribution, env, timeout=5
                    )
                    == grpc.StatusCode.OK
                )
            check = health_pb2_grpc.HealthStub(honest).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
            )
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            honest.close()
    finally:
        release.set()
        for call in calls:
            call.cancel()
        for ch in channels:
            ch.close()


def test_a_unary_call_that_never_sends_its_request_is_ended(make_coordinator):
    coord = make_coordinator(server={"request_s": 0.5})
    release = threading.Event()
    with grpc.insecure_channel(coord.address) as ch:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            _never_sent_unary(ch)(_silent(release), timeout=20)
        release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no request arrived within 0.5s" in err.value.details()
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5  # its count is given back (just after the answer)
    while coord.coordinator.peer_calls.open_calls() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert coord.coordinator.peer_calls.open_calls() == 0


def test_reflection_requests_are_paced_per_address(make_coordinator):
    """Before: reflection answered without limit (378,834 answers in 25 s from one client).
    Now a client past reflection_per_s (and its burst) waits for its answers."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    coord = make_coordinator(server={"reflection_per_s": 4.0})  # a burst of 20
    with grpc.insecure_channel(coord.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        asks = [reflection_pb2.ServerReflectionRequest(list_services="") for _ in range(30)]
        started = time.monotonic()
        answers = list(stub.ServerReflectionInfo(iter(asks), timeout=30))
        took = time.monotonic() - started
    assert len(answers) == 30  # all answered ...
    assert took >= 2.0  # ... the 10 past the burst at 4 per second (a lower bound: sleeps)
    assert SERVICE_NAME in {s.name for s in answers[0].list_services_response.service}


def test_calls_of_other_services_still_work_through_the_interceptor(coord, identity):
    """Health checks, health watches and reflection, served through the per-address
    wrapper: their answers unchanged."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert health(coord) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(coord.address) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
        )
        assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reply = next(
            reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        assert SERVICE_NAME in {s.name for s in reply.list_services_response.service}
    with coord.client() as c:
        receipt, _ = c.submit_one(
            sign_contribution(identity, [example()], coordinator=coord.public_key)
        )
        assert receipt.receipt
    deadline = time.monotonic() + 5
    while coord.coordinator.peer_calls.open_calls() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert coord.coordinator.peer_calls.open_calls() == 0


def test_a_few_addresses_cannot_take_every_watch_stream(make_coordinator):
    """Before: 512 watch streams server-wide filled from 16 addresses (32 each). A node needs
    one watch stream; an address may hold max_watch_streams_per_peer."""
    coord = make_coordinator(server={"max_watch_streams_per_peer": 3})
    with grpc.insecure_channel(coord.address) as ch:
        stub = coordinator_pb2_grpc_stub(ch)
        open_ = [stub.WatchRounds(coordinator_pb2.WatchRoundsRequest()) for _ in range(3)]
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as err:
            next(iter(stub.WatchRounds(coordinator_pb2.WatchRoundsRequest(), timeout=5)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 watch streams open" in err.value.details()
        for call in open_:
            call.cancel()


def test_malformed_envelopes_answer_invalid_argument_without_a_traceback(coord, caplog):
    """Before: a 1-byte malformed envelope answered UNKNOWN and logged an ERROR traceback per
    call, without limit. Now INVALID_ARGUMENT, and nothing at ERROR."""
    import logging

    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(coord.address) as ch:
        unary = ch.unary_unary("/crowdsft.v1.Coordinator/SubmitContribution")
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                unary(b"\xff", timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid message" in err.value.details()
        stream = ch.stream_stream("/crowdsft.v1.Coordinator/SubmitContributions")
        with pytest.raises(grpc.RpcError) as err:
            list(stream(iter([b"\xff"]), timeout=5))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid SignedEnvelope" in err.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert coord.coordinator.peer_calls.malformed == 3
