"""The ledger table: writing a round's signed record in the transaction that finishes the
round, paging through the records, reading them back for the points replay, and proving
inclusion. (The record format and its verification are ``crowdsft.ledger``.)

A record commits to two sets of contribution ids, each as a count and a Merkle root over the
ids in store order: ``contributions`` (every contribution the round trained on; inclusion
proofs are against this tree) and ``consumed`` (those the round retired, with the policy and
the nodes whose data it retired)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from crowdsft.keys import Identity
from crowdsft.ledger import GENESIS_HASH, RECORD_VERSION, LedgerEntry, MerkleTree, sign_record
from crowdsft.tournament import DecidedRound

from .db import Store, StoreError
from .queries import _lookup


def round_contribution_ids(conn: sqlite3.Connection, round_id: int) -> list[bytes]:
    """The ids of the contributions a round used, in store order: the Merkle tree's leaves."""
    return [
        bytes(r[0])
        for r in conn.execute(
            "SELECT c.id FROM round_contributions rc JOIN contributions c "
            "ON c.seq = rc.contribution_seq WHERE rc.round_id=? ORDER BY c.seq",
            (round_id,),
        )
    ]


def append_record(
    conn: sqlite3.Connection, identity: Identity, round_id: int, fields: dict[str, Any]
) -> LedgerEntry:
    """Sign and store the record of ``round_id``, chained to the last record. Runs inside the
    transaction that finishes the round, so a round is finished if and only if it has one."""
    last = conn.execute(
        "SELECT round_id, hash FROM ledger ORDER BY round_id DESC LIMIT 1"
    ).fetchone()
    if last is not None and last[0] >= round_id:
        raise RuntimeError(f"ledger already has round {last[0]}; cannot append round {round_id}")
    ids = round_contribution_ids(conn, round_id)
    consumed = [
        bytes(r[0])
        for r in conn.execute(
            "SELECT c.id FROM consumed x JOIN contributions c ON c.seq = x.contribution_seq "
            "WHERE x.round_id=? ORDER BY c.seq",
            (round_id,),
        )
    ]
    record = {
        **fields,
        "version": RECORD_VERSION,
        "round_id": round_id,
        "prev_hash": (bytes(last[1]) if last else GENESIS_HASH).hex(),
        "coordinator": identity.public_key.hex(),
        "contributions": {"count": len(ids), "merkle_root": MerkleTree(ids).root.hex()},
    }
    record["consumed"] = dict(record.get("consumed", {})) | {
        "count": len(consumed),
        "merkle_root": MerkleTree(consumed).root.hex(),
    }
    data, signature = sign_record(identity.sign, record)
    entry = LedgerEntry(round_id, data, signature)
    conn.execute(
        "INSERT INTO ledger(round_id, record, signature, hash) VALUES (?, ?, ?, ?)",
        (round_id, data, signature, entry.hash),
    )
    return entry


def ledger_entries(store: Store, after_round_id: int = 0, limit: int = 1000) -> list[LedgerEntry]:
    return [
        LedgerEntry(rid, bytes(rec), bytes(sig))
        for rid, rec, sig in store.query(
            "SELECT round_id, record, signature FROM ledger WHERE round_id > ? "
            "ORDER BY round_id LIMIT ?",
            (after_round_id, limit),
        )
    ]


def inclusion_proofs(store: Store, ids: list[bytes]) -> list[dict[str, Any]]:
    """For each contribution id, one proof per round that used it (none for an id that no
    round used yet, or that the coordinator does not hold). Each round's tree is built once."""
    rounds: dict[int, list[bytes]] = {}
    conn = store.reader()
    for cid, rid in _lookup(
        conn,
        "SELECT c.id, rc.round_id FROM contributions c JOIN round_contributions rc "
        "ON rc.contribution_seq = c.seq JOIN ledger l ON l.round_id = rc.round_id "
        "WHERE c.id IN ({})",
        sorted(set(ids)),
    ):
        rounds.setdefault(rid, []).append(bytes(cid))
    out = []
    for rid in sorted(rounds):
        tree = MerkleTree(round_contribution_ids(conn, rid))
        for cid in rounds[rid]:
            i = tree.index[cid]
            out.append(
                {
                    "contribution_id": cid,
                    "round_id": rid,
                    "leaf_index": i,
                    "tree_size": len(tree.ids),
                    "path": tree.proof(i),
                }
            )
    return out


def ledger_json(store: Store) -> list[dict[str, Any]]:
    return [json.loads(e.record) for e in ledger_entries(store, 0, 1 << 62)]


def decided_rounds(store: Store, before_round_id: int) -> list[DecidedRound]:
    """The finished rounds before ``before_round_id``, as the points rule replays them: read
    from their signed ledger records, exactly as a verifying node reads them. Every finished
    round must have its record (a round is finished in the transaction that writes it)."""
    entries = [e for e in ledger_entries(store, 0, 1 << 62) if e.round_id < before_round_id]
    finished = [
        r[0]
        for r in store.query(
            "SELECT round_id FROM rounds WHERE status='finished' AND round_id < ? "
            "ORDER BY round_id",
            (before_round_id,),
        )
    ]
    if [e.round_id for e in entries] != finished:
        missing = sorted(set(finished) - {e.round_id for e in entries})
        raise StoreError(
            f"{store.path}: finished rounds {missing[:5]} have no ledger record, so their points "
            "cannot be replayed (a store from before the ledger existed: start a new one)"
        )
    return [DecidedRound.from_record(json.loads(e.record)) for e in entries]
