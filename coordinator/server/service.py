"""Node requests, free of gRPC: contributions (through ``ingest``), registration, status, the
ledger, inclusion proofs and round events.

The gRPC servicer is a thin adapter over this class; tests and the benchmark can drive it
directly. Every rejection raises a ProtocolError subclass whose ``status_name`` is the gRPC
status that answers it, and nothing is written for a rejected request.
"""

from __future__ import annotations

import logging
import sqlite3
from concurrent.futures import Future
from typing import Any

from crowdsft import PROTOCOL, __version__
from crowdsft.config import CoordinatorConfig
from crowdsft.envelope import check_addressed, now_ms, verify_envelope
from crowdsft.errors import AuthenticationError, InvalidPayloadError, ReplayError
from crowdsft.keys import Identity
from crowdsft.ledger import LedgerEntry, SignedTreeHead, consistency_proof
from crowdsft.plugins.manager import Plugins, get_plugins
from crowdsft.v1 import contribution_pb2, coordinator_pb2, envelope_pb2
from crowdsft.validation import (
    MAX_NONCE_BYTES,
    MIN_NONCE_BYTES,
    has_control_characters,
    printable,
    summarise,
    unknown_fields,
)

from ..store import queries
from ..store.chain import inclusion_proofs, ledger_entries
from ..store.db import Done, Store
from ..store.invites import InviteBook
from .ingest import ContributionWrite, Ingest

logger = logging.getLogger(__name__)

MAX_DISPLAY_NAME = 64
LEDGER_PAGE = 256
MAX_PROOF_IDS = 4096


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
        self.window_ms = config.protocol.timestamp_window_s * 1000
        self.admission = self.plugins.create(
            "admission",
            config.admission.policy,
            config=config.admission,
            base_dir=config.base_dir,
            invites=InviteBook.of(store),
        )
        self.ingest = Ingest(
            config, identity, store, self.plugins, self.admission, self._check_time
        )
        self.counters = self.ingest.counters
        self.rate_limiter = self.ingest.rate_limiter

    # -- checks shared by every signed request -------------------------------------------------

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
        if queries.nonce_used(conn, node_id, nonce):
            raise ReplayError(f"nonce {nonce.hex()} was already used by node {node_id} (replay)")

    def _use_nonce(self, conn: sqlite3.Connection, node_id: str, nonce: bytes, ts_ms: int) -> None:
        """Record a nonce; ReplayError (and nothing written) if this node used it before."""
        self._check_nonce_unused(conn, node_id, nonce)
        queries.record_nonce(conn, node_id, nonce, ts_ms)

    def _authenticated(
        self,
        envelope: envelope_pb2.SignedEnvelope,
        message_type,
        peer: str = "",
        check_admission: bool = True,
    ):
        """A signed request other than a contribution (the servicer has checked the peer's
        limits): the signature (a bad one counts against ``peer``), then the node's own call
        budget, admission, unknown fields, the nonce's shape and the time."""
        peers = self.ingest.peers
        try:
            verified, payload = verify_envelope(envelope, message_type)
        except AuthenticationError:
            if peer:
                peers.bad_signature(peer)
            raise
        self.ingest.rate_limiter.take_call(verified.node_id)
        if check_admission:
            self.admission.check(verified.node_id)
        unknown = unknown_fields(payload)
        if unknown:
            raise InvalidPayloadError(summarise(unknown))
        check_addressed(payload, self.identity.public_key)
        self._check_nonce_shape(payload.nonce)
        self._check_time(payload.timestamp_ms, now_ms())
        return verified, payload

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

    def prepare(self, envelope: envelope_pb2.SignedEnvelope, peer: str = "") -> ContributionWrite:
        return self.ingest.prepare(envelope, peer)

    def submit_with(
        self, envelope: envelope_pb2.SignedEnvelope, done: Done, peer: str = ""
    ) -> None:
        self.ingest.submit_with(envelope, done, peer)

    def submit_async(
        self, envelope: envelope_pb2.SignedEnvelope, peer: str = ""
    ) -> Future[envelope_pb2.SignedReceipt]:
        """Verify and validate, then queue the durable write. The returned future yields the
        signed receipt once the contribution is committed, or raises the ProtocolError that
        rejected it (DuplicateContributionError carries the original receipt)."""
        return self.ingest.submit_future(envelope, peer)

    def submit(
        self, envelope: envelope_pb2.SignedEnvelope, timeout: float = 60, peer: str = ""
    ) -> envelope_pb2.SignedReceipt:
        return self.submit_async(envelope, peer).result(timeout)

    def register(
        self, envelope: envelope_pb2.SignedEnvelope, peer: str = ""
    ) -> coordinator_pb2.RegisterNodeResponse:
        # Admission is decided inside the write: a policy may spend an invite token there.
        verified, payload = self._authenticated(
            envelope, contribution_pb2.RegisterPayload, peer, check_admission=False
        )
        name = payload.display_name.strip()
        if len(name) > MAX_DISPLAY_NAME:
            raise InvalidPayloadError(f"display_name is longer than {MAX_DISPLAY_NAME} characters")
        if has_control_characters(name):
            raise InvalidPayloadError(
                "display_name has control characters (line breaks, escape codes); use plain text"
            )
        node_id = verified.node_id

        def op(conn: sqlite3.Connection) -> coordinator_pb2.RegisterNodeResponse:
            self._check_nonce_unused(conn, node_id, payload.nonce)
            # Last check, and it may write (spend a token): nothing is written if it refuses.
            self.admission.admit_registration(
                InviteBook.in_transaction(conn), node_id, payload.invite_token
            )
            queries.record_nonce(conn, node_id, payload.nonce, payload.timestamp_ms)
            registered = queries.registered_at(conn, node_id)
            if registered is not None:
                if name:
                    queries.set_display_name(conn, node_id, name)
                return coordinator_pb2.RegisterNodeResponse(
                    node_id=node_id, registered_at_ms=registered, newly_registered=False
                )
            now = now_ms()
            queries.insert_node(conn, node_id, verified.public_key, name, now)
            logger.info("registered node %s%s", node_id, f" ({printable(name)})" if name else "")
            return coordinator_pb2.RegisterNodeResponse(
                node_id=node_id, registered_at_ms=now, newly_registered=True
            )

        return self.store.write(op)

    def node_status(
        self, envelope: envelope_pb2.SignedEnvelope, peer: str = ""
    ) -> coordinator_pb2.NodeStatus:
        """A node's standing. The request is signed and its nonce is spent, so that a status
        request cannot be replayed to watch another node's standing."""
        verified, payload = self._authenticated(
            envelope, contribution_pb2.StatusRequestPayload, peer
        )
        self.store.write(
            lambda conn: self._use_nonce(
                conn, verified.node_id, payload.nonce, payload.timestamp_ms
            )
        )
        return self.status_of(verified.node_id)

    def status_of(self, node_id: str) -> coordinator_pb2.NodeStatus:
        contributions, examples = queries.contribution_counts(self.store, node_id)
        status = coordinator_pb2.NodeStatus(
            node_id=node_id, contributions=contributions, examples=examples
        )
        node = queries.node_row(self.store, node_id)
        if node is not None:
            status.registered = True
            status.registered_at_ms = node.registered_at_ms
            status.display_name = node.display_name
            status.points = node.points
        for part in queries.participation(self.store, node_id):
            status.rounds.add(**part)
        return status

    def ledger(self, after_round_id: int) -> list[LedgerEntry]:
        """The next page of signed round records after ``after_round_id``."""
        return ledger_entries(self.store, after_round_id, LEDGER_PAGE)

    def tree_head(self, first_size: int) -> coordinator_pb2.TreeHead:
        """A signed tree head over every ledger record, and the consistency proof from the
        tree of ``first_size`` records where that is smaller (docs/protocol.md 11.8)."""
        records = [e.record for e in ledger_entries(self.store, 0, limit=-1)]  # all, not a page
        head = SignedTreeHead.sign(self.identity, records, now_ms())
        out = coordinator_pb2.TreeHead(head=head.head, signature=head.signature)
        if 0 < first_size < len(records):
            out.consistency.extend(consistency_proof(records, first_size))
        return out

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
        for r in queries.rounds(self.store, after_round_id):
            common: dict[str, Any] = {
                "round_id": r.round_id,
                "groups": len(r.groups),
                "contributors": sum(len(g) for g in r.groups),
            }
            events.append(
                coordinator_pb2.RoundEvent(kind="planned", time_ms=r.started_ms, **common)
            )
            if r.finished:
                events.append(
                    coordinator_pb2.RoundEvent(
                        kind="finished",
                        time_ms=r.finished_ms or 0,
                        scores=[c.score for c in r.candidates if c.score is not None],
                        base_score=r.base_score or 0.0,
                        updated=r.updated,
                        winner=-1 if r.winner is None else r.winner,
                        evaluation=self.config.evaluation.function,
                        **common,
                    )
                )
        return events


def prune_nonces(store: Store, window_s: int) -> int:
    """Forget nonces whose timestamp is so old that the window rejects them anyway."""
    return queries.prune_nonces(store, now_ms() - 2 * window_s * 1000)
