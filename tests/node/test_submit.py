"""Uploading a file's records: signing once, resuming, re-signing only what was never
accepted, and checking against the coordinator's limits before anything is sent."""

from __future__ import annotations

import pytest

from crowdsft.datafiles import Record
from crowdsft.envelope import now_ms
from crowdsft.errors import InputError
from crowdsft.node import submit as submit_module
from crowdsft.node.state import NodeState
from crowdsft.node.submit import Metadata, check_against, chunk_key, upload
from crowdsft.validation import Limits


def records(n: int, tag: str = "q") -> list[Record]:
    return [Record(i + 1, f"{tag} {i}", f"answer {i}", None) for i in range(n)]


def test_a_chunk_key_depends_on_the_examples_and_the_metadata_only():
    a, b = records(2), records(2)
    assert chunk_key(a, Metadata()) == chunk_key(b, Metadata())
    assert chunk_key(a, Metadata()) != chunk_key(records(2, "other"), Metadata())
    assert chunk_key(a, Metadata()) != chunk_key(a, Metadata(license="CC-BY-4.0"))


def test_records_over_the_coordinators_limits_stop_the_upload_before_sending():
    big = [Record(3, "p", "x" * 50, None), Record(7, "q", "fine", None)]
    with pytest.raises(InputError, match=r"data.jsonl.*nothing was sent"):
        check_against(big, Limits(max_field_bytes=10), "data.jsonl")


def test_upload_groups_examples_and_a_second_run_sends_nothing(coord, identity):
    recs = records(5)
    with coord.client() as client, NodeState.for_node(identity.node_id) as state:
        first = upload(client, identity, state, recs, examples_per_contribution=2)
        again = upload(client, identity, state, recs, examples_per_contribution=2)
    assert (first.contributions, first.examples, first.accepted) == (3, 5, 3)
    assert again.already_submitted == 3 and again.accepted == 0
    assert coord.counts()["contributions"] == 3


def test_an_interrupted_upload_resends_the_same_signed_bytes(coord, identity):
    recs = records(3)
    with coord.client() as client, NodeState.for_node(identity.node_id) as state:
        # Sign and keep everything, as upload does before it sends, then "crash".
        coord_key = client.info().public_key
        signed = [
            submit_module._sign(
                identity, [r], Metadata(), chunk_key([r], Metadata()), "f", coord_key
            )
            for r in recs
        ]
        state.put_pending_many(coord_key, signed)
        report = upload(client, identity, state, recs)
    assert report.accepted == 3
    assert sorted(coord.contribution_ids()) == sorted(s.contribution_id for s in signed)


def test_a_stale_signature_is_signed_again_and_accepted(coord, identity, monkeypatch):
    """A contribution signed long ago (outside the coordinator's time window) was never
    accepted, so signing it afresh is safe; the coordinator stores the new bytes."""
    recs = records(1)
    long_ago = now_ms() - 3_600_000
    with coord.client() as client, NodeState.for_node(identity.node_id) as state:
        coord_key = client.info().public_key
        monkeypatch.setattr("crowdsft.envelope.now_ms", lambda: long_ago)
        stale = submit_module._sign(
            identity, recs, Metadata(), chunk_key(recs, Metadata()), "f", coord_key
        )
        monkeypatch.undo()
        state.put_pending(coord_key, stale)
        report = upload(client, identity, state, recs)
        held = state.receipts(coord_key)
    assert report.accepted == 1 and not report.failures
    assert len(held) == 1 and held[0].contribution_id != stale.contribution_id


def test_a_permanent_rejection_is_reported_per_source(coord, identity):
    recs = records(2)
    with coord.client() as client, NodeState.for_node(identity.node_id) as state:
        upload(client, identity, state, recs[:1], source_name="a.jsonl")
        # The same example again under another license: a new contribution that copies a
        # stored example, refused without a receipt.
        copy = [Record(9, recs[0].prompt, recs[0].response, None)]
        report = upload(
            client,
            identity,
            state,
            copy + recs[1:],
            source_name="b.jsonl",
            metadata=Metadata(license="CC0-1.0"),
        )
    assert report.accepted == 1
    assert [(f.source, f.status) for f in report.failures] == [("b.jsonl:9", "ALREADY_EXISTS")]
