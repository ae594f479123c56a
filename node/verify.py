"""``crowdsft node verify``: check what the coordinator published against what this node holds.

1. Every ledger record's signature (the coordinator key this node pinned) and hash link.
2. Every points entry, recomputed from the records with the reward rule each record names.
3. Each of this node's receipted contributions: its receipt's signature, and for each round
   the coordinator says used it, a Merkle inclusion proof against that round's record, in a
   round where this node was a contributor.
4. The points the coordinator reports for this node against the points the records imply.
5. The ledger against the last head this node verified (kept in its state): a ledger with
   fewer rounds is a rollback, another record at that round a fork; the coordinator's signed
   records that prove it are kept (``node evidence``). And against heads other nodes hold
   (``--peer FILE``, written by ``node head``): a different record at the same round is a
   fork, shown to different nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crowdsft.envelope import verify_receipt
from crowdsft.keys import Identity
from crowdsft.ledger import (
    LedgerReport,
    Problem,
    SignedHead,
    SignedTreeHead,
    check_head,
    check_tree_head,
    verify_inclusion,
    verify_ledger,
)
from crowdsft.v1 import coordinator_pb2, envelope_pb2

POINTS_TOLERANCE = 1e-9


@dataclass
class NodeVerification:
    node_id: str
    coordinator_key: bytes
    ledger: LedgerReport
    receipts: int = 0
    included: int = 0  # receipted contributions used in at least one round
    flagged: int = 0  # receipted contributions a record lists as near-duplicates
    proofs: int = 0  # inclusion proofs checked
    points_recomputed: float = 0.0
    points_reported: float | None = None
    remembered_round: int | None = None  # the head this node had verified before this run
    peers_checked: int = 0
    tree_size: int | None = None  # the signed tree head's size, where it checked out
    evidence_kept: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def mismatches(self) -> list[Problem]:
        """The problems that are findings against the coordinator (not "cannot check")."""
        return [p for p in self.problems if p.kind != "unchecked"]

    @property
    def unchecked(self) -> list[Problem]:
        return [p for p in self.problems if p.kind == "unchecked"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "node_id": self.node_id,
            "coordinator_key": self.coordinator_key.hex(),
            "rounds": self.ledger.rounds,
            "ledger_head": self.ledger.head,
            "receipts": self.receipts,
            "included": self.included,
            "pending": self.receipts - self.included - self.flagged,
            "flagged_near_duplicates": self.flagged,
            "proofs_checked": self.proofs,
            "points_recomputed": self.points_recomputed,
            "points_reported": self.points_reported,
            "remembered_round": self.remembered_round,
            "peers_checked": self.peers_checked,
            "tree_size": self.tree_size,
            "evidence_kept": self.evidence_kept,
            "problems": [p.as_dict() for p in self.problems],
        }


def check_inclusion(
    proofs: list[coordinator_pb2.InclusionProof],
    receipted: set[bytes],
    node_id: str,
    records: dict[int, dict[str, Any]],
) -> tuple[int, set[bytes], list[Problem]]:
    """Check proofs for this node's contributions; returns (proofs checked, ids included,
    problems)."""
    problems: list[Problem] = []
    included: set[bytes] = set()
    checked = 0
    for p in proofs:
        cid = bytes(p.contribution_id)
        short = cid.hex()[:16]
        if cid not in receipted:
            problems.append(
                Problem(p.round_id, "inclusion", f"proof for {short}…, which this node never sent")
            )
            continue
        rec = records.get(p.round_id)
        if rec is None:
            problems.append(
                Problem(
                    p.round_id,
                    "inclusion",
                    f"contribution {short}… is said to be in a round with no valid record",
                )
            )
            continue
        checked += 1
        contributions = rec.get("contributions", {})
        if p.tree_size != contributions.get("count"):
            problems.append(
                Problem(
                    p.round_id,
                    "inclusion",
                    f"contribution {short}…: proof over {p.tree_size} leaves, the record "
                    f"commits to {contributions.get('count')}",
                )
            )
            continue
        try:
            root = bytes.fromhex(contributions.get("merkle_root", ""))
        except ValueError:
            root = b""
        if not verify_inclusion(cid, p.leaf_index, p.tree_size, list(p.path), root):
            problems.append(
                Problem(
                    p.round_id,
                    "inclusion",
                    f"contribution {short}… is not under the record's Merkle root",
                )
            )
            continue
        if not any(node_id in g for g in rec.get("groups", [])):
            problems.append(
                Problem(
                    p.round_id,
                    "inclusion",
                    f"contribution {short}… was used, but this node is in none of the groups",
                )
            )
            continue
        included.add(cid)
    return checked, included, problems


def _provable(key: bytes, other: Any) -> bool:
    """Whether the ledger's side of a finding is the coordinator's signed word (a record
    altered on the way is reported by verify_ledger, and is no proof of anything)."""
    return other is None or SignedHead.of(key, other).valid()


def check_heads(
    result: NodeVerification,
    entries: list,
    state: Any,
    peers: list[SignedHead],
    now_ms: int,
    tree: tuple[SignedTreeHead, list[bytes]] | None = None,
    known_tree: SignedTreeHead | None = None,
) -> None:
    """Step 5: the coordinator's signed tree head against the ledger and against the tree
    head this node verified before (RFC 9162 consistency); the ledger against the record head
    this node verified before, and the peers' heads; remember both heads when everything
    checks out."""
    key = result.coordinator_key
    if tree is not None:
        new_tree, proof = tree
        for kind, message in check_tree_head(new_tree, proof, entries, known_tree):
            result.problems.append(Problem(None, kind, message))
            if kind in ("rollback", "fork") and known_tree is not None and state is not None:
                state.keep_tree_evidence(kind, known_tree, new_tree, now_ms)
                result.evidence_kept += 1
        result.tree_size = new_tree.size if new_tree.valid() else None
    known = state.ledger_head(key) if state is not None else None
    if known is not None:
        result.remembered_round = known.round_id
        found = check_head(known, entries, own=True)
        if found.kind != "consistent":
            result.problems.append(Problem(known.round_id, found.kind, found.message))
            if _provable(key, found.other):
                state.keep_evidence(found.kind, known, found.other, now_ms)
                result.evidence_kept += 1
    for peer in peers:
        if peer.coordinator_key != key:
            continue  # another coordinator's head: nothing to compare
        if not peer.valid():
            result.problems.append(
                Problem(peer.round_id, "peer", "a peer's head is not signed by this coordinator")
            )
            continue
        result.peers_checked += 1
        found = check_head(peer, entries, own=False)
        if found.kind == "consistent":
            continue
        result.problems.append(Problem(peer.round_id, found.kind, found.message))
        if found.kind == "fork" and state is not None and _provable(key, found.other):
            state.keep_evidence("fork", peer, found.other, now_ms)
            result.evidence_kept += 1
    if state is not None and entries and not result.problems:
        state.remember_head(SignedHead.of(key, entries[-1]), now_ms)
        if tree is not None:
            state.remember_tree_head(tree[0], now_ms)


def verify_node(
    client,
    identity: Identity,
    coordinator_key: bytes,
    receipts,
    state: Any = None,
    peers: list[SignedHead] | None = None,
    now_ms: int = 0,
) -> NodeVerification:
    """Run every check for ``identity`` against the coordinator at ``client``. ``receipts`` are
    the signed receipts this node holds (``envelope_pb2.SignedReceipt``); ``state`` (a
    ``NodeState``) remembers the heads verified and keeps evidence; ``peers``: other nodes'
    heads to compare with."""
    node_id = identity.node_id
    known_tree = state.tree_head(coordinator_key) if state is not None else None
    # the signed tree head first: the ledger fetched after it holds at least its records
    tree = client.tree_head(known_tree.size if known_tree is not None else 0)
    entries = client.ledger()
    report = verify_ledger(entries, coordinator_key)
    result = NodeVerification(node_id, coordinator_key, report)
    result.problems += report.problems
    receipted: set[bytes] = set()
    for signed in receipts:
        try:
            receipt = verify_receipt(signed, coordinator_key)
        except Exception as exc:
            result.problems.append(Problem(None, "receipt", f"a stored receipt is invalid: {exc}"))
            continue
        if receipt.node_id != node_id:
            result.problems.append(
                Problem(None, "receipt", f"a stored receipt names node {receipt.node_id}")
            )
            continue
        receipted.add(bytes(receipt.contribution_id))
    result.receipts = len(receipted)
    proofs = client.inclusion_proofs(sorted(receipted))
    checked, included, problems = check_inclusion(proofs, receipted, node_id, report.records)
    result.proofs, result.included = checked, len(included)
    flagged = {
        bytes.fromhex(f.get("contribution", ""))
        for rec in report.records.values()
        for f in rec.get("flagged", [])
    }
    result.flagged = len((receipted - included) & flagged)
    result.problems += problems
    # Rounds that used this node's data must list it, and a node listed in a group must have
    # had data there: a proof for one of its contributions in each such round.
    proven_rounds = {p.round_id for p in proofs if bytes(p.contribution_id) in included}
    for rid, rec in sorted(report.records.items()):
        if any(node_id in g for g in rec["groups"]) and rid not in proven_rounds:
            result.problems.append(
                Problem(
                    rid,
                    "inclusion",
                    "this node is in a group, but no contribution of this node it holds a "
                    "receipt for is proven in the round",
                )
            )
    result.points_recomputed = report.points.get(node_id, 0.0)
    status = client.status(identity)
    result.points_reported = status.points
    if abs(status.points - result.points_recomputed) > POINTS_TOLERANCE * max(
        1.0, abs(status.points)
    ):
        result.problems.append(
            Problem(
                None,
                "status",
                f"the coordinator reports {status.points:.6g} points for this node; the "
                f"ledger implies {result.points_recomputed:.6g}",
            )
        )
    check_heads(result, list(entries), state, peers or [], now_ms, tree, known_tree)
    return result


def held_receipts(state, coordinator_key: bytes) -> list[envelope_pb2.SignedReceipt]:
    return [
        envelope_pb2.SignedReceipt(receipt=s.receipt, signature=s.receipt_signature)
        for s in state.receipts(coordinator_key)
    ]
