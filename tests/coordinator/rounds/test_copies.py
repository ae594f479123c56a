"""Copy and spam resistance: exact duplicates are rejected at the door, near-duplicates are
flagged when a round is planned, and a copier gains nothing in points."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

from crowdsft.cli import main
from crowdsft.coordinator.rounds.runner import RoundRunner
from crowdsft.envelope import new_nonce, now_ms, sign_envelope
from crowdsft.keys import Identity
from crowdsft.ledger import verify_ledger
from crowdsft.node.verify import verify_node
from crowdsft.testing.standin import StandInSpace
from crowdsft.v1 import contribution_pb2

RECEIPT_TRAILER = "crowdsft-receipt-bin"


def envelope(identity: Identity, *pairs: tuple[str, str], coordinator: bytes):
    return sign_envelope(
        identity,
        contribution_pb2.ContributionPayload(
            examples=[contribution_pb2.Example(prompt=p, response=r) for p, r in pairs],
            nonce=new_nonce(),
            timestamp_ms=now_ms(),
        ),
        coordinator,
    )


def rejected(stub, env) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitContribution(env, timeout=5)
    return err.value


def test_exact_duplicates_are_rejected_and_the_first_keeps_them(coord):
    alice, bob = Identity.generate(), Identity.generate()
    with coord.client() as c:
        first = envelope(
            alice, ("What is tea?", "A drink made from leaves."), coordinator=coord.public_key
        )
        c.stub.SubmitContribution(first, timeout=5)
        before = coord.counts()
        for copy in (
            ("What is tea?", "A drink made from leaves."),
            ("what  is TEA?", "a drink made   from leaves."),  # case and spaces only
        ):
            err = rejected(
                c.stub,
                envelope(
                    bob, ("Fresh question", "fresh answer"), copy, coordinator=coord.public_key
                ),
            )
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "examples[1] duplicates an example already stored" in err.details()
            assert "another node" in err.details()
            assert not any(k == RECEIPT_TRAILER for k, _ in err.trailing_metadata() or ())
        err = rejected(
            c.stub,
            envelope(
                alice, ("What is tea?", "A drink made from leaves."), coordinator=coord.public_key
            ),
        )
        assert "this node" in err.details()
        assert coord.counts()["contributions"] == before["contributions"]
        # The same contribution again is a retry, not a copy: its original receipt comes back.
        err = rejected(c.stub, first)
        assert any(k == RECEIPT_TRAILER for k, _ in err.trailing_metadata())
        # Repeats inside one contribution are a malformed contribution.
        err = rejected(
            c.stub, envelope(bob, ("q", "same"), ("Q", "SAME"), coordinator=coord.public_key)
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "examples[1] repeats examples[0]" in err.details()
        # The bob examples that were not copies are still welcome on their own.
        c.stub.SubmitContribution(
            envelope(bob, ("Fresh question", "fresh answer"), coordinator=coord.public_key),
            timeout=5,
        )
    assert coord.counts()["contributions"] == 2


def test_the_node_reports_copies_and_keeps_going(coord, tmp_path):
    runner = CliRunner()
    keys = []
    for name in ("a", "b"):
        key = tmp_path / f"{name}.key"
        assert runner.invoke(main, ["node", "keygen", "--out", str(key)]).exit_code == 0
        keys.append(key)
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "p1", "response": "r1"}) + "\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"prompt": "p1", "response": "r1"})
        + "\n"
        + json.dumps({"prompt": "p2", "response": "r2"})
        + "\n"
    )
    base = ["node", "submit", "--coordinator", coord.address, "--no-progress", "--json"]
    assert (
        runner.invoke(main, [*base, "--key", str(keys[0]), str(tmp_path / "a.jsonl")]).exit_code
        == 0
    )
    out = runner.invoke(main, [*base, "--key", str(keys[1]), str(tmp_path / "b.jsonl")])
    assert out.exit_code != 0
    report = json.loads(out.stdout)
    assert report["accepted"] == 1 and report["failed"] == 1
    assert "duplicates an example" in json.dumps(report)


def test_a_near_copier_gains_nothing(make_coordinator):
    coord = make_coordinator(rounds={"groups": 2, "judging_error": 0.0, "seed": 1})
    honest = [Identity.generate() for _ in range(4)]
    copier = Identity.generate()
    topics = [
        ["volcanoes", "basalt", "magma", "eruption"],
        ["violins", "strings", "rosin", "bow"],
        ["sourdough", "starter", "crust", "flour"],
        ["comets", "orbit", "ice", "tail"],
    ]
    originals = {
        ident.node_id: [
            (
                f"Why do {topics[n][0]} matter ({k})?",
                f"Because {topics[n][k % 4]} and {topics[n][(k + 1) % 4]} " * (1 + n),
            )
            for k in range(3)
        ]
        for n, ident in enumerate(honest)
    }
    with coord.client() as c:
        for ident in honest:
            for pair in originals[ident.node_id]:
                c.stub.SubmitContribution(
                    envelope(ident, pair, coordinator=coord.public_key), timeout=5
                )
        # The copier takes the best contributor's data and changes a character in each.
        copier_receipts = [
            c.stub.SubmitContribution(
                envelope(
                    copier, (p, r.replace("Because", "Becuase", 1)), coordinator=coord.public_key
                ),
                timeout=5,
            ).receipt
            for p, r in originals[honest[3].node_id]
        ]
    runner = RoundRunner(
        coord.config, coord.coordinator.store, StandInSpace(coord.config.adapter_dir)
    )
    summaries = [runner.run() for _ in range(2)]
    flagged = coord.coordinator.store.query(
        "SELECT c.node_id, f.reason FROM flagged f JOIN contributions c ON c.seq=f.contribution_seq"
    )
    assert {n for n, _ in flagged} == {copier.node_id} and len(flagged) == 3
    assert "submitted earlier" in flagged[0][1]
    for s in summaries:
        assert all(copier.node_id not in g for g in s.groups)
    points = dict(coord.coordinator.store.query("SELECT node_id, points FROM nodes"))
    assert points[copier.node_id] == 0.0
    assert points[honest[3].node_id] > 0.0
    with coord.client() as c:
        entries = c.ledger()
    assert len(entries[0].data()["flagged"]) == 3
    assert verify_ledger(entries, coord.public_key).ok

    with coord.client() as c:
        result = verify_node(c, copier, coord.public_key, copier_receipts)
    assert result.ok and result.flagged == 3 and result.included == 0


def test_near_duplicate_detection_can_be_turned_off(make_coordinator):
    coord = make_coordinator(
        rounds={"groups": 2, "judging_error": 0.0},
        admission={"near_duplicate_threshold": 0.0},
    )
    ids = [Identity.generate() for _ in range(3)]
    with coord.client() as c:
        for n, ident in enumerate(ids):
            c.stub.SubmitContribution(
                envelope(ident, ("same question", f"same answer{n}"), coordinator=coord.public_key),
                timeout=5,
            )
    RoundRunner(coord.config, coord.coordinator.store, StandInSpace(coord.config.adapter_dir)).run()
    assert coord.coordinator.store.query("SELECT COUNT(*) FROM flagged")[0][0] == 0


def test_examples_stored_before_copy_checks_are_fingerprinted_at_start(coord):
    alice, bob = Identity.generate(), Identity.generate()
    with coord.client() as c:
        c.stub.SubmitContribution(
            envelope(alice, ("old question", "old answer"), coordinator=coord.public_key), timeout=5
        )
    coord.coordinator.store.write(lambda conn: conn.execute("DELETE FROM examples"))
    coord.restart()
    with coord.client() as c:
        err = rejected(
            c.stub, envelope(bob, ("old question", "old answer"), coordinator=coord.public_key)
        )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS


def test_the_embedding_cache_is_bounded_and_embeds_each_text_once_while_held():
    from crowdsft.coordinator.rounds.copies import EmbeddingCache

    calls = []

    def embed(texts):
        calls.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts])

    cache = EmbeddingCache(embed, max_texts=3)
    first = cache(["a", "bb", "a"])
    assert calls == [["a", "bb"]] and first.shape == (3, 2)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0)
    cache(["bb", "ccc", "dddd"])  # "a" is the least recently used: forgotten
    assert len(cache) == 3 and calls[-1] == ["ccc", "dddd"]
    cache(["a"])
    assert calls[-1] == ["a"]
