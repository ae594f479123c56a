"""Every query the coordinator runs against its store, with typed rows.

Functions that take a ``Store`` read committed data; functions that take a
``sqlite3.Connection`` run inside a transaction of the store's writer (``Store.write``), so a
caller composes them into one atomic step. No other module of the product writes SQL (the
node keeps its own local state in ``crowdsft.node.state``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .db import Store

# -- typed rows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateRow:
    group: int
    adapter: str
    score: float | None
    training: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"group": self.group, "adapter": self.adapter, "score": self.score}


@dataclass(frozen=True)
class RoundRow:
    """A round as stored (planned, trained, scored or finished)."""

    round_id: int
    status: str
    seed: int
    started_ms: int
    finished_ms: int | None
    strategies: dict[str, Any]
    base_lineage: list[str]
    groups: list[list[str]]  # node ids per group
    weights: list[list[float]]
    base_score: float | None
    updated: bool
    ranking: list[int]  # candidates best first; empty when nothing was updated
    swapped: bool
    winner: int | None  # a group, or len(groups): the consolidated candidate
    candidates: list[CandidateRow]  # per group, then the consolidated one where planned
    consolidated: dict[str, Any] | None = None  # {members, weights, upto}

    @property
    def consolidated_won(self) -> bool:
        return self.consolidated is not None and self.winner == len(self.groups)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def group_of(self, node_id: str) -> int | None:
        return next((g for g, m in enumerate(self.groups) if node_id in m), None)

    def as_dict(self) -> dict[str, Any]:
        """The form reports and ``round_history`` use."""
        return {
            "round_id": self.round_id,
            "groups": self.groups,
            "base_score": self.base_score,
            "updated": self.updated,
            "ranking": self.ranking,
            "swapped": self.swapped,
            "winner": self.winner,
            "started_ms": self.started_ms,
            "finished_ms": self.finished_ms,
            "candidates": [c.as_dict() for c in self.candidates],
            "consolidated": (
                None
                if self.consolidated is None
                else {k: self.consolidated[k] for k in ("members", "weights")}
            ),
        }


_ROUND_COLUMNS = (
    "round_id, status, seed, started_ms, finished_ms, strategies, base_lineage, groups, "
    "weights, base_score, updated, ranking, swapped, winner, consolidated"
)


def _decode_round(row: Sequence[Any], candidates: list[CandidateRow]) -> RoundRow:
    """The one decoding of a ``rounds`` row."""
    (rid, status, seed, started, finished, strategies, lineage, groups, weights) = row[:9]
    base_score, updated, ranking, swapped, winner, consolidated = row[9:]
    return RoundRow(
        round_id=rid,
        status=status,
        seed=seed,
        started_ms=started,
        finished_ms=finished,
        strategies=json.loads(strategies),
        base_lineage=json.loads(lineage),
        groups=json.loads(groups),
        weights=json.loads(weights),
        base_score=base_score,
        updated=bool(updated),
        ranking=json.loads(ranking) if ranking else [],
        swapped=bool(swapped),
        winner=winner,
        candidates=candidates,
        consolidated=json.loads(consolidated) if consolidated else None,
    )


def rounds(store: Store, after_round_id: int = 0, finished_only: bool = False) -> list[RoundRow]:
    """Rounds after ``after_round_id`` in order, each with its candidates."""
    where = "WHERE round_id > ?" + (" AND status='finished'" if finished_only else "")
    rows = store.query(
        f"SELECT {_ROUND_COLUMNS} FROM rounds {where} ORDER BY round_id", (after_round_id,)
    )
    if not rows:
        return []
    cands: dict[int, list[CandidateRow]] = {}
    for rid, g, adapter, score, training in store.query(
        "SELECT round_id, group_index, adapter, score, training FROM candidates "
        "WHERE round_id > ? ORDER BY round_id, group_index",
        (after_round_id,),
    ):
        cands.setdefault(rid, []).append(CandidateRow(g, adapter, score, json.loads(training)))
    return [_decode_round(r, cands.get(r[0], [])) for r in rows]


def finished_rounds(store: Store) -> list[RoundRow]:
    return rounds(store, 0, finished_only=True)


def round_row(store: Store, round_id: int) -> RoundRow:
    found = rounds(store, round_id - 1)
    if not found or found[0].round_id != round_id:
        raise KeyError(f"no round {round_id}")
    return found[0]


def unfinished_round(store: Store) -> int | None:
    rows = store.query("SELECT round_id FROM rounds WHERE status != 'finished' ORDER BY round_id")
    return rows[0][0] if rows else None


def next_round_id(store: Store) -> int:
    return int(store.query("SELECT COALESCE(MAX(round_id), 0) FROM rounds")[0][0] or 0) + 1


def lineage(store: Store) -> list[str]:
    """The adapters merged into the base model, in order (the current model)."""
    return [r[0] for r in store.query("SELECT adapter FROM lineage ORDER BY position")]


def awarded_points(store: Store) -> dict[str, float]:
    """Points awarded so far, per node (0 for nodes never in a finished round)."""
    return {
        r[0]: float(r[1]) for r in store.query("SELECT node_id, points FROM nodes ORDER BY node_id")
    }


def node_ids(store: Store) -> list[str]:
    return sorted(r[0] for r in store.query("SELECT node_id FROM nodes"))


# -- planning a round --------------------------------------------------------------------------


def unconsumed_pool(store: Store) -> dict[str, list[int]]:
    """Per node, the store sequence numbers of its contributions that no round consumed and
    that are not flagged as near-duplicates."""
    by_node: dict[str, list[int]] = {}
    for node_id, seq in store.query(
        "SELECT c.node_id, c.seq FROM contributions c "
        "LEFT JOIN consumed x ON x.contribution_seq = c.seq "
        "LEFT JOIN flagged f ON f.contribution_seq = c.seq "
        "WHERE x.contribution_seq IS NULL AND f.contribution_seq IS NULL "
        "ORDER BY c.node_id, c.seq"
    ):
        by_node.setdefault(node_id, []).append(seq)
    return by_node


def accepted_pool(store: Store) -> dict[str, list[int]]:
    """Per node, the store sequence numbers of all its contributions not flagged as
    near-duplicates, consumed or not: the consolidated candidate's data."""
    by_node: dict[str, list[int]] = {}
    for node_id, seq in store.query(
        "SELECT c.node_id, c.seq FROM contributions c "
        "LEFT JOIN flagged f ON f.contribution_seq = c.seq "
        "WHERE f.contribution_seq IS NULL ORDER BY c.node_id, c.seq"
    ):
        by_node.setdefault(node_id, []).append(seq)
    return by_node


def insert_planned_round(
    conn: sqlite3.Connection,
    round_id: int,
    *,
    seed: int,
    started_ms: int,
    strategies: dict[str, Any],
    base_lineage: list[str],
    groups: list[list[str]],
    weights: list[list[float]],
    contribution_seqs: Iterable[int],
    consolidated: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        "INSERT INTO rounds(round_id, status, seed, started_ms, strategies, base_lineage, "
        "groups, weights, consolidated) VALUES (?, 'planned', ?, ?, ?, ?, ?, ?, ?)",
        (
            round_id,
            seed,
            started_ms,
            json.dumps(strategies),
            json.dumps(base_lineage),
            json.dumps(groups),
            json.dumps(weights),
            json.dumps(consolidated) if consolidated is not None else None,
        ),
    )
    conn.executemany(
        "INSERT INTO round_contributions(round_id, contribution_seq) VALUES (?, ?)",
        [(round_id, seq) for seq in contribution_seqs],
    )


def round_payloads(store: Store, round_id: int) -> list[tuple[str, bytes]]:
    """(node id, signed payload bytes) of every contribution a round uses, in store order."""
    return [
        (n, store.load_payload(p, f, bytes(cid)))
        for n, p, f, cid in store.query(
            "SELECT c.node_id, c.payload, c.payload_file, c.id FROM round_contributions rc "
            "JOIN contributions c ON c.seq = rc.contribution_seq "
            "WHERE rc.round_id=? ORDER BY c.seq",
            (round_id,),
        )
    ]


def consolidated_payloads(store: Store, upto: int) -> list[tuple[str, bytes]]:
    """(node id, signed payload bytes) of every contribution not flagged as a near-duplicate
    up to store sequence number ``upto``, in store order: a consolidated candidate's data.
    (Every one of them was in a round's contributions when the round was planned, so none
    can be flagged later: flagging looks only at contributions no round has used.)"""
    return [
        (n, store.load_payload(p, f, bytes(cid)))
        for n, p, f, cid in store.query(
            "SELECT c.node_id, c.payload, c.payload_file, c.id FROM contributions c "
            "LEFT JOIN flagged x ON x.contribution_seq = c.seq "
            "WHERE c.seq <= ? AND x.contribution_seq IS NULL ORDER BY c.seq",
            (upto,),
        )
    ]


def contributions_since_last_plan(store: Store) -> int:
    """Contributions accepted after the last round was planned (all of them before any)."""
    row = store.query(
        "SELECT COUNT(*) FROM contributions c WHERE c.seq > COALESCE("
        "(SELECT MAX(rc.contribution_seq) FROM round_contributions rc), 0)"
    )
    return int(row[0][0])


# -- near-duplicates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredContribution:
    seq: int
    id: bytes
    node_id: str
    payload: bytes


def unflagged_contributions(store: Store) -> list[StoredContribution]:
    return [
        StoredContribution(seq, bytes(cid), node, store.load_payload(payload, f, bytes(cid)))
        for seq, cid, node, payload, f in store.query(
            "SELECT c.seq, c.id, c.node_id, c.payload, c.payload_file FROM contributions c "
            "LEFT JOIN flagged f ON f.contribution_seq = c.seq "
            "WHERE f.contribution_seq IS NULL ORDER BY c.seq"
        )
    ]


def never_used_seqs(store: Store) -> set[int]:
    """Contributions that no round has used yet."""
    return {
        seq
        for (seq,) in store.query(
            "SELECT c.seq FROM contributions c "
            "LEFT JOIN round_contributions rc ON rc.contribution_seq = c.seq "
            "WHERE rc.contribution_seq IS NULL"
        )
    }


def insert_flags(conn: sqlite3.Connection, entries: Sequence[tuple[int, str, int, float, int]]):
    """(contribution_seq, reason, earlier_seq, similarity, round_id) rows."""
    conn.executemany(
        "INSERT OR IGNORE INTO flagged(contribution_seq, reason, earlier_seq, "
        "similarity, round_id) VALUES (?, ?, ?, ?, ?)",
        entries,
    )


def flags_of_round(conn: sqlite3.Connection, round_id: int) -> list[dict[str, Any]]:
    return [
        {"contribution": bytes(a).hex(), "earlier": bytes(b).hex(), "cosine": s}
        for a, b, s in conn.execute(
            "SELECT c.id, e.id, f.similarity FROM flagged f "
            "JOIN contributions c ON c.seq = f.contribution_seq "
            "JOIN contributions e ON e.seq = f.earlier_seq "
            "WHERE f.round_id=? ORDER BY f.contribution_seq",
            (round_id,),
        )
    ]


# -- training and scoring -----------------------------------------------------------------------


def insert_candidate(
    conn: sqlite3.Connection, round_id: int, group: int, adapter: str, training: dict[str, Any]
) -> None:
    conn.execute(
        "INSERT INTO candidates(round_id, group_index, adapter, training) VALUES (?, ?, ?, ?)",
        (round_id, group, adapter, json.dumps(training)),
    )


def set_candidate_score(conn: sqlite3.Connection, round_id: int, group: int, score: float):
    conn.execute(
        "UPDATE candidates SET score=? WHERE round_id=? AND group_index=?",
        (score, round_id, group),
    )


def set_base_score(conn: sqlite3.Connection, round_id: int, score: float) -> None:
    conn.execute("UPDATE rounds SET base_score=? WHERE round_id=?", (score, round_id))


def set_round_strategies(
    conn: sqlite3.Connection, round_id: int, strategies: dict[str, Any]
) -> None:
    """Replace the rules of a round that is not finished (``coordinator round --redecide``)."""
    conn.execute(
        "UPDATE rounds SET strategies=? WHERE round_id=? AND status != 'finished'",
        (json.dumps(strategies), round_id),
    )


def advance_status(conn: sqlite3.Connection, round_id: int, before: str, after: str) -> None:
    conn.execute(
        "UPDATE rounds SET status=? WHERE round_id=? AND status=?", (after, round_id, before)
    )


# -- finishing a round ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishWrite:
    """What the transaction that finishes a round writes (decided before it opens)."""

    round_id: int
    updated: bool
    ranking: list[int]
    swapped: bool
    winner: int | None
    winner_adapter: str | None
    points: dict[str, tuple[float, float]]  # node -> (before, after), changed ones only
    consumed_nodes: list[str]


def finish_round(conn: sqlite3.Connection, w: FinishWrite, finished_ms: int) -> RoundRow | None:
    """Mark the round finished, write the points ledger, the consumed contributions and the
    lineage. Returns the round as stored before (None if an earlier attempt finished it:
    nothing is written twice)."""
    row = conn.execute(f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE round_id=?", (w.round_id,))
    before = _decode_round(row.fetchone(), [])
    if before.finished:
        return None
    conn.execute(
        "UPDATE rounds SET status='finished', finished_ms=?, updated=?, ranking=?, "
        "swapped=?, winner=? WHERE round_id=?",
        (
            finished_ms,
            int(w.updated),
            json.dumps(w.ranking) if w.updated else None,
            int(w.swapped),
            w.winner,
            w.round_id,
        ),
    )
    for n, (old, new) in w.points.items():
        conn.execute(
            "INSERT INTO points_ledger(round_id, node_id, points_before, points_after) "
            "VALUES (?, ?, ?, ?)",
            (w.round_id, n, old, new),
        )
        conn.execute("UPDATE nodes SET points=? WHERE node_id=?", (new, n))
    if w.consumed_nodes:
        conn.execute(
            "INSERT INTO consumed(contribution_seq, round_id) "
            "SELECT rc.contribution_seq, rc.round_id FROM round_contributions rc "
            "JOIN contributions c ON c.seq = rc.contribution_seq "
            f"WHERE rc.round_id=? AND c.node_id IN ({','.join('?' * len(w.consumed_nodes))})",
            (w.round_id, *w.consumed_nodes),
        )
    if w.winner_adapter is not None:
        position = conn.execute("SELECT COUNT(*) FROM lineage").fetchone()[0]
        conn.execute(
            "INSERT INTO lineage(position, adapter, round_id) VALUES (?, ?, ?)",
            (position, w.winner_adapter, w.round_id),
        )
    return before


def lineage_in(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT adapter FROM lineage ORDER BY position")]


# -- nodes, nonces, status ------------------------------------------------------------------------


def nonce_used(conn: sqlite3.Connection, node_id: str, nonce: bytes) -> bool:
    return bool(
        conn.execute(
            "SELECT 1 FROM nonces WHERE nonce=? AND node_id=?", (nonce, node_id)
        ).fetchone()
    )


def record_nonce(conn: sqlite3.Connection, node_id: str, nonce: bytes, ts_ms: int) -> None:
    conn.execute(
        "INSERT INTO nonces(nonce, node_id, ts_ms) VALUES (?, ?, ?)", (nonce, node_id, ts_ms)
    )


def prune_nonces(store: Store, older_than_ms: int) -> int:
    """Forget nonces with a timestamp before ``older_than_ms``."""
    return store.write(
        lambda conn: conn.execute("DELETE FROM nonces WHERE ts_ms < ?", (older_than_ms,)).rowcount
    )


def registered_at(conn: sqlite3.Connection, node_id: str) -> int | None:
    row = conn.execute("SELECT registered_at_ms FROM nodes WHERE node_id=?", (node_id,)).fetchone()
    return row[0] if row else None


def set_display_name(conn: sqlite3.Connection, node_id: str, name: str) -> None:
    conn.execute("UPDATE nodes SET display_name=? WHERE node_id=?", (name, node_id))


def insert_node(
    conn: sqlite3.Connection, node_id: str, public_key: bytes, name: str, now_ms: int
) -> None:
    conn.execute(
        "INSERT INTO nodes(node_id, public_key, display_name, registered_at_ms) "
        "VALUES (?, ?, ?, ?)",
        (node_id, public_key, name, now_ms),
    )


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    registered_at_ms: int
    display_name: str
    points: float


def node_row(store: Store, node_id: str) -> NodeRow | None:
    """A node's registration and points (None: never registered or seen)."""
    rows = store.query(
        "SELECT registered_at_ms, display_name, points FROM nodes WHERE node_id=?", (node_id,)
    )
    return NodeRow(node_id, *rows[0]) if rows else None


def contribution_counts(store: Store, node_id: str) -> tuple[int, int]:
    """(contributions, examples) a node has stored."""
    count, examples = store.query(
        "SELECT COUNT(*), COALESCE(SUM(example_count), 0) FROM contributions WHERE node_id=?",
        (node_id,),
    )[0]
    return int(count), int(examples)


def points_entries(store: Store, node_id: str) -> dict[int, tuple[float, float]]:
    """round id -> (points before, points after) of one node."""
    return {
        rid: (b, a)
        for rid, b, a in store.query(
            "SELECT round_id, points_before, points_after FROM points_ledger WHERE node_id=?",
            (node_id,),
        )
    }


def participation(store: Store, node_id: str) -> list[dict[str, Any]]:
    """The finished rounds a node took part in, with its group, rank and points."""
    entries = points_entries(store, node_id)
    out = []
    for r in finished_rounds(store):
        group = r.group_of(node_id)
        if group is None:
            continue
        entry: dict[str, Any] = {"round_id": r.round_id, "group": group}
        if r.ranking:
            entry["rank"] = r.ranking.index(group)
        if r.round_id in entries:
            entry["points_before"], entry["points_after"] = entries[r.round_id]
        out.append(entry)
    return out


# -- contributions (the batched ingest write) -----------------------------------------------------


def _lookup(conn: sqlite3.Connection, sql: str, keys: Sequence[bytes]) -> list[tuple[Any, ...]]:
    """``sql`` (with one ``IN ({})``) over ``keys``, in chunks that SQLite accepts."""
    out: list[tuple[Any, ...]] = []
    for i in range(0, len(keys), 500):
        chunk = list(keys[i : i + 500])
        out += conn.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
    return out


def stored_receipts(
    conn: sqlite3.Connection, ids: Sequence[bytes]
) -> dict[bytes, tuple[bytes, bytes]]:
    """contribution id -> (receipt, receipt signature), for the ids already stored."""
    return {
        bytes(r[0]): (bytes(r[1]), bytes(r[2]))
        for r in _lookup(
            conn, "SELECT id, receipt, receipt_signature FROM contributions WHERE id IN ({})", ids
        )
    }


def used_nonces(conn: sqlite3.Connection, nonces: Sequence[bytes]) -> set[tuple[bytes, str]]:
    return {
        (bytes(r[0]), r[1])
        for r in _lookup(conn, "SELECT nonce, node_id FROM nonces WHERE nonce IN ({})", nonces)
    }


def fingerprint_owners(conn: sqlite3.Connection, fps: Sequence[bytes]) -> dict[bytes, str]:
    """fingerprint -> node id, for example fingerprints already stored."""
    return {
        bytes(r[0]): r[1]
        for r in _lookup(
            conn, "SELECT fingerprint, node_id FROM examples WHERE fingerprint IN ({})", fps
        )
    }


@dataclass
class AcceptedBatch:
    """Rows of the contributions a batch accepted, written together."""

    nodes: list[tuple[str, bytes, int]] = field(default_factory=list)
    nonces: list[tuple[bytes, str, int]] = field(default_factory=list)
    contributions: list[tuple[Any, ...]] = field(default_factory=list)
    examples: list[tuple[bytes, bytes, str]] = field(default_factory=list)


def insert_accepted(conn: sqlite3.Connection, batch: AcceptedBatch) -> None:
    if not batch.contributions:
        return
    conn.executemany(
        "INSERT OR IGNORE INTO nodes(node_id, public_key, registered_at_ms) VALUES (?, ?, ?)",
        batch.nodes,
    )
    conn.executemany("INSERT INTO nonces(nonce, node_id, ts_ms) VALUES (?, ?, ?)", batch.nonces)
    conn.executemany(
        "INSERT INTO contributions(id, node_id, payload, signature, client_ts_ms, "
        "accepted_at_ms, example_count, receipt, receipt_signature, payload_file) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        batch.contributions,
    )
    if batch.examples:
        conn.executemany(
            "INSERT INTO examples(fingerprint, contribution_id, node_id) VALUES (?, ?, ?)",
            batch.examples,
        )


def has_fingerprints(store: Store) -> bool:
    return bool(store.query("SELECT 1 FROM examples LIMIT 1"))


def all_contributions(store: Store) -> list[StoredContribution]:
    return [
        StoredContribution(seq, bytes(cid), node, store.load_payload(payload, f, bytes(cid)))
        for seq, cid, node, payload, f in store.query(
            "SELECT seq, id, node_id, payload, payload_file FROM contributions ORDER BY seq"
        )
    ]


def insert_fingerprints(store: Store, entries: Sequence[tuple[bytes, bytes, str]]) -> None:
    store.write(
        lambda conn: conn.executemany(
            "INSERT OR IGNORE INTO examples(fingerprint, contribution_id, node_id) "
            "VALUES (?, ?, ?)",
            entries,
        )
    )


def total_examples(store: Store) -> int:
    return int(store.query("SELECT COALESCE(SUM(example_count), 0) FROM contributions")[0][0])


# -- operator statistics -------------------------------------------------------------------------


def display_names(store: Store) -> dict[str, str]:
    """Node id -> the display name the node registered (nodes without one left out)."""
    return {
        n: name
        for n, name in store.query("SELECT node_id, display_name FROM nodes")
        if isinstance(name, str) and name.strip()
    }


def stats(conn: sqlite3.Connection) -> dict[str, Any]:
    """Totals and a per-node table, for ``crowdsft coordinator stats``."""
    rows = conn.execute(
        "SELECT n.node_id, n.display_name, n.registered_at_ms, n.points, "
        "COUNT(c.seq), COALESCE(SUM(c.example_count), 0) "
        "FROM nodes n LEFT JOIN contributions c ON c.node_id = n.node_id "
        "GROUP BY n.node_id ORDER BY n.registered_at_ms, n.node_id"
    ).fetchall()
    nodes = [
        {
            "node_id": r[0],
            "display_name": r[1],
            "registered_at_ms": r[2],
            "points": r[3],
            "contributions": r[4],
            "examples": r[5],
        }
        for r in rows
    ]

    def one(sql: str, *params: Any) -> Any:
        try:  # a store from an older version may lack the table until it is served once
            return conn.execute(sql, params).fetchone()
        except sqlite3.OperationalError:
            return None

    head = one("SELECT round_id, hash FROM ledger ORDER BY round_id DESC LIMIT 1")
    now = time.time_ns() // 1_000_000
    return {
        "nodes": len(nodes),
        "contributions": sum(n["contributions"] for n in nodes),
        "examples": sum(n["examples"] for n in nodes),
        "rounds_finished": head[0] if head else 0,
        "ledger_head": bytes(head[1]).hex() if head else None,
        "flagged_near_duplicates": (one("SELECT COUNT(*) FROM flagged") or (0,))[0],
        "invites_open": (
            one("SELECT COUNT(*) FROM invites WHERE used_by IS NULL AND expires_ms > ?", now)
            or (0,)
        )[0],
        "per_node": nodes,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
