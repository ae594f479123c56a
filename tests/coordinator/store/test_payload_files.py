"""Large payloads kept beside the database: stored durably, read back checked, never leaked."""

from __future__ import annotations

import sqlite3

import grpc
import pytest

from crowdsft.coordinator.store import queries
from crowdsft.coordinator.store.db import SCHEMA_VERSION, Store, StoreError, connect
from crowdsft.envelope import contribution_id, sign_contribution
from crowdsft.keys import Identity


def _big(identity: Identity, tag: str = "a", *, coordinator: bytes):
    """A contribution of about 120 KB (over SIDE_PAYLOAD_BYTES, under the heavy lane)."""
    return sign_contribution(
        identity,
        [{"prompt": f"{tag}{i} " + "x" * 30_000, "response": "y"} for i in range(4)],
        coordinator=coordinator,
    )


def _rows(coord) -> list[tuple[bytes, int, str | None]]:
    conn = connect(coord.config.db_path, readonly=True)
    try:
        return [
            (bytes(r[0]), len(r[1]), r[2])
            for r in conn.execute("SELECT id, payload, payload_file FROM contributions")
        ]
    finally:
        conn.close()


def _files(coord) -> list[str]:
    folder = coord.config.db_path.with_name(coord.config.db_path.name + ".payloads")
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_large_payload_lives_in_a_file_and_reads_back(coord, identity):
    big, small = (
        _big(identity, coordinator=coord.public_key),
        sign_contribution(
            identity, [{"prompt": "p", "response": "r"}], coordinator=coord.public_key
        ),
    )
    with coord.client() as c:
        c.stub.SubmitContribution(big, timeout=10)
        c.stub.SubmitContribution(small, timeout=10)
    rows = {cid: (n, f) for cid, n, f in _rows(coord)}
    big_id, small_id = contribution_id(big.payload), contribution_id(small.payload)
    assert rows[big_id][0] == 0 and rows[big_id][1] in _files(coord)
    assert rows[small_id][0] == len(small.payload) and rows[small_id][1] is None
    store = coord.coordinator.store
    back = {c.id: c.payload for c in queries.all_contributions(store)}
    assert back == {big_id: big.payload, small_id: small.payload}


def test_rejected_large_payload_leaves_no_file(coord, identity, monkeypatch):
    store = coord.coordinator.store
    written = []
    put = store.put_payload
    monkeypatch.setattr(store, "put_payload", lambda *a: written.append(put(*a)) or written[-1])
    with coord.client() as c:
        c.stub.SubmitContribution(_big(identity, coordinator=coord.public_key), timeout=10)
        # the same examples under a new nonce: another contribution, its file written, then
        # refused by the copy check in the writer
        with pytest.raises(grpc.RpcError) as err:
            c.stub.SubmitContribution(_big(identity, coordinator=coord.public_key), timeout=10)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(written) == 2 and _files(coord) == [written[0]]  # only the committed one's


def test_a_resent_stored_contribution_writes_no_file(coord, identity, monkeypatch):
    big = _big(identity, coordinator=coord.public_key)
    store = coord.coordinator.store
    with coord.client() as c:
        first = c.stub.SubmitContribution(big, timeout=10)
        monkeypatch.setattr(store, "put_payload", lambda *a: pytest.fail("file written again"))
        with pytest.raises(grpc.RpcError) as err:
            c.stub.SubmitContribution(big, timeout=10)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.receipt  # the original's receipt stands
    assert len(_files(coord)) == 1


def test_orphan_files_removed_at_start_and_tampering_detected(coord, identity):
    big = _big(identity, coordinator=coord.public_key)
    with coord.client() as c:
        c.stub.SubmitContribution(big, timeout=10)
    folder = coord.config.db_path.with_name(coord.config.db_path.name + ".payloads")
    (folder / "deadbeef-000000000000").write_bytes(b"a crash before its row committed")
    (folder / ".deadbeef-1.tmp").write_bytes(b"half written")
    coord.restart()
    [kept] = _files(coord)
    (folder / kept).write_bytes(big.payload[:-1] + b"!")
    with pytest.raises(StoreError, match="does not match"):
        queries.all_contributions(coord.coordinator.store)


@pytest.mark.parametrize("old_version", [1, 2])
def test_an_older_store_is_upgraded(tmp_path, old_version):
    path = tmp_path / "old.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)  # make it look like the old version: without its columns
    conn.execute("ALTER TABLE rounds DROP COLUMN consolidated")
    if old_version == 1:
        conn.execute("ALTER TABLE contributions DROP COLUMN payload_file")
    conn.execute(f"UPDATE meta SET value='{old_version}' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with Store(path) as store:
        cols = [r[1] for r in store.query("PRAGMA table_info(contributions)")]
        round_cols = [r[1] for r in store.query("PRAGMA table_info(rounds)")]
        version = store.query("SELECT value FROM meta WHERE key='schema_version'")[0][0]
    assert "payload_file" in cols and "consolidated" in round_cols
    assert int(version) == SCHEMA_VERSION


def test_a_second_store_on_the_same_database_does_not_sweep(coord, identity):
    """A CLI command opening the store beside a running coordinator must not remove the
    files of contributions whose rows are still on their way to the writer."""
    folder = coord.config.db_path.with_name(coord.config.db_path.name + ".payloads")
    folder.mkdir(exist_ok=True)
    in_flight = folder / "cafe-000000000000"
    in_flight.write_bytes(b"written, its row not yet committed")
    Store(coord.config.db_path).close()  # the coordinator holds the lock: no sweep
    assert in_flight.is_file()


def test_an_inline_payload_edited_in_the_database_is_caught_on_read(coord, identity):
    """Before: a payload kept in the database itself was not checked against its id on read,
    so an edit there was trained on (only payload files were checked)."""
    small = sign_contribution(
        identity, [{"prompt": "p", "response": "r"}], coordinator=coord.public_key
    )
    with coord.client() as c:
        c.stub.SubmitContribution(small, timeout=10)
    cid = contribution_id(small.payload)
    edited = small.payload.replace(b"r", b"R")
    conn = sqlite3.connect(coord.config.db_path)
    with conn:
        conn.execute("UPDATE contributions SET payload=? WHERE id=?", (edited, cid))
    conn.close()
    with pytest.raises(StoreError, match="changed in the database"):
        queries.all_contributions(coord.coordinator.store)
