"""Concurrency and restarts: nothing acknowledged is ever lost, nothing is stored twice."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from crowdsft.datafiles import Record
from crowdsft.envelope import contribution_id, new_nonce, now_ms, sign_envelope
from crowdsft.keys import Identity
from crowdsft.node.client import Backoff
from crowdsft.node.state import NodeState
from crowdsft.node.submit import upload
from crowdsft.testing.load import ONE_ADDRESS
from crowdsft.v1 import contribution_pb2


def _env(identity, i, coordinator: bytes):
    return sign_envelope(
        identity,
        contribution_pb2.ContributionPayload(
            examples=[
                contribution_pb2.Example(prompt=f"{identity.node_id} q{i}", response=f"a{i}")
            ],
            nonce=new_nonce(),
            timestamp_ms=now_ms(),
        ),
        coordinator,
    )


def test_twenty_concurrent_clients(make_coordinator):
    coord = make_coordinator(**FAST)
    per_client = 60
    identities = [Identity.generate() for _ in range(20)]

    def run(k: int) -> list[bytes]:
        ident = identities[k]
        envs = [_env(ident, i, coordinator=coord.public_key) for i in range(per_client)]
        with coord.client() as c:
            if k % 2:
                results = list(c.submit_stream(envs[: per_client // 2], timeout=60))
                assert all(r.code == 0 for r in results), [r.message for r in results if r.code]
                for env in envs[per_client // 2 :]:
                    c.stub.SubmitContribution(env, timeout=30)
            else:
                results = list(c.submit_stream(envs, timeout=60))
                assert all(r.code == 0 for r in results), [r.message for r in results if r.code]
        return [contribution_id(e.payload) for e in envs]

    with ThreadPoolExecutor(20) as pool:
        sent = [cid for ids in pool.map(run, range(20)) for cid in ids]
    stored = coord.contribution_ids()
    assert len(stored) == len(set(stored)) == 20 * per_client
    assert set(stored) == set(sent)
    assert coord.counts()["nodes"] == 20


FAST = ONE_ADDRESS  # bulk uploads from this machine's one address


def test_restart_mid_stream_loses_no_acknowledged_contribution(make_coordinator, identity):
    coord = make_coordinator(**FAST)
    envs = [_env(identity, i, coordinator=coord.public_key) for i in range(4000)]
    acked: list[bytes] = []
    got_some = threading.Event()
    errors: list[grpc.RpcError] = []

    def stream() -> None:
        try:
            with coord.client() as c:
                for r in c.submit_stream(envs, timeout=60):
                    if r.code == 0:
                        acked.append(r.contribution_id)
                    if len(acked) >= 200:
                        got_some.set()
        except grpc.RpcError as err:
            errors.append(err)
        finally:
            got_some.set()

    t = threading.Thread(target=stream)
    t.start()
    assert got_some.wait(30)
    coord.restart(same_port=True)  # stops with no grace: in-flight calls are cut
    t.join(30)
    assert errors, "the stream should have been cut by the restart"
    assert 200 <= len(acked) < len(envs)
    stored = set(coord.contribution_ids())
    assert set(acked) <= stored
    # Resending everything after the restart completes the set without duplicates.
    with coord.client() as c:
        results = list(c.submit_stream(envs, timeout=60))
    assert {r.code for r in results} <= {0, 6}
    assert all(r.code == 6 for r in results if r.contribution_id in set(acked))
    ids = coord.contribution_ids()
    assert len(ids) == len(set(ids)) == len(envs)


def test_upload_resumes_after_restart_with_the_same_bytes(make_coordinator, identity, tmp_path):
    coord = make_coordinator(**FAST)
    records = [Record(i + 1, f"prompt {i}", f"response {i}") for i in range(1500)]
    cut = threading.Event()
    count = 0

    def progress(n: int) -> None:
        nonlocal count
        count += n
        if count >= 300 and not cut.is_set():
            cut.set()
            threading.Thread(target=coord.restart, kwargs={"same_port": True}).start()

    # The restart takes as long as the machine makes it: give the client time to wait it out.
    patient = Backoff(base=0.05, cap=0.5, attempts=12)
    with NodeState(tmp_path / "state.sqlite3") as state, coord.client(backoff=patient) as c:
        report = upload(c, identity, state, records, progress=progress)
        assert report.ok
        assert report.accepted + report.acknowledged_again == 1500
        ids = coord.contribution_ids()
        assert len(ids) == len(set(ids)) == 1500
        again = upload(c, identity, state, records)
        assert (again.accepted, again.already_submitted) == (0, 1500)
    assert len(coord.contribution_ids()) == 1500


def test_upload_waits_out_the_rate_limit(make_coordinator, identity, tmp_path):
    coord = make_coordinator(rate_limit={"contributions_per_s": 200.0, "burst": 50})
    records = [Record(i + 1, f"prompt {i}", f"response {i}") for i in range(150)]
    with NodeState(tmp_path / "state.sqlite3") as state, coord.client() as c:
        report = upload(c, identity, state, records)
    assert report.ok and report.accepted == 150
    assert len(coord.contribution_ids()) == 150
