"""The coordinator's domain logic, free of gRPC: verify, validate, store, sign receipts.

The gRPC servicer is a thin adapter over this class; tests and the benchmark can drive it
directly. Every rejection raises a ProtocolError subclass whose ``status_name`` is the gRPC
status that answers it, and nothing is written for a rejected request.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from crowdsft import PROTOCOL, __version__
from crowdsft.config import CoordinatorConfig
from crowdsft.errors import (
    DuplicateContributionError,
    InvalidPayloadError,
    ProtocolError,
    ReplayError,
)
from crowdsft.node.envelope import Verified, contribution_id, now_ms, sign_receipt, verify_envelope
from crowdsft.node.keys import Identity
from crowdsft.v1 import contribution_pb2, coordinator_pb2, envelope_pb2
from crowdsft.validation import MAX_NONCE_BYTES, MIN_NONCE_BYTES, payload_problems

from .admission import Admission, RateLimiter
from .store import Store

logger = logging.getLogger(__name__)

MAX_DISPLAY_NAME = 64


@dataclass
class IngestCounters:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0


class CoordinatorService:
    """Everything the coordinator does with node requests."""

    def __init__(self, config: CoordinatorConfig, identity: Identity, store: Store) -> None:
        self.config = config
        self.identity = identity
        self.public_key = identity.public_key
        self.store = store
        self.limits = config.protocol.limits()
        self.window_ms = config.protocol.timestamp_window_s * 1000
        self.admission = Admission(config.admission, config.base_dir)
        self.rate_limiter = RateLimiter(config.rate_limit)
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
            "SELECT 1 FROM nonces WHERE node_id=? AND nonce=?", (node_id, nonce)
        ).fetchone()
        if seen:
            raise ReplayError(f"nonce {nonce.hex()} was already used by node {node_id} (replay)")

    @staticmethod
    def _record_nonce(conn: sqlite3.Connection, node_id: str, nonce: bytes, ts_ms: int) -> None:
        conn.execute(
            "INSERT INTO nonces(node_id, nonce, ts_ms) VALUES (?, ?, ?)", (node_id, nonce, ts_ms)
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

    def _count(self, field: str) -> None:
        with self._counters_lock:
            setattr(self.counters, field, getattr(self.counters, field) + 1)

    # -- RPCs ---------------------------------------------------------------------------------

    def info(self) -> coordinator_pb2.CoordinatorInfo:
        p = self.config.protocol
        return coordinator_pb2.CoordinatorInfo(
            public_key=self.public_key,
            protocol=PROTOCOL,
            admission_policy=self.admission.policy,
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
        try:
            verified, payload = verify_envelope(envelope, contribution_pb2.ContributionPayload)
            self.admission.check(verified.node_id)
            problems = payload_problems(payload, self.limits)
            if problems:
                raise InvalidPayloadError("; ".join(problems))
        except ProtocolError as exc:
            self._count("rejected")
            logger.info("rejected contribution: %s: %s", exc.status_name, exc)
            raise
        cid = contribution_id(verified.payload_bytes)
        n_examples = len(payload.examples)
        nonce = payload.nonce
        ts = payload.timestamp_ms

        def op(conn: sqlite3.Connection) -> envelope_pb2.SignedReceipt:
            row = conn.execute(
                "SELECT receipt, receipt_signature FROM contributions WHERE id=?", (cid,)
            ).fetchone()
            if row:
                raise DuplicateContributionError(
                    f"contribution {cid.hex()} was already accepted; "
                    "the original receipt is attached",
                    envelope_pb2.SignedReceipt(receipt=row[0], signature=row[1]),
                )
            now = now_ms()
            self._check_time(ts, now)
            self._check_nonce_unused(conn, verified.node_id, nonce)
            self.rate_limiter.take(verified.node_id)
            self._record_nonce(conn, verified.node_id, nonce, ts)
            self._ensure_node(conn, verified, now)
            receipt = envelope_pb2.Receipt(
                contribution_id=cid,
                node_id=verified.node_id,
                accepted_at_ms=now,
                example_count=n_examples,
                coordinator_public_key=self.public_key,
            )
            signed = sign_receipt(self.identity, receipt)
            conn.execute(
                "INSERT INTO contributions(id, node_id, payload, signature, client_ts_ms, "
                "accepted_at_ms, example_count, receipt, receipt_signature) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cid,
                    verified.node_id,
                    verified.payload_bytes,
                    verified.signature,
                    ts,
                    now,
                    n_examples,
                    signed.receipt,
                    signed.signature,
                ),
            )
            return signed

        fut = self.store.submit(op)
        fut.add_done_callback(self._log_outcome(cid, verified.node_id))
        return fut

    def _log_outcome(self, cid: bytes, node_id: str):
        def done(fut: Future[envelope_pb2.SignedReceipt]) -> None:
            exc = fut.exception()
            if exc is None:
                self._count("accepted")
                logger.debug("accepted contribution %s from node %s", cid.hex()[:16], node_id)
            elif isinstance(exc, DuplicateContributionError):
                self._count("duplicates")
                logger.debug("duplicate contribution %s from node %s", cid.hex()[:16], node_id)
            else:
                self._count("rejected")
                status = getattr(exc, "status_name", "INTERNAL")
                logger.info(
                    "rejected contribution %s from node %s: %s: %s",
                    cid.hex()[:16],
                    node_id,
                    status,
                    exc,
                )

        return done

    def submit(
        self, envelope: envelope_pb2.SignedEnvelope, timeout: float = 60
    ) -> envelope_pb2.SignedReceipt:
        return self.submit_async(envelope).result(timeout)

    def _authenticated(self, envelope: envelope_pb2.SignedEnvelope, message_type):
        verified, payload = verify_envelope(envelope, message_type)
        self.admission.check(verified.node_id)
        self._check_nonce_shape(payload.nonce)
        self._check_time(payload.timestamp_ms, now_ms())
        return verified, payload

    def register(
        self, envelope: envelope_pb2.SignedEnvelope
    ) -> coordinator_pb2.RegisterNodeResponse:
        verified, payload = self._authenticated(envelope, contribution_pb2.RegisterPayload)
        name = payload.display_name.strip()
        if len(name) > MAX_DISPLAY_NAME:
            raise InvalidPayloadError(f"display_name is longer than {MAX_DISPLAY_NAME} characters")

        def op(conn: sqlite3.Connection) -> coordinator_pb2.RegisterNodeResponse:
            self._use_nonce(conn, verified.node_id, payload.nonce, payload.timestamp_ms)
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
        return status


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
    return {
        "nodes": len(nodes),
        "contributions": sum(n["contributions"] for n in nodes),
        "examples": sum(n["examples"] for n in nodes),
        "per_node": nodes,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
