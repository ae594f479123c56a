"""The coordinator's domain logic, free of gRPC: verify, validate, store, sign receipts.

The gRPC servicer is a thin adapter over this class; tests and the benchmark can drive it
directly. Every rejection raises a ProtocolError subclass whose ``status_name`` is the gRPC
status that answers it, and nothing is written for a rejected request.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from crowdsft import PROTOCOL, __version__
from crowdsft.config import CoordinatorConfig
from crowdsft.errors import (
    DuplicateContributionError,
    DuplicateExampleError,
    InvalidPayloadError,
    ProtocolError,
    ReplayError,
)
from crowdsft.node.envelope import Verified, contribution_id, now_ms, sign_receipt, verify_envelope
from crowdsft.node.keys import Identity
from crowdsft.plugins.manager import Plugins, get_plugins
from crowdsft.v1 import contribution_pb2, coordinator_pb2, envelope_pb2
from crowdsft.validation import (
    MAX_NONCE_BYTES,
    MIN_NONCE_BYTES,
    example_dicts,
    fingerprints,
    payload_problems,
)

from .admission import RateLimiter
from .ledger import LedgerEntry, inclusion_proofs, ledger_entries
from .store import BatchOp, Done, Store

logger = logging.getLogger(__name__)

MAX_DISPLAY_NAME = 64
LEDGER_PAGE = 256
MAX_PROOF_IDS = 4096


@dataclass
class IngestCounters:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0


class CoordinatorService:
    """Everything the coordinator does with node requests."""

    def __init__(
        self,
        config: CoordinatorConfig,
        identity: Identity,
        store: Store,
        plugins: Plugins | None = None,
    ) -> None:
        self.config = config
        self.plugins = plugins or get_plugins()
        self.identity = identity
        self.public_key = identity.public_key
        self.store = store
        self.limits = config.protocol.limits()
        self.window_ms = config.protocol.timestamp_window_s * 1000
        self.admission = self.plugins.create(
            "admission",
            config.admission.policy,
            config=config.admission,
            base_dir=config.base_dir,
            store=store,
        )
        self.rate_limiter = RateLimiter(config.rate_limit)
        if config.admission.reject_duplicate_examples:
            backfill_fingerprints(store)
        self.counters = IngestCounters()
        self._counters_lock = threading.Lock()

    # -- helpers ------------------------------------------------------------------------------

    def _check_time(self, ts_ms: int, now: int) -> None:
        skew = ts_ms - now
        if abs(skew) > self.window_ms:
            direction = "ahead of" if skew > 0 else "behind"
            raise ReplayError(
                f"timestamp is {abs(skew) / 1000:.1f}s {direction} the coordinator clock; "
                f"the window is ±{self.config.protocol.timestamp_window_s}s (stale or replayed "
                "envelope, or a wrong clock)"
            )

    @staticmethod
    def _check_nonce_shape(nonce: bytes) -> None:
        if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
            raise InvalidPayloadError(
                f"nonce has {len(nonce)} bytes; it must have {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES}"
            )

    @staticmethod
    def _check_nonce_unused(conn: sqlite3.Connection, node_id: str, nonce: bytes) -> None:
        seen = conn.execute(
            "SELECT 1 FROM nonces WHERE nonce=? AND node_id=?", (nonce, node_id)
        ).fetchone()
        if seen:
            raise ReplayError(f"nonce {nonce.hex()} was already used by node {node_id} (replay)")

    @staticmethod
    def _record_nonce(conn: sqlite3.Connection, node_id: str, nonce: bytes, ts_ms: int) -> None:
        conn.execute(
            "INSERT INTO nonces(nonce, node_id, ts_ms) VALUES (?, ?, ?)", (nonce, node_id, ts_ms)
        )

    def _use_nonce(self, conn: sqlite3.Connection, node_id: str, nonce: bytes, ts_ms: int) -> None:
        """Record a nonce; ReplayError (and nothing written) if this node used it before."""
        self._check_nonce_unused(conn, node_id, nonce)
        self._record_nonce(conn, node_id, nonce, ts_ms)

    @staticmethod
    def _ensure_node(conn: sqlite3.Connection, v: Verified, now: int) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO nodes(node_id, public_key, registered_at_ms) VALUES (?, ?, ?)",
            (v.node_id, v.public_key, now),
        )

    def _run_validators(self, node_id: str, payload: contribution_pb2.ContributionPayload) -> None:
        """Ask the plugins' ``crowdsft_validate_contribution`` hooks (if any plugin has one)."""
        if not self.plugins.pm.hook.crowdsft_validate_contribution.get_hookimpls():
            return
        reasons = self.plugins.validate_contribution(node_id, example_dicts(payload))
        if reasons:
            raise InvalidPayloadError("rejected by a validation plugin: " + "; ".join(reasons))

    # -- RPCs ---------------------------------------------------------------------------------

    def info(self) -> coordinator_pb2.CoordinatorInfo:
        p = self.config.protocol
        return coordinator_pb2.CoordinatorInfo(
            public_key=self.public_key,
            protocol=PROTOCOL,
            admission_policy=self.config.admission.policy,
            max_examples_per_contribution=p.max_examples_per_contribution,
            max_field_bytes=p.max_field_bytes,
            max_message_bytes=p.max_message_bytes,
            timestamp_window_s=p.timestamp_window_s,
            server_version=__version__,
        )

    def submit_async(
        self, envelope: envelope_pb2.SignedEnvelope
    ) -> Future[envelope_pb2.SignedReceipt]:
        """Verify and validate now (raising ProtocolError), then queue the durable write.

        The returned future yields the signed receipt once the contribution is committed, or
        raises DuplicateContributionError (carrying the original receipt), ReplayError or
        RateLimitedError.
        """
        return self.store.submit(self.prepare(envelope))

    def submit_with(self, envelope: envelope_pb2.SignedEnvelope, done: Done) -> None:
        """``submit_async`` with a callback instead of a future: ``done(ok, value)`` runs on the
        store's writer thread after the commit, also for rejections found before the write."""
        try:
            op = self.prepare(envelope)
        except ProtocolError as exc:
            # Through the writer all the same, so that results keep the submission order.
            self.store.submit_with(_Failed(exc), done)
            return
        self.store.submit_with(op, done)

    def prepare(self, envelope: envelope_pb2.SignedEnvelope) -> ContributionWrite:
        """Verify the signature, admission and payload of a contribution (raising
        ProtocolError); return its durable write, not yet queued."""
        try:
            verified, payload = verify_envelope(envelope, contribution_pb2.ContributionPayload)
            self.admission.check(verified.node_id)
            problems = payload_problems(payload, self.limits)
            if problems:
                raise InvalidPayloadError("; ".join(problems))
            self._run_validators(verified.node_id, payload)
        except ProtocolError as exc:
            with self._counters_lock:
                self.counters.rejected += 1
            logger.info("rejected contribution: %s: %s", exc.status_name, exc)
            raise
        return ContributionWrite(
            service=self,
            verified=verified,
            cid=contribution_id(verified.payload_bytes),
            n_examples=len(payload.examples),
            nonce=payload.nonce,
            ts_ms=payload.timestamp_ms,
            fingerprints=tuple(fingerprints(payload))
            if self.config.admission.reject_duplicate_examples
            else (),
        )

    def submit(
        self, envelope: envelope_pb2.SignedEnvelope, timeout: float = 60
    ) -> envelope_pb2.SignedReceipt:
        return self.submit_async(envelope).result(timeout)

    def _authenticated(
        self, envelope: envelope_pb2.SignedEnvelope, message_type, check_admission: bool = True
    ):
        verified, payload = verify_envelope(envelope, message_type)
        if check_admission:
            self.admission.check(verified.node_id)
        self._check_nonce_shape(payload.nonce)
        self._check_time(payload.timestamp_ms, now_ms())
        return verified, payload

    def register(
        self, envelope: envelope_pb2.SignedEnvelope
    ) -> coordinator_pb2.RegisterNodeResponse:
        # Admission is decided inside the write: a policy may spend an invite token there.
        verified, payload = self._authenticated(
            envelope, contribution_pb2.RegisterPayload, check_admission=False
        )
        name = payload.display_name.strip()
        if len(name) > MAX_DISPLAY_NAME:
            raise InvalidPayloadError(f"display_name is longer than {MAX_DISPLAY_NAME} characters")

        def op(conn: sqlite3.Connection) -> coordinator_pb2.RegisterNodeResponse:
            self._check_nonce_unused(conn, verified.node_id, payload.nonce)
            # Last check, and it may write (spend a token): nothing is written if it refuses.
            self.admission.admit_registration(conn, verified.node_id, payload.invite_token)
            self._record_nonce(conn, verified.node_id, payload.nonce, payload.timestamp_ms)
            row = conn.execute(
                "SELECT registered_at_ms FROM nodes WHERE node_id=?", (verified.node_id,)
            ).fetchone()
            if row:
                if name:
                    conn.execute(
                        "UPDATE nodes SET display_name=? WHERE node_id=?", (name, verified.node_id)
                    )
                return coordinator_pb2.RegisterNodeResponse(
                    node_id=verified.node_id, registered_at_ms=row[0], newly_registered=False
                )
            now = now_ms()
            conn.execute(
                "INSERT INTO nodes(node_id, public_key, display_name, registered_at_ms) "
                "VALUES (?, ?, ?, ?)",
                (verified.node_id, verified.public_key, name, now),
            )
            logger.info("registered node %s%s", verified.node_id, f" ({name})" if name else "")
            return coordinator_pb2.RegisterNodeResponse(
                node_id=verified.node_id, registered_at_ms=now, newly_registered=True
            )

        return self.store.write(op)

    def node_status(self, envelope: envelope_pb2.SignedEnvelope) -> coordinator_pb2.NodeStatus:
        """A node's standing. The request is signed and its nonce is spent, so that a status
        request cannot be replayed to watch another node's standing."""
        verified, payload = self._authenticated(envelope, contribution_pb2.StatusRequestPayload)
        self.store.write(
            lambda conn: self._use_nonce(
                conn, verified.node_id, payload.nonce, payload.timestamp_ms
            )
        )
        return self.status_of(verified.node_id)

    def status_of(self, node_id: str) -> coordinator_pb2.NodeStatus:
        node = self.store.query(
            "SELECT registered_at_ms, display_name, points FROM nodes WHERE node_id=?", (node_id,)
        )
        counts = self.store.query(
            "SELECT COUNT(*), COALESCE(SUM(example_count), 0) FROM contributions WHERE node_id=?",
            (node_id,),
        )[0]
        status = coordinator_pb2.NodeStatus(
            node_id=node_id, contributions=counts[0], examples=counts[1]
        )
        if node:
            status.registered = True
            status.registered_at_ms, status.display_name, status.points = node[0]
        for part in participation(self.store, node_id):
            status.rounds.add(**part)
        return status

    def ledger(self, after_round_id: int) -> list[LedgerEntry]:
        """The next page of signed round records after ``after_round_id``."""
        return ledger_entries(self.store, after_round_id, LEDGER_PAGE)

    def inclusion_proofs(self, ids: list[bytes]) -> coordinator_pb2.InclusionProofs:
        if len(ids) > MAX_PROOF_IDS:
            raise InvalidPayloadError(
                f"at most {MAX_PROOF_IDS} contribution ids per request; got {len(ids)}"
            )
        bad = [i for i in ids if len(i) != 32]
        if bad:
            raise InvalidPayloadError(
                f"{len(bad)} contribution id(s) are not 32 bytes (SHA-256 of the payload)"
            )
        out = coordinator_pb2.InclusionProofs()
        for p in inclusion_proofs(self.store, ids):
            out.proofs.add(**p)
        return out

    def round_events(self, after_round_id: int) -> list[coordinator_pb2.RoundEvent]:
        """Events of the rounds after ``after_round_id``: "planned" for each round that exists,
        "finished" for each finished one, in order."""
        events = []
        for rid, status, groups, base_score, updated, winner, started, finished in self.store.query(
            "SELECT round_id, status, groups, base_score, updated, winner, started_ms, "
            "finished_ms FROM rounds WHERE round_id > ? ORDER BY round_id",
            (after_round_id,),
        ):
            members = json.loads(groups)
            common = {
                "round_id": rid,
                "groups": len(members),
                "contributors": sum(len(g) for g in members),
            }
            events.append(coordinator_pb2.RoundEvent(kind="planned", time_ms=started, **common))
            if status == "finished":
                scores = [
                    r[0]
                    for r in self.store.query(
                        "SELECT score FROM candidates WHERE round_id=? ORDER BY group_index", (rid,)
                    )
                ]
                events.append(
                    coordinator_pb2.RoundEvent(
                        kind="finished",
                        time_ms=finished or 0,
                        scores=scores,
                        base_score=base_score or 0.0,
                        updated=bool(updated),
                        winner=-1 if winner is None else winner,
                        **common,
                    )
                )
        return events


@dataclass
class ContributionWrite(BatchOp):
    """The durable half of accepting a contribution. The writer runs a whole batch of them with
    a few set-wise statements: duplicates, nonce reuse, the time window and the rate limit are
    checked in submission order (seeing earlier items of the batch), then the accepted ones are
    inserted together."""

    service: CoordinatorService
    verified: Verified
    cid: bytes
    n_examples: int
    nonce: bytes
    ts_ms: int
    fingerprints: tuple[bytes, ...] = ()  # empty when duplicate examples are allowed

    @classmethod
    def run_batch(cls, conn: sqlite3.Connection, ops: list[ContributionWrite]) -> list[Any]:
        service = ops[0].service
        existing = _lookup(
            conn,
            "SELECT id, receipt, receipt_signature FROM contributions WHERE id IN ({})",
            [op.cid for op in ops],
        )
        receipts = {row[0]: (row[1], row[2]) for row in existing}
        used = {
            (row[0], row[1])
            for row in _lookup(
                conn,
                "SELECT nonce, node_id FROM nonces WHERE nonce IN ({})",
                [op.nonce for op in ops],
            )
        }
        taken: dict[bytes, str] = {
            row[0]: row[1]
            for row in _lookup(
                conn,
                "SELECT fingerprint, node_id FROM examples WHERE fingerprint IN ({})",
                [fp for op in ops for fp in op.fingerprints],
            )
        }
        now = now_ms()
        results: list[Any] = []
        nodes, nonces, rows, examples = [], [], [], []
        counters = service.counters
        for op in ops:
            node_id = op.verified.node_id
            try:
                if op.cid in receipts:
                    receipt, signature = receipts[op.cid]
                    raise DuplicateContributionError(
                        f"contribution {op.cid.hex()} was already accepted; "
                        "the original receipt is attached",
                        envelope_pb2.SignedReceipt(receipt=receipt, signature=signature),
                    )
                for i, fp in enumerate(op.fingerprints):
                    if fp in taken:
                        who = "this node" if taken[fp] == node_id else "another node"
                        raise DuplicateExampleError(
                            f"examples[{i}] duplicates an example already stored (submitted "
                            f"earlier by {who}); the earlier submitter keeps the credit"
                        )
                service._check_time(op.ts_ms, now)
                if (op.nonce, node_id) in used:
                    raise ReplayError(
                        f"nonce {op.nonce.hex()} was already used by node {node_id} (replay)"
                    )
                service.rate_limiter.take(node_id)
            except DuplicateContributionError as exc:
                counters.duplicates += 1
                results.append(exc)
                continue
            except ProtocolError as exc:
                counters.rejected += 1
                logger.info(
                    "rejected contribution %s from node %s: %s: %s",
                    op.cid.hex()[:16],
                    node_id,
                    exc.status_name,
                    exc,
                )
                results.append(exc)
                continue
            signed = sign_receipt(
                service.identity,
                envelope_pb2.Receipt(
                    contribution_id=op.cid,
                    node_id=node_id,
                    accepted_at_ms=now,
                    example_count=op.n_examples,
                    coordinator_public_key=service.public_key,
                ),
            )
            used.add((op.nonce, node_id))
            receipts[op.cid] = (signed.receipt, signed.signature)
            for fp in op.fingerprints:
                taken[fp] = node_id
                examples.append((fp, op.cid, node_id))
            nodes.append((node_id, op.verified.public_key, now))
            nonces.append((op.nonce, node_id, op.ts_ms))
            rows.append(
                (
                    op.cid,
                    node_id,
                    op.verified.payload_bytes,
                    op.verified.signature,
                    op.ts_ms,
                    now,
                    op.n_examples,
                    signed.receipt,
                    signed.signature,
                )
            )
            counters.accepted += 1
            results.append(signed)
        if rows:
            conn.executemany(
                "INSERT OR IGNORE INTO nodes(node_id, public_key, registered_at_ms) "
                "VALUES (?, ?, ?)",
                nodes,
            )
            conn.executemany("INSERT INTO nonces(nonce, node_id, ts_ms) VALUES (?, ?, ?)", nonces)
            conn.executemany(
                "INSERT INTO contributions(id, node_id, payload, signature, client_ts_ms, "
                "accepted_at_ms, example_count, receipt, receipt_signature) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            if examples:
                conn.executemany(
                    "INSERT INTO examples(fingerprint, contribution_id, node_id) VALUES (?, ?, ?)",
                    examples,
                )
        return results


@dataclass
class _Failed(BatchOp):
    """A request already rejected, passed through the writer to keep its place in line."""

    error: ProtocolError

    @classmethod
    def run_batch(cls, conn: sqlite3.Connection, ops: list[_Failed]) -> list[Any]:
        return [op.error for op in ops]


def _lookup(conn: sqlite3.Connection, sql: str, keys: list[bytes]) -> list[tuple[Any, ...]]:
    """``sql`` (with one ``IN ({})``) over ``keys``, in chunks that SQLite accepts."""
    out: list[tuple[Any, ...]] = []
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        out += conn.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
    return out


def backfill_fingerprints(store: Store) -> int:
    """Fingerprint the examples of a store written before copy checks existed (once: only
    while no example has a fingerprint), so that they are protected too."""
    if store.query("SELECT 1 FROM examples LIMIT 1"):
        return 0
    rows = store.query("SELECT id, node_id, payload FROM contributions ORDER BY seq")
    entries = []
    for cid, node_id, payload in rows:
        msg = contribution_pb2.ContributionPayload.FromString(payload)
        entries += [(fp, cid, node_id) for fp in fingerprints(msg)]
    if entries:
        store.write(
            lambda conn: conn.executemany(
                "INSERT OR IGNORE INTO examples(fingerprint, contribution_id, node_id) "
                "VALUES (?, ?, ?)",
                entries,
            )
        )
        logger.info("fingerprinted %d stored examples for copy checks", len(entries))
    return len(entries)


def participation(store: Store, node_id: str) -> list[dict[str, Any]]:
    """The finished rounds a node took part in, with its group, rank and points."""
    out = []
    for rid, groups, ranking in store.query(
        "SELECT round_id, groups, ranking FROM rounds WHERE status='finished' ORDER BY round_id"
    ):
        members = json.loads(groups)
        group = next((g for g, m in enumerate(members) if node_id in m), None)
        if group is None:
            continue
        entry: dict[str, Any] = {"round_id": rid, "group": group}
        order = json.loads(ranking) if ranking else []
        if order:
            entry["rank"] = order.index(group)
        ledger = store.query(
            "SELECT points_before, points_after FROM points_ledger WHERE round_id=? AND node_id=?",
            (rid, node_id),
        )
        if ledger:
            entry["points_before"], entry["points_after"] = ledger[0]
        out.append(entry)
    return out


def prune_nonces(store: Store, window_s: int) -> int:
    """Forget nonces whose timestamp is so old that the window rejects them anyway."""
    cutoff = now_ms() - 2 * window_s * 1000
    return store.write(
        lambda conn: conn.execute("DELETE FROM nonces WHERE ts_ms < ?", (cutoff,)).rowcount
    )


def stats(conn: sqlite3.Connection) -> dict:
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
