"""The node's local state: pinned coordinator keys, signed contributions waiting for a receipt,
and the receipts themselves (SQLite, one file per identity).

A contribution is signed once and its exact bytes are kept until a receipt for it arrives, so a
retry after a crash or a lost answer resends the same bytes and the coordinator answers
ALREADY_EXISTS with the original receipt: submitting is idempotent.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from crowdsft.errors import CrowdSFTError

if TYPE_CHECKING:
    from crowdsft.ledger import LedgerEntry, SignedHead, SignedTreeHead

SCHEMA = """
CREATE TABLE IF NOT EXISTS coordinators (
    address TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    first_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS submissions (
    coordinator_key BLOB NOT NULL,
    chunk_key BLOB NOT NULL,
    contribution_id BLOB NOT NULL,
    payload BLOB NOT NULL,
    signature BLOB NOT NULL,
    example_count INTEGER NOT NULL,
    source TEXT NOT NULL,
    receipt BLOB,
    receipt_signature BLOB,
    accepted_at_ms INTEGER,
    PRIMARY KEY (coordinator_key, chunk_key)
);
-- The last ledger head this node verified, per coordinator key: the coordinator's signed
-- record of that round (crowdsft.ledger.SignedHead).
CREATE TABLE IF NOT EXISTS ledger_heads (
    coordinator_key BLOB PRIMARY KEY,
    round_id INTEGER NOT NULL,
    record BLOB NOT NULL,
    signature BLOB NOT NULL,
    verified_at_ms INTEGER NOT NULL
);
-- The last signed tree head (docs/protocol.md 11.8) this node verified, per coordinator key.
CREATE TABLE IF NOT EXISTS tree_heads (
    coordinator_key BLOB PRIMARY KEY,
    head BLOB NOT NULL,
    signature BLOB NOT NULL,
    verified_at_ms INTEGER NOT NULL
);
-- Proof that a coordinator rewrote its ledger: a signed record it no longer shows (kind
-- "rollback"), or two signed records of one round (kind "fork"; the second pair set).
CREATE TABLE IF NOT EXISTS ledger_evidence (
    id INTEGER PRIMARY KEY,
    coordinator_key BLOB NOT NULL,
    kind TEXT NOT NULL,
    round_id INTEGER NOT NULL,
    record BLOB NOT NULL,
    signature BLOB NOT NULL,
    other_record BLOB,
    other_signature BLOB,
    found_at_ms INTEGER NOT NULL,
    UNIQUE (coordinator_key, kind, round_id, record, other_record)
);
"""


def default_home() -> Path:
    """``$CROWDSFT_HOME``, else the platform's data folder for crowdsft (``platformdirs``):
    ``$XDG_DATA_HOME/crowdsft`` or ``~/.local/share/crowdsft`` on Linux,
    ``~/Library/Application Support/crowdsft`` on macOS, ``%LOCALAPPDATA%\\crowdsft`` on
    Windows."""
    if os.environ.get("CROWDSFT_HOME"):
        return Path(os.environ["CROWDSFT_HOME"])
    import platformdirs

    return Path(platformdirs.user_data_dir("crowdsft", appauthor=False))


def default_key_path() -> Path:
    return default_home() / "node.key"


_COLUMNS = (
    "chunk_key, contribution_id, payload, signature, example_count, source, receipt, "
    "receipt_signature, accepted_at_ms"
)


@dataclass(frozen=True)
class Submission:
    chunk_key: bytes
    contribution_id: bytes
    payload: bytes
    signature: bytes
    example_count: int
    source: str
    receipt: bytes | None = None
    receipt_signature: bytes | None = None
    accepted_at_ms: int | None = None


class KeyMismatchError(CrowdSFTError):
    """The coordinator at an address presents another key than the one pinned for it."""


class NodeState:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)

    @classmethod
    def for_node(cls, node_id: str, home: Path | None = None) -> NodeState:
        return cls((home or default_home()) / "nodes" / node_id / "state.sqlite3")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> NodeState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pin_coordinator(self, address: str, public_key: bytes, now_ms: int) -> bool:
        """Pin the coordinator key on first contact (trust on first use). Returns True when the
        key is new; raises KeyMismatchError when the address presents a different key."""
        row = self.conn.execute(
            "SELECT public_key FROM coordinators WHERE address=?", (address,)
        ).fetchone()
        if row is None:
            self.conn.execute(
                "INSERT INTO coordinators(address, public_key, first_seen_ms) VALUES (?, ?, ?)",
                (address, public_key, now_ms),
            )
            return True
        if row[0] != public_key:
            raise KeyMismatchError(
                f"the coordinator at {address} presents key {public_key.hex()[:16]}..., but this "
                f"node pinned {row[0].hex()[:16]}... there; if the operator really changed keys, "
                f"run with --trust-new-coordinator-key"
            )
        return False

    def pin(self, address: str, public_key: bytes, now_ms: int, trust_new: bool) -> None:
        """``pin_coordinator``, or with ``trust_new`` accept a changed key deliberately."""
        if trust_new:
            self.repin_coordinator(address, public_key, now_ms)
        else:
            self.pin_coordinator(address, public_key, now_ms)

    def pinned_key(self, address: str) -> bytes | None:
        """The coordinator key pinned for ``address``, if any."""
        row = self.conn.execute(
            "SELECT public_key FROM coordinators WHERE address=?", (address,)
        ).fetchone()
        return bytes(row[0]) if row else None

    def repin_coordinator(self, address: str, public_key: bytes, now_ms: int) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO coordinators(address, public_key, first_seen_ms) "
            "VALUES (?, ?, ?)",
            (address, public_key, now_ms),
        )

    def get(self, coordinator_key: bytes, chunk_key: bytes) -> Submission | None:
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM submissions WHERE coordinator_key=? AND chunk_key=?",
            (coordinator_key, chunk_key),
        ).fetchone()
        return Submission(*row) if row else None

    def put_pending(self, coordinator_key: bytes, sub: Submission) -> None:
        """Store a signed, unsent contribution (replacing an unreceipted one for the same chunk)."""
        self.conn.execute(
            "INSERT OR REPLACE INTO submissions(coordinator_key, chunk_key, contribution_id, "
            "payload, "
            "signature, example_count, source) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                coordinator_key,
                sub.chunk_key,
                sub.contribution_id,
                sub.payload,
                sub.signature,
                sub.example_count,
                sub.source,
            ),
        )

    def put_pending_many(self, coordinator_key: bytes, subs: list[Submission]) -> None:
        with self.transaction():
            for sub in subs:
                self.put_pending(coordinator_key, sub)

    def record_receipt(
        self,
        coordinator_key: bytes,
        chunk_key: bytes,
        receipt: bytes,
        signature: bytes,
        accepted_at_ms: int,
    ) -> None:
        self.conn.execute(
            "UPDATE submissions SET receipt=?, receipt_signature=?, accepted_at_ms=? "
            "WHERE coordinator_key=? AND chunk_key=?",
            (receipt, signature, accepted_at_ms, coordinator_key, chunk_key),
        )

    def receipts(self, coordinator_key: bytes) -> list[Submission]:
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM submissions "
            "WHERE coordinator_key=? AND receipt IS NOT NULL ORDER BY accepted_at_ms",
            (coordinator_key,),
        ).fetchall()
        return [Submission(*r) for r in rows]

    def ledger_head(self, coordinator_key: bytes) -> SignedHead | None:
        """The last ledger head this node verified for ``coordinator_key``."""
        from crowdsft.ledger import SignedHead

        row = self.conn.execute(
            "SELECT round_id, record, signature FROM ledger_heads WHERE coordinator_key=?",
            (coordinator_key,),
        ).fetchone()
        return SignedHead(coordinator_key, row[0], bytes(row[1]), bytes(row[2])) if row else None

    def remember_head(self, head: SignedHead, now_ms: int) -> None:
        """Remember ``head`` as verified; a head never moves back to an earlier round."""
        known = self.ledger_head(head.coordinator_key)
        if known is not None and known.round_id > head.round_id:
            return
        self.conn.execute(
            "INSERT OR REPLACE INTO ledger_heads(coordinator_key, round_id, record, signature, "
            "verified_at_ms) VALUES (?, ?, ?, ?, ?)",
            (head.coordinator_key, head.round_id, head.record, head.signature, now_ms),
        )

    def tree_head(self, coordinator_key: bytes) -> SignedTreeHead | None:
        """The last signed tree head this node verified for ``coordinator_key``."""
        from crowdsft.ledger import SignedTreeHead

        row = self.conn.execute(
            "SELECT head, signature FROM tree_heads WHERE coordinator_key=?", (coordinator_key,)
        ).fetchone()
        return SignedTreeHead(coordinator_key, bytes(row[0]), bytes(row[1])) if row else None

    def remember_tree_head(self, head: SignedTreeHead, now_ms: int) -> None:
        """Remember ``head`` as verified; never one of a smaller tree than the one held."""
        known = self.tree_head(head.coordinator_key)
        if known is not None and known.size > head.size:
            return
        self.conn.execute(
            "INSERT OR REPLACE INTO tree_heads(coordinator_key, head, signature, verified_at_ms) "
            "VALUES (?, ?, ?, ?)",
            (head.coordinator_key, head.head, head.signature, now_ms),
        )

    def _keep(
        self,
        key: bytes,
        kind: str,
        round_id: int,
        signed: tuple[bytes, bytes],
        other: tuple[bytes, bytes] | None,
        now_ms: int,
    ) -> None:
        """One piece of evidence (once): a signed statement, and the one it contradicts."""
        self.conn.execute(
            "INSERT OR IGNORE INTO ledger_evidence(coordinator_key, kind, round_id, record, "
            "signature, other_record, other_signature, found_at_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, kind, round_id, *signed, *(other or (None, None)), now_ms),
        )

    def keep_tree_evidence(
        self, kind: str, known: SignedTreeHead, new: SignedTreeHead, now_ms: int
    ) -> None:
        """Keep two signed tree heads that prove a rollback or a fork (kind "tree-<kind>")."""
        pair = (known.head, known.signature), (new.head, new.signature)
        self._keep(known.coordinator_key, f"tree-{kind}", known.size, *pair, now_ms)

    def keep_evidence(
        self, kind: str, head: SignedHead, other: LedgerEntry | None, now_ms: int
    ) -> None:
        """Keep the signed records that prove a rollback or a fork (once each)."""
        theirs = (other.record, other.signature) if other else None
        signed = (head.record, head.signature)
        self._keep(head.coordinator_key, kind, head.round_id, signed, theirs, now_ms)

    def evidence(self, coordinator_key: bytes) -> list[dict[str, object]]:
        """The proof kept against ``coordinator_key``, oldest first, as JSON-ready dicts."""
        from crowdsft.ledger import SignedHead

        out: list[dict[str, object]] = []
        for kind, rid, rec, sig, orec, osig, at in self.conn.execute(
            "SELECT kind, round_id, record, signature, other_record, other_signature, "
            "found_at_ms FROM ledger_evidence WHERE coordinator_key=? ORDER BY id",
            (coordinator_key,),
        ):
            item: dict[str, object] = {"kind": kind, "round_id": rid, "found_at_ms": at}
            if kind.startswith("tree-"):  # two signed tree heads (docs/protocol.md 11.8)
                for name, head, signature in (("head", rec, sig), ("other", orec, osig)):
                    item[name] = {
                        "tree_head": bytes(head).decode("utf-8"),
                        "signature": bytes(signature).hex(),
                    }
                out.append(item)
                continue
            item["head"] = SignedHead(coordinator_key, rid, bytes(rec), bytes(sig)).as_dict()
            if orec is not None:
                item["other"] = SignedHead(coordinator_key, rid, bytes(orec), bytes(osig)).as_dict()
            out.append(item)
        return out

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
