"""Invite tokens in the store: issuing them, and the narrow ``InviteBook`` through which the
``invite`` admission policy reads and spends them (plugins never get a connection).

Only the SHA-256 of a token is stored; the token itself is shown once, to the operator.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from crowdsft.plugins.admission import TOKEN_PREFIX, token_hash

from .db import Store

Query = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]


def issue_invites(
    conn: sqlite3.Connection, count: int, ttl_s: float, note: str = "", now_ms: int | None = None
) -> list[tuple[str, int]]:
    """Create ``count`` single-use tokens valid for ``ttl_s`` seconds; returns (token,
    expires_ms) pairs. Only their hashes are stored."""
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    expires = now + int(ttl_s * 1000)
    out = []
    for _ in range(count):
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        conn.execute(
            "INSERT INTO invites(token_hash, created_ms, expires_ms, note) VALUES (?, ?, ?, ?)",
            (token_hash(token), now, expires, note),
        )
        out.append((token, expires))
    return out


class InviteBook:
    """The invites table, as an admission policy sees it (``plugins.admission.Invites``):
    read through the store, or inside the registration's transaction (``in_transaction``),
    where ``spend`` writes."""

    def __init__(self, query: Query, conn: sqlite3.Connection | None = None) -> None:
        self._query = query
        self._conn = conn

    @classmethod
    def of(cls, store: Store) -> InviteBook:
        return cls(store.query)

    @classmethod
    def in_transaction(cls, conn: sqlite3.Connection) -> InviteBook:
        return cls(lambda sql, params: conn.execute(sql, params).fetchall(), conn)

    def admitted(self, node_id: str) -> bool:
        """Whether ``node_id`` registered with a token before."""
        return bool(self._query("SELECT 1 FROM invites WHERE used_by=? LIMIT 1", (node_id,)))

    def lookup(self, digest: bytes) -> tuple[int, str | None] | None:
        """(expires_ms, used_by) of the token with this hash, or None."""
        rows = self._query("SELECT expires_ms, used_by FROM invites WHERE token_hash=?", (digest,))
        return (int(rows[0][0]), rows[0][1]) if rows else None

    def spend(self, digest: bytes, node_id: str, now_ms: int) -> None:
        """Mark a token used by ``node_id`` (only inside the registration's transaction)."""
        if self._conn is None:
            raise RuntimeError("an invite can only be spent inside a registration")
        self._conn.execute(
            "UPDATE invites SET used_by=?, used_ms=? WHERE token_hash=? AND used_by IS NULL",
            (node_id, now_ms, digest),
        )
