"""Admission policies: who may register and submit.

* ``open``: every node with a valid signature.
* ``allowlist``: only the node ids or public keys listed in the config (or a file).
* ``invite``: nodes that registered with an invite token the operator issued
  (``crowdsft coordinator invite``); a token admits one node, once, until it expires.

A policy is built with ``factory(config=AdmissionConfig, base_dir=Path, invites=Invites)``.
The coordinator calls ``check(node_id)`` before it serves a node's request, and
``admit_registration(invites, node_id, invite_token)`` inside the transaction that registers a
node, with an ``Invites`` bound to that transaction; both raise ``NotAdmittedError``
(PERMISSION_DENIED) with a reason the node can act on. A policy never sees the database: the
invite table reaches it only through the narrow ``Invites`` interface.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from crowdsft.errors import ConfigError, NotAdmittedError
from crowdsft.keys import node_id_from_public_key

from .hookspecs import Register, hookimpl

_NODE_ID = re.compile(r"^[0-9a-f]{32}$")
_PUBLIC_KEY = re.compile(r"^[0-9a-f]{64}$")
TOKEN_PREFIX = "csft-"


class Invites(Protocol):
    """The coordinator's invite tokens, as a policy may use them (by their SHA-256)."""

    def admitted(self, node_id: str) -> bool:
        """Whether ``node_id`` registered with a token before."""
        ...

    def lookup(self, digest: bytes) -> tuple[int, str | None] | None:
        """``(expires_ms, used_by)`` of the token with this hash, or None."""
        ...

    def spend(self, digest: bytes, node_id: str, now_ms: int) -> None:
        """Mark the token used by ``node_id`` (only inside a registration)."""
        ...


class AdmissionPolicy:
    """Admits every node; subclasses narrow it down."""

    def __init__(
        self, config: Any = None, base_dir: Path | None = None, invites: Invites | None = None
    ):
        self.config = config
        self.base_dir = base_dir or Path.cwd()
        self.invites = invites

    def check(self, node_id: str) -> None:
        """Raise NotAdmittedError unless ``node_id`` may be served."""

    def admit_registration(self, invites: Invites, node_id: str, invite_token: str) -> None:
        """Decide a registration, inside its transaction (``invites`` is bound to it and may
        write, e.g. spend a token)."""
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

    def __init__(
        self, config: Any = None, base_dir: Path | None = None, invites: Invites | None = None
    ):
        super().__init__(config, base_dir, invites)
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


class InviteAdmission(AdmissionPolicy):
    """Nodes that registered with a single-use, expiring invite token from the operator."""

    def __init__(
        self, config: Any = None, base_dir: Path | None = None, invites: Invites | None = None
    ):
        super().__init__(config, base_dir, invites)
        if invites is None:
            raise ConfigError("the invite admission policy needs the coordinator's invites")
        self.book: Invites = invites
        self._admitted: set[str] = set()
        self._lock = threading.Lock()

    def _is_admitted(self, node_id: str) -> bool:
        with self._lock:
            if node_id in self._admitted:
                return True
        admitted = self.book.admitted(node_id)
        if admitted:
            with self._lock:
                self._admitted.add(node_id)
        return admitted

    def check(self, node_id: str) -> None:
        if not self._is_admitted(node_id):
            raise NotAdmittedError(
                f"node {node_id} has not been admitted: this coordinator admits by invitation; "
                f"register once with `crowdsft node register --invite TOKEN`"
            )

    def admit_registration(self, invites: Invites, node_id: str, invite_token: str) -> None:
        if invites.admitted(node_id):
            return  # admitted before: re-registering needs no new token
        if not invite_token.strip():
            raise NotAdmittedError(
                "this coordinator admits by invitation; register with --invite TOKEN "
                "(ask the operator for a token)"
            )
        digest = token_hash(invite_token)
        row = invites.lookup(digest)
        if row is None:
            raise NotAdmittedError("the invite token is not valid for this coordinator")
        expires_ms, used_by = row
        if used_by is not None:
            raise NotAdmittedError("the invite token has already been used")
        now = time.time_ns() // 1_000_000
        if now >= expires_ms:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires_ms / 1000))
            raise NotAdmittedError(f"the invite token expired at {when}; ask for a new one")
        invites.spend(digest, node_id, now)


@hookimpl
def crowdsft_register_admission(register: Register) -> None:
    register("open", OpenAdmission)
    register("allowlist", AllowlistAdmission)
    register("invite", InviteAdmission)
