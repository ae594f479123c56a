"""The node's local state: pinned coordinator keys and signed submissions with receipts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from crowdsft.node.state import KeyMismatchError, NodeState, Submission

KEY_A, KEY_B = b"a" * 32, b"b" * 32


def sub(chunk: bytes, cid: bytes = b"c" * 32) -> Submission:
    return Submission(chunk, cid, b"payload", b"sig", 1, "file.jsonl:1")


def test_a_coordinator_key_is_pinned_on_first_contact(tmp_path):
    with NodeState(tmp_path / "s.sqlite3") as state:
        assert state.pin_coordinator("host:1", KEY_A, 1) is True
        assert state.pin_coordinator("host:1", KEY_A, 2) is False
        with pytest.raises(KeyMismatchError, match="--trust-new-coordinator-key"):
            state.pin_coordinator("host:1", KEY_B, 3)
        state.pin("host:1", KEY_B, 4, trust_new=True)  # the operator really changed keys
        assert state.pin_coordinator("host:1", KEY_B, 5) is False
        assert state.pin_coordinator("other:2", KEY_A, 6) is True  # pins are per address


def test_pending_submissions_survive_a_restart_and_receipts_are_per_coordinator(tmp_path):
    path = tmp_path / "s.sqlite3"
    with NodeState(path) as state:
        state.put_pending_many(KEY_A, [sub(b"k1"), sub(b"k2", b"d" * 32)])
    with NodeState(path) as state:
        pending = state.get(KEY_A, b"k1")
        assert pending is not None and pending.receipt is None and pending.payload == b"payload"
        assert state.get(KEY_B, b"k1") is None
        assert state.receipts(KEY_A) == []
        state.record_receipt(KEY_A, b"k2", b"receipt", b"rsig", 20)
        state.record_receipt(KEY_A, b"k1", b"receipt1", b"rsig1", 10)
        got = state.receipts(KEY_A)
        assert [s.chunk_key for s in got] == [b"k1", b"k2"]  # in order of acceptance
        assert got[0].receipt == b"receipt1" and got[0].accepted_at_ms == 10
        assert state.receipts(KEY_B) == []


def test_a_failed_transaction_writes_nothing(tmp_path):
    with NodeState(tmp_path / "s.sqlite3") as state:
        with pytest.raises(RuntimeError), state.transaction():
            state.put_pending(KEY_A, sub(b"k1"))
            raise RuntimeError("crash in the middle")
        assert state.get(KEY_A, b"k1") is None


def test_state_lives_under_the_node_id(tmp_path):
    state = NodeState.for_node("ab" * 16, home=tmp_path)
    try:
        assert state.path == tmp_path / "nodes" / ("ab" * 16) / "state.sqlite3"
        assert state.path.exists()
    finally:
        state.close()


def test_the_default_home_follows_the_platform(monkeypatch, tmp_path):
    import platformdirs

    from crowdsft.node.state import default_home, default_key_path

    monkeypatch.setenv("CROWDSFT_HOME", str(tmp_path / "mine"))
    assert default_home() == tmp_path / "mine"
    monkeypatch.delenv("CROWDSFT_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    expected = Path(platformdirs.user_data_dir("crowdsft", appauthor=False))
    assert default_home() == expected and default_key_path() == expected / "node.key"
    if sys.platform.startswith("linux"):
        assert expected == tmp_path / "xdg" / "crowdsft"
