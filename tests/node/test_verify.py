"""Node verification against a hand-made ledger, with a fake coordinator client: no server,
every check driven by what the records, proofs, receipts and status say."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

from crowdsft.envelope import sign_receipt
from crowdsft.keys import Identity
from crowdsft.ledger import GENESIS_HASH, LedgerEntry, MerkleTree, sign_record
from crowdsft.node.verify import check_inclusion, verify_node
from crowdsft.v1 import coordinator_pb2, envelope_pb2

COORD = Identity.generate()
ME, OTHER, THIRD = Identity.generate(), Identity.generate(), Identity.generate()
MINE = [hashlib.sha256(f"mine {i}".encode()).digest() for i in range(3)]
THEIRS = [hashlib.sha256(f"theirs {i}".encode()).digest() for i in range(4)]


def record(ids: list[bytes], points: dict[str, list[float]]) -> dict:
    """Round 1: three groups, my group ranked first under the rank rule (3 points)."""
    return {
        "version": 1,
        "round_id": 1,
        "prev_hash": GENESIS_HASH.hex(),
        "coordinator": COORD.public_key.hex(),
        "strategies": {"reward": "rank"},
        "population": sorted([ME.node_id, OTHER.node_id, THIRD.node_id]),
        "groups": [[OTHER.node_id], [ME.node_id], [THIRD.node_id]],
        "weights": [[1.0], [1.0], [1.0]],
        "contributions": {"count": len(ids), "merkle_root": MerkleTree(ids).root.hex()},
        "candidates": [
            {"group": g, "adapter": f"a{g}", "score": s} for g, s in enumerate([-2.0, -1.0, -3.0])
        ],
        "base_score": -4.0,
        "updated": True,
        "ranking": [1, 0, 2],
        "winner": 1,
        "points": points,
    }


POINTS = {OTHER.node_id: [0.0, 2.0], ME.node_id: [0.0, 3.0], THIRD.node_id: [0.0, 1.0]}


def entry(rec: dict) -> LedgerEntry:
    data, sig = sign_record(COORD.sign, rec)
    return LedgerEntry(rec["round_id"], data, sig)


def receipt(cid: bytes, node: Identity = ME) -> envelope_pb2.SignedReceipt:
    return sign_receipt(
        COORD,
        envelope_pb2.Receipt(
            contribution_id=cid,
            node_id=node.node_id,
            accepted_at_ms=1,
            example_count=1,
            coordinator_public_key=COORD.public_key,
        ),
    )


def proofs_for(ids: list[bytes], wanted: list[bytes]) -> list[coordinator_pb2.InclusionProof]:
    tree = MerkleTree(ids)
    return [
        coordinator_pb2.InclusionProof(
            contribution_id=c,
            round_id=1,
            leaf_index=tree.index[c],
            tree_size=len(ids),
            path=tree.proof(tree.index[c]),
        )
        for c in wanted
    ]


@dataclass
class FakeClient:
    entries: list[LedgerEntry]
    proofs: list[coordinator_pb2.InclusionProof]
    points: float

    def ledger(self):
        return self.entries

    def inclusion_proofs(self, ids):
        return [p for p in self.proofs if bytes(p.contribution_id) in set(ids)]

    def status(self, identity):
        return coordinator_pb2.NodeStatus(node_id=identity.node_id, points=self.points)

    def tree_head(self, first_size=0):
        """A coordinator's signed tree head over the records it serves, and the proof from
        the tree of ``first_size`` records (as the real service builds them)."""
        from crowdsft.ledger import SignedTreeHead, consistency_proof

        records = [e.record for e in self.entries]
        head = SignedTreeHead.sign(COORD, records, 1)
        proof = consistency_proof(records, first_size) if 0 < first_size < len(records) else []
        return head, proof


IDS = THEIRS[:2] + MINE[:2] + THEIRS[2:]  # my two used contributions sit in the middle


def test_an_honest_coordinator_checks_out():
    client = FakeClient([entry(record(IDS, POINTS))], proofs_for(IDS, MINE[:2]), 3.0)
    result = verify_node(client, ME, COORD.public_key, [receipt(c) for c in MINE])
    assert result.ok, [str(p) for p in result.problems]
    d = result.as_dict()
    assert (d["receipts"], d["included"], d["pending"], d["proofs_checked"]) == (3, 2, 1, 2)
    assert result.points_recomputed == pytest.approx(3.0)


def test_reported_points_that_the_ledger_does_not_imply_are_a_problem():
    client = FakeClient([entry(record(IDS, POINTS))], proofs_for(IDS, MINE[:2]), 5.0)
    result = verify_node(client, ME, COORD.public_key, [receipt(c) for c in MINE])
    assert [p.kind for p in result.problems] == ["status"]


def test_a_round_that_lists_me_without_proving_my_data_is_a_problem():
    client = FakeClient([entry(record(IDS, POINTS))], [], 3.0)
    result = verify_node(client, ME, COORD.public_key, [receipt(c) for c in MINE])
    assert any(p.kind == "inclusion" and p.round_id == 1 for p in result.problems)


def test_a_receipt_for_another_node_is_reported():
    client = FakeClient([entry(record(IDS, POINTS))], proofs_for(IDS, MINE[:2]), 3.0)
    receipts = [receipt(c) for c in MINE[:2]] + [receipt(MINE[2], OTHER)]
    result = verify_node(client, ME, COORD.public_key, receipts)
    assert [p.kind for p in result.problems] == ["receipt"]


def test_inclusion_checks_each_way_a_proof_can_be_wrong():
    rec = record(IDS, POINTS)
    good = proofs_for(IDS, MINE[:1])
    checked, included, problems = check_inclusion(good, set(MINE), ME.node_id, {1: rec})
    assert (checked, included, problems) == (1, {MINE[0]}, [])

    not_sent = proofs_for(IDS, THEIRS[:1])
    assert "never sent" in check_inclusion(not_sent, set(MINE), ME.node_id, {1: rec})[2][0].message

    wrong_size = proofs_for(IDS[:-1], MINE[:1])
    msg = check_inclusion(wrong_size, set(MINE), ME.node_id, {1: rec})[2][0].message
    assert "leaves" in msg

    other_tree = [*IDS[:-1], hashlib.sha256(b"swapped").digest()]
    bad_root = proofs_for(other_tree, MINE[:1])
    msg = check_inclusion(bad_root, set(MINE), ME.node_id, {1: rec})[2][0].message
    assert "Merkle root" in msg

    not_grouped = dict(rec, groups=[[OTHER.node_id], [THIRD.node_id], []])
    msg = check_inclusion(good, set(MINE), ME.node_id, {1: not_grouped})[2][0].message
    assert "none of the groups" in msg

    msg = check_inclusion(good, set(MINE), ME.node_id, {})[2][0].message
    assert "no valid record" in msg


# -- heads: rollback and fork (#25) -------------------------------------------------------------


def second(first: LedgerEntry, ranking=(0, 1)) -> dict:
    """Round 2 after ``first``: two groups without me, ranked by ``ranking`` (rank rule)."""
    pts = {ME.node_id: [3.0, 3.0]}
    before = {OTHER.node_id: 2.0, THIRD.node_id: 1.0}
    groups = [[OTHER.node_id], [THIRD.node_id]]
    for place, g in enumerate(ranking):
        node = groups[g][0]
        pts[node] = [before[node], before[node] + (len(groups) - place)]
    return {
        "version": 1,
        "round_id": 2,
        "prev_hash": first.hash.hex(),
        "coordinator": COORD.public_key.hex(),
        "strategies": {"reward": "rank"},
        "population": sorted([ME.node_id, OTHER.node_id, THIRD.node_id]),
        "groups": groups,
        "weights": [[1.0], [1.0]],
        "contributions": {"count": 1, "merkle_root": MerkleTree(THEIRS[:1]).root.hex()},
        "candidates": [
            {"group": g, "adapter": f"b{g}", "score": -1.0 - g if ranking[0] == 0 else -2.0 + g}
            for g in range(2)
        ],
        "base_score": -4.0,
        "updated": True,
        "ranking": list(ranking),
        "winner": ranking[0],
        "points": pts,
    }


def ledgers():
    one = entry(record(IDS, POINTS))
    return one, entry(second(one)), entry(second(one, ranking=(1, 0)))


def run(state, entries, peers=()):
    client = FakeClient(entries, proofs_for(IDS, MINE[:2]), 3.0)
    return verify_node(
        client, ME, COORD.public_key, [receipt(c) for c in MINE], state, list(peers), now_ms=1
    )


def test_a_rolled_back_ledger_is_caught_and_the_proof_kept(tmp_path):
    """Before: a coordinator that deleted round 2 and restarted passed `node verify` ("rounds
    1") on nodes that had verified two rounds minutes before."""
    from crowdsft.node.state import NodeState

    one, two, _ = ledgers()
    with NodeState(tmp_path / "me.sqlite3") as state:
        first = run(state, [one, two])
        assert first.ok, [str(p) for p in first.problems]
        assert first.remembered_round is None
        assert state.ledger_head(COORD.public_key).round_id == 2
        again = run(state, [one, two])
        assert again.ok and again.remembered_round == 2
        rolled = run(state, [one])
        # caught twice: by the record head and by the signed tree head (11.8)
        assert [p.kind for p in rolled.problems] == ["rollback", "rollback"]
        assert any("now shows 1 round" in p.message for p in rolled.problems)
        assert state.ledger_head(COORD.public_key).round_id == 2  # never moves back
        (kept,) = [e for e in state.evidence(COORD.public_key) if e["kind"] == "rollback"]
        assert kept["kind"] == "rollback" and kept["head"]["record"] == two.record.decode()


def test_a_forked_ledger_is_caught_with_both_signed_records(tmp_path):
    from crowdsft.ledger import SignedHead
    from crowdsft.node.state import NodeState

    one, two, forked = ledgers()
    assert forked.record != two.record
    with NodeState(tmp_path / "me.sqlite3") as state:
        assert run(state, [one, two]).ok
        result = run(state, [one, forked])
        assert [p.kind for p in result.problems] == ["fork", "fork"]  # record and tree heads
        (kept,) = [e for e in state.evidence(COORD.public_key) if e["kind"] == "fork"]
        a, b = SignedHead.from_dict(kept["head"]), SignedHead.from_dict(kept["other"])
        # the proof stands on its own: two valid signatures, one round, two records
        assert a.valid() and b.valid() and a.round_id == b.round_id == 2 and a.hash != b.hash


def test_peers_heads_reveal_a_split_view(tmp_path):
    """The coordinator shows one node one history and another node another: each node's
    ledger checks out alone; their heads, compared, prove the fork."""
    from crowdsft.ledger import SignedHead
    from crowdsft.node.state import NodeState

    one, two, forked = ledgers()
    with NodeState(tmp_path / "a.sqlite3") as a, NodeState(tmp_path / "b.sqlite3") as b:
        assert run(a, [one, two]).ok and run(b, [one, forked]).ok
        head_a = SignedHead.from_dict(a.ledger_head(COORD.public_key).as_dict())  # the file form
        seen_by_b = run(b, [one, forked], peers=[head_a])
        assert [p.kind for p in seen_by_b.problems] == ["fork"] and seen_by_b.peers_checked == 1
        assert b.evidence(COORD.public_key)[0]["kind"] == "fork"
        # a peer ahead of what this node was shown: reported, not taken as proof
        ahead = run(a, [one], peers=[head_a])
        assert {p.kind for p in ahead.problems} == {"rollback", "behind"}
        # a forged head (not the coordinator's signature) is refused as a peer's word
        forged = SignedHead(COORD.public_key, 2, forked.record, bytes(64))
        assert [p.kind for p in run(a, [one, two], peers=[forged]).problems] == ["peer"]


def test_head_check_known_answers():
    """Known answers of the rule in docs/protocol.md 11.8, on fixed records."""
    from crowdsft.ledger import SignedHead, check_head

    one, two, forked = ledgers()
    head = SignedHead.of(COORD.public_key, two)
    assert check_head(head, [one, two]).kind == "consistent"
    assert check_head(SignedHead.of(COORD.public_key, one), [one, two]).kind == "consistent"
    assert check_head(head, [one]).kind == "rollback"
    assert check_head(head, [one], own=False).kind == "behind"
    found = check_head(head, [one, forked])
    assert found.kind == "fork" and found.other == forked


# -- signed tree heads and consistency proofs (RFC 9162; docs/protocol.md 11.8) -----------------

# RFC 6962's reference leaves (the certificate-transparency test data) and known answers
RFC_LEAVES = [
    bytes.fromhex(x)
    for x in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
RFC_ROOTS = {
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}
RFC_CONSISTENCY = {
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}


def test_consistency_proofs_match_the_rfc_known_answers():
    from crowdsft.ledger import consistency_proof, log_root, verify_consistency

    for n, root in RFC_ROOTS.items():
        assert log_root(RFC_LEAVES[:n]).hex() == root
    for (m, n), want in RFC_CONSISTENCY.items():
        proof = consistency_proof(RFC_LEAVES[:n], m)
        assert [p.hex() for p in proof] == want
        old, new = bytes.fromhex(RFC_ROOTS[m]), bytes.fromhex(RFC_ROOTS[n])
        assert verify_consistency(m, n, old, new, proof)
        assert not verify_consistency(m, n, new, old, proof)  # roots swapped
        assert not verify_consistency(m, n, old, new, proof[:-1])  # a hash missing
        bent = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
        assert not verify_consistency(m, n, old, new, bent)
    # every pair of sizes over the reference leaves, and a forged old tree never passes
    for n in range(1, 9):
        for m in range(1, n + 1):
            proof = consistency_proof(RFC_LEAVES[:n], m)
            good = log_root(RFC_LEAVES[:m])
            assert verify_consistency(m, n, good, log_root(RFC_LEAVES[:n]), proof)
            if m < n:
                forged = log_root(RFC_LEAVES[1 : m + 1])
                assert not verify_consistency(m, n, forged, log_root(RFC_LEAVES[:n]), proof)


def test_signed_tree_heads_catch_a_rollback_and_a_rewrite(tmp_path):
    from crowdsft.ledger import SignedTreeHead
    from crowdsft.node.state import NodeState

    one, two, forked = ledgers()
    with NodeState(tmp_path / "me.sqlite3") as state:
        first = run(state, [one, two])
        assert first.ok and first.tree_size == 2
        assert state.tree_head(COORD.public_key).size == 2
        rolled = run(state, [one])
        assert {p.kind for p in rolled.problems} == {"rollback"}  # by the record and the tree
        assert sum(p.kind == "rollback" for p in rolled.problems) == 2
        rewritten = run(state, [one, forked])
        assert {p.kind for p in rewritten.problems} == {"fork"}
        kept = [e for e in state.evidence(COORD.public_key) if e["kind"] == "tree-fork"]
        a = SignedTreeHead(
            COORD.public_key,
            kept[0]["head"]["tree_head"].encode(),
            bytes.fromhex(kept[0]["head"]["signature"]),
        )
        b = SignedTreeHead(
            COORD.public_key,
            kept[0]["other"]["tree_head"].encode(),
            bytes.fromhex(kept[0]["other"]["signature"]),
        )
        # the proof stands alone: two valid heads of one size with different roots
        assert a.valid() and b.valid() and a.size == b.size == 2 and a.root != b.root


def test_a_tree_head_that_does_not_describe_the_ledger_is_a_problem():
    from crowdsft.ledger import SignedTreeHead, check_tree_head

    one, two, forked = ledgers()
    head = SignedTreeHead.sign(COORD, [one.record, forked.record], 1)
    found = check_tree_head(head, [], [one, two], None)
    assert [k for k, _ in found] == ["tree-head"]
    # a ledger longer than the head (a round finished between the two fetches) is fine
    assert check_tree_head(SignedTreeHead.sign(COORD, [one.record], 1), [], [one, two], None) == []
    forged = SignedTreeHead(COORD.public_key, head.head, bytes(64))
    assert [k for k, _ in check_tree_head(forged, [], [one, forked], None)] == ["tree-head"]


def test_a_reward_rule_not_installed_here_is_cannot_check_naming_its_package():
    """Before: a node without the operator's reward plugin got `MISMATCH ... no reward
    strategy named 'decay-rank'` and exit 1, as if the coordinator had cheated."""
    rec = record(IDS, POINTS)
    rec["strategies"] = {"reward": "decay-rank", "packages": {"reward": "crowdsft-decay 0.3.1"}}
    client = FakeClient([entry(rec)], proofs_for(IDS, MINE[:2]), 3.0)
    result = verify_node(client, ME, COORD.public_key, [receipt(c) for c in MINE])
    assert [p.kind for p in result.problems] == ["unchecked"]
    assert result.mismatches == [] and len(result.unchecked) == 1
    message = result.problems[0].message
    assert "cannot check" in message and "install crowdsft-decay" in message
    assert "0.3.1" in message


def test_the_cli_says_cannot_check_and_exits_4(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import crowdsft.node.cli as node_cli
    from crowdsft.cli import main
    from crowdsft.keys import write_private_key

    rec = record(THEIRS, {OTHER.node_id: [0.0, 2.0], THIRD.node_id: [0.0, 1.0]})
    rec |= {  # a round without this node (it holds no receipts in this test's state)
        "strategies": {"reward": "decay-rank"},
        "population": sorted([OTHER.node_id, THIRD.node_id]),
        "groups": [[OTHER.node_id], [THIRD.node_id]],
        "weights": [[1.0], [1.0]],
        "candidates": [{"group": g, "adapter": f"a{g}", "score": -1.0 - g} for g in range(2)],
        "ranking": [0, 1],
        "winner": 0,
    }
    client = FakeClient([entry(rec)], [], 0.0)

    class Connected:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def info(self):
            return coordinator_pb2.CoordinatorInfo(public_key=COORD.public_key)

        def __getattr__(self, name):
            return getattr(client, name)

    monkeypatch.setattr(node_cli, "_client", lambda address: Connected())
    key = tmp_path / "me.key"
    write_private_key(ME, key)
    out = CliRunner().invoke(
        main, ["node", "verify", "--coordinator", "127.0.0.1:1", "--key", str(key)]
    )
    assert out.exit_code == 4, out.output
    assert "CANNOT CHECK" in out.output and "MISMATCH" not in out.output
