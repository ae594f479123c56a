"""Admission policies: who may register and submit.

* ``open``: every node with a valid signature.
* ``allowlist``: only the node ids or public keys listed in the config (or a file).
* ``invite``: nodes that registered with an invite token the operator issued
  (``crowdsft coordinator invite``); a token admits one node, once, until it expires.

A policy is built with ``factory(config=AdmissionConfig, base_dir=Path, store=Store)``. The
coordinator calls ``check(node_id)`` before it serves a node's request, and
``admit_registration(conn, node_id, invite_token)`` inside the transaction that registers a
node; both raise ``NotAdmittedError`` (PERMISSION_DENIED) with a reason the node can act on.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from crowdsft.errors import ConfigError, NotAdmittedError
from crowdsft.node.keys import node_id_from_public_key

from .hookspecs import Register, hookimpl

_NODE_ID = re.compile(r"^[0-9a-f]{32}$")
_PUBLIC_KEY = re.compile(r"^[0-9a-f]{64}$")
TOKEN_PREFIX = "csft-"


class AdmissionPolicy:
    """Admits every node; subclasses narrow it down."""

    def __init__(self, config: Any = None, base_dir: Path | None = None, store: Any = None):
        self.config = config
        self.base_dir = base_dir or Path.cwd()
        self.store = store

    def check(self, node_id: str) -> None:
        """Raise NotAdmittedError unless ``node_id`` may be served."""

    def admit_registration(self, conn: sqlite3.Connection, node_id: str, invite_token: str) -> None:
        """Decide a registration, inside its transaction (may write, e.g. spend a token)."""
        self.check(node_id)


class OpenAdmission(AdmissionPolicy):
    """Every node with a valid signature."""


def read_allowlist(entries: tuple[str, ...], file: Path | None) -> frozenset[str]:
    """Node ids from config entries and an optional file: node ids or hex public keys."""
    lines: list[tuple[str, str]] = [(e, "admission.allowlist") for e in entries]
    if file is not None:
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read allowlist file {file}: {exc.strerror}") from None
        for n, line in enumerate(text.splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if entry:
                lines.append((entry, f"{file}:{n}"))
    ids = set()
    for entry, where in lines:
        e = entry.lower()
        if _NODE_ID.match(e):
            ids.add(e)
        elif _PUBLIC_KEY.match(e):
            ids.add(node_id_from_public_key(bytes.fromhex(e)))
        else:
            raise ConfigError(
                f"{where}: {entry!r} is neither a node id (32 hex) nor a public key (64 hex)"
            )
    return frozenset(ids)


class AllowlistAdmission(AdmissionPolicy):
    """Only the node ids or public keys in admission.allowlist / admission.allowlist_file."""

    def __init__(self, config: Any = None, base_dir: Path | None = None, store: Any = None):
        super().__init__(config, base_dir, store)
        entries = tuple(getattr(config, "allowlist", ()) or ())
        file = getattr(config, "allowlist_file", None)
        if file is not None and not file.is_absolute():
            file = self.base_dir / file
        self.allowed = read_allowlist(entries, file)

    def check(self, node_id: str) -> None:
        if node_id not in self.allowed:
            raise NotAdmittedError(
                f"node {node_id} is not on this coordinator's allowlist; ask the operator to add it"
            )


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.strip().encode()).digest()


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


class InviteAdmission(AdmissionPolicy):
    """Nodes that registered with a single-use, expiring invite token from the operator."""

    def __init__(self, config: Any = None, base_dir: Path | None = None, store: Any = None):
        super().__init__(config, base_dir, store)
        if store is None:
            raise ConfigError("the invite admission policy needs the coordinator's store")
        self._admitted: set[str] = set()
        self._lock = threading.Lock()

    def _is_admitted(self, node_id: str) -> bool:
        with self._lock:
            if node_id in self._admitted:
                return True
        rows = self.store.query("SELECT 1 FROM invites WHERE used_by=? LIMIT 1", (node_id,))
        if rows:
            with self._lock:
                self._admitted.add(node_id)
        return bool(rows)

    def check(self, node_id: str) -> None:
        if not self._is_admitted(node_id):
            raise NotAdmittedError(
                f"node {node_id} has not been admitted: this coordinator admits by invitation; "
                f"register once with `crowdsft node register --invite TOKEN`"
            )

    def admit_registration(self, conn: sqlite3.Connection, node_id: str, invite_token: str) -> None:
        if conn.execute("SELECT 1 FROM invites WHERE used_by=? LIMIT 1", (node_id,)).fetchone():
            return  # admitted before: re-registering needs no new token
        if not invite_token.strip():
            raise NotAdmittedError(
                "this coordinator admits by invitation; register with --invite TOKEN "
                "(ask the operator for a token)"
            )
        row = conn.execute(
            "SELECT expires_ms, used_by FROM invites WHERE token_hash=?",
            (token_hash(invite_token),),
        ).fetchone()
        if row is None:
            raise NotAdmittedError("the invite token is not valid for this coordinator")
        expires_ms, used_by = row
        if used_by is not None:
            raise NotAdmittedError("the invite token has already been used")
        now = time.time_ns() // 1_000_000
        if now >= expires_ms:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires_ms / 1000))
            raise NotAdmittedError(f"the invite token expired at {when}; ask for a new one")
        conn.execute(
            "UPDATE invites SET used_by=?, used_ms=? WHERE token_hash=? AND used_by IS NULL",
            (node_id, now, token_hash(invite_token)),
        )


@hookimpl
def crowdsft_register_admission(register: Register) -> None:
    register("open", OpenAdmission)
    register("allowlist", AllowlistAdmission)
    register("invite", InviteAdmission)
