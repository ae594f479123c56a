"""Accepting contributions: verify and validate on the calling thread (cheap rejections
first, nothing written: see ``Ingest.prepare``), then a batched durable write on the store's
writer thread that checks what needs the store (duplicates, copies, the time window, nonce
reuse) in submission order and inserts the accepted ones together. A receipt is signed only
for what is stored, and the counters count what was committed."""

from __future__ import annotations

import logging
import sqlite3
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from crowdsft.config import CoordinatorConfig
from crowdsft.envelope import (
    Verified,
    check_addressed,
    contribution_id,
    now_ms,
    sign_receipt,
    verify_envelope,
)
from crowdsft.errors import (
    AuthenticationError,
    DuplicateContributionError,
    DuplicateExampleError,
    InvalidPayloadError,
    ProtocolError,
    ReplayError,
)
from crowdsft.keys import PUBLIC_KEY_BYTES, Identity, node_id_from_public_key
from crowdsft.plugins.manager import Plugins
from crowdsft.v1 import contribution_pb2, envelope_pb2
from crowdsft.validation import (
    check_payload,
    count_field,
    example_dicts,
    fingerprints,
    printable,
    structure_problems,
    summarise,
)

from ..store import queries
from ..store.db import BatchOp, Done, Store, future_and_done
from .heavy import HeavyLane
from .ratelimit import PeerLimiter, RateLimiter

logger = logging.getLogger(__name__)

EXAMPLES_FIELD = contribution_pb2.ContributionPayload.DESCRIPTOR.fields_by_name["examples"].number


@dataclass
class IngestCounters:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0


class Ingest:
    """The contribution path of the coordinator."""

    def __init__(
        self,
        config: CoordinatorConfig,
        identity: Identity,
        store: Store,
        plugins: Plugins,
        admission: Any,
        check_time,
    ) -> None:
        self.config = config
        self.identity = identity
        self.public_key = identity.public_key
        self.store = store
        self.plugins = plugins
        self.admission = admission
        self.check_time = check_time
        self.limits = config.protocol.limits()
        self.rate_limiter = RateLimiter(config.rate_limit)
        self.peers = PeerLimiter(config.rate_limit)
        self.copy_checks = config.admission.reject_duplicate_examples
        if self.copy_checks:
            backfill_fingerprints(store)
        # Contributions of at least heavy_bytes are checked in the heavy lane (``heavy``),
        # which the server sets; without one everything is checked in-process.
        self.heavy: HeavyLane | None = None
        self.heavy_bytes = 0
        self.counters = IngestCounters()
        self._counters_lock = threading.Lock()

    def _run_validators(self, node_id: str, payload: contribution_pb2.ContributionPayload) -> None:
        """Ask the plugins' ``crowdsft_validate_contribution`` hooks (if any plugin has one)."""
        if not self.plugins.pm.hook.crowdsft_validate_contribution.get_hookimpls():
            return
        reasons = self.plugins.validate_contribution(node_id, example_dicts(payload))
        if reasons:
            raise InvalidPayloadError("rejected by a validation plugin: " + "; ".join(reasons))

    def prepare(self, envelope: envelope_pb2.SignedEnvelope, peer: str = "") -> ContributionWrite:
        """Check a contribution, cheapest first, and return its durable write, not yet
        queued; raise ProtocolError (nothing written) at the first check that fails:

        1. the peer's own limits (requests, bytes, bad signatures), before any verification
           (the servicer checks them on its event loop, before a worker is involved; ``peer``
           here only charges a bad signature to it);
        2. the signature (a bad one counts against the peer);
        3. admission and the node's rate and byte limits (only now is the key proven, so
           nobody can spend another node's budget);
        4. unknown fields, counts and sizes, combining marks, then normalisation (once per
           example) for repeats and copies; the validation plugins last.
        """
        try:
            if self.heavy is not None and len(envelope.payload) >= self.heavy_bytes:
                return self._prepare_heavy(envelope, peer)
            return self._prepare_here(envelope, peer)
        except ProtocolError as exc:
            logger.info("rejected contribution: %s: %s", exc.status_name, printable(str(exc)))
            raise

    def _prepare_here(self, envelope: envelope_pb2.SignedEnvelope, peer: str) -> ContributionWrite:
        """Steps 2 to 4 on this thread (small contributions)."""
        try:
            verified, payload = verify_envelope(
                envelope, contribution_pb2.ContributionPayload, self._before_parsing
            )
        except AuthenticationError:
            if peer:
                self.peers.bad_signature(peer)
            raise
        unknown = structure_problems(payload)
        if unknown:
            raise InvalidPayloadError(summarise(unknown))
        check_addressed(payload, self.public_key)
        checked = check_payload(payload, self.limits)
        if checked.problems:
            raise InvalidPayloadError(summarise(checked.problems))
        self._run_validators(verified.node_id, payload)
        return self._write(
            verified,
            len(payload.examples),
            payload.nonce,
            payload.timestamp_ms,
            checked.fingerprints,
        )

    def _prepare_heavy(self, envelope: envelope_pb2.SignedEnvelope, peer: str) -> ContributionWrite:
        """Steps 2 to 4 for a large contribution, its stateless checks in the heavy lane
        (``HeavyLane``). Admission and the node's budget are looked at first, for the key the
        envelope claims, spending nothing, so that a node that would be refused costs no
        check; such a refusal is given only once the signature has checked out here (else the
        answer is UNAUTHENTICATED and the peer is charged, as on the fast path, and nobody
        learns another node's budget). The budget is spent once the lane has verified the
        signature, before the payload's verdict, as on the fast path."""
        assert self.heavy is not None
        pk = envelope.public_key
        claimed = node_id_from_public_key(pk) if len(pk) == PUBLIC_KEY_BYTES else ""
        if claimed:
            try:
                self.admission.check(claimed)
                self.rate_limiter.check(claimed, len(envelope.payload))
            except ProtocolError:
                self._verify_here(envelope, peer)
                raise
        found = self.heavy.inspect(envelope, self.limits)
        if found.problem == "signature":
            if peer:
                self.peers.bad_signature(peer)
            raise AuthenticationError(found.message)
        self._before_parsing_budget(claimed, len(envelope.payload))
        if found.problem:
            raise InvalidPayloadError(found.message)
        check_addressed(
            contribution_pb2.ContributionPayload(coordinator_key=found.coordinator_key),
            self.public_key,
        )
        verified = Verified(
            node_id=claimed,
            public_key=pk,
            payload_bytes=envelope.payload,
            signature=envelope.signature,
        )
        if self.plugins.pm.hook.crowdsft_validate_contribution.get_hookimpls():
            payload = contribution_pb2.ContributionPayload.FromString(envelope.payload)
            self._run_validators(claimed, payload)
        return self._write(
            verified, found.n_examples, found.nonce, found.timestamp_ms, found.fingerprints
        )

    def _verify_here(self, envelope: envelope_pb2.SignedEnvelope, peer: str) -> None:
        """Raise AuthenticationError (charged to the peer) unless the signature verifies."""
        try:
            verify_envelope(envelope, contribution_pb2.ContributionPayload, _refuse_parse)
        except _Verified:
            return
        except AuthenticationError:
            if peer:
                self.peers.bad_signature(peer)
            raise

    def _write(
        self,
        verified: Verified,
        n_examples: int,
        nonce: bytes,
        ts_ms: int,
        fps: list[bytes] | tuple[bytes, ...],
    ) -> ContributionWrite:
        cid = contribution_id(verified.payload_bytes)
        payload_file = None
        if len(verified.payload_bytes) >= self.store.side_payload_bytes and not (
            queries.stored_receipts(self.store.reader(), [cid])
        ):
            # Written and fsynced here, on this worker thread, so that the writer's commit
            # (which every other contribution waits for) stays small. A resent contribution
            # that is already stored writes nothing: the writer answers it with its receipt.
            payload_file = self.store.put_payload(verified.payload_bytes, cid)
        return ContributionWrite(
            ingest=self,
            verified=verified,
            cid=cid,
            n_examples=n_examples,
            nonce=nonce,
            ts_ms=ts_ms,
            fingerprints=tuple(fps) if self.copy_checks else (),
            payload_file=payload_file,
        )

    def _before_parsing(self, node_id: str, payload: bytes) -> None:
        """Between the signature and the parse: admission and the node's limits (the key is
        proven now, and needs no parsing), then the example count from the wire bytes."""
        self._before_parsing_budget(node_id, len(payload))
        most = self.limits.max_examples_per_contribution
        if count_field(payload, EXAMPLES_FIELD, most + 1) > most:
            raise InvalidPayloadError(
                f"contribution has more than {most} examples; the limit is {most}"
            )

    def _before_parsing_budget(self, node_id: str, nbytes: int) -> None:
        """Admission, then the node's contribution and byte budgets (the key is proven)."""
        self.admission.check(node_id)
        self.rate_limiter.take(node_id, nbytes)

    def _count(self, ok: bool, value: Any) -> None:
        """Count what the store committed (called after the commit)."""
        with self._counters_lock:
            if ok:
                self.counters.accepted += 1
            elif isinstance(value, DuplicateContributionError):
                self.counters.duplicates += 1
            else:
                self.counters.rejected += 1

    def submit_with(
        self, envelope: envelope_pb2.SignedEnvelope, done: Done, peer: str = ""
    ) -> None:
        """Verify now, then queue the durable write; ``done(ok, value)`` runs on the store's
        writer thread after the commit, also for rejections found before the write (through
        the writer all the same, so that results keep the submission order)."""

        try:
            op: BatchOp = self.prepare(envelope, peer)
        except ProtocolError as exc:
            op = _Failed(exc)
        side = op.payload_file if isinstance(op, ContributionWrite) else None

        def counted(ok: bool, value: Any) -> None:
            if not ok and side is not None and isinstance(value, ProtocolError):
                # rejected, so no committed row names it (after another failure, such as an
                # error from COMMIT itself, whether the row is on disk is unknown: the file
                # stays, and the next start's sweep removes it if no row names it)
                self.store.drop_payload(side)
            self._count(ok, value)
            done(ok, value)

        self.store.submit_with(op, counted)

    def reject(self, exc: ProtocolError, done: Done) -> None:
        """Answer a contribution refused before any work (the peer's limits) through the
        writer all the same, so that a stream's results keep their order."""

        def counted(ok: bool, value: Any) -> None:
            self._count(ok, value)
            done(ok, value)

        self.store.submit_with(_Failed(exc), counted)

    def submit_future(
        self, envelope: envelope_pb2.SignedEnvelope, peer: str = ""
    ) -> Future[envelope_pb2.SignedReceipt]:
        """``submit_with`` as a future: the receipt once committed, or the rejection."""
        fut, done = future_and_done()
        self.submit_with(envelope, done, peer)
        return fut

    def _sign(self, op: ContributionWrite, now: int) -> envelope_pb2.SignedReceipt:
        return sign_receipt(
            self.identity,
            envelope_pb2.Receipt(
                contribution_id=op.cid,
                node_id=op.verified.node_id,
                accepted_at_ms=now,
                example_count=op.n_examples,
                coordinator_public_key=self.public_key,
            ),
        )


class _Verified(Exception):
    """Raised by ``_refuse_parse``: the signature checked out, and no parse is wanted."""


def _refuse_parse(node_id: str, payload: bytes) -> None:
    raise _Verified


@dataclass
class ContributionWrite(BatchOp):
    """The durable half of accepting a contribution. The writer runs a whole batch of them:
    every check sees the earlier items of the batch, then the accepted ones are inserted
    together."""

    ingest: Ingest
    verified: Verified
    cid: bytes
    n_examples: int
    nonce: bytes
    ts_ms: int
    fingerprints: tuple[bytes, ...] = ()  # empty when duplicate examples are allowed
    payload_file: str | None = None  # a large payload's file beside the database

    def check(
        self,
        receipts: dict[bytes, tuple[bytes, bytes]],
        used: set[tuple[bytes, str]],
        taken: dict[bytes, str],
        now: int,
    ) -> None:
        """Raise the ProtocolError that rejects this contribution, given what the store and
        the earlier items of the batch hold."""
        node_id = self.verified.node_id
        if self.cid in receipts:
            receipt, signature = receipts[self.cid]
            raise DuplicateContributionError(
                f"contribution {self.cid.hex()} was already accepted; "
                "the original receipt is attached",
                envelope_pb2.SignedReceipt(receipt=receipt, signature=signature),
            )
        for i, fp in enumerate(self.fingerprints):
            if fp in taken:
                who = "this node" if taken[fp] == node_id else "another node"
                raise DuplicateExampleError(
                    f"examples[{i}] duplicates an example already stored (submitted "
                    f"earlier by {who}); the earlier submitter keeps the credit"
                )
        self.ingest.check_time(self.ts_ms, now)
        if (self.nonce, node_id) in used:
            raise ReplayError(
                f"nonce {self.nonce.hex()} was already used by node {node_id} (replay)"
            )

    @classmethod
    def run_batch(cls, conn: sqlite3.Connection, ops: list[ContributionWrite]) -> list[Any]:
        ingest = ops[0].ingest
        receipts = queries.stored_receipts(conn, [op.cid for op in ops])
        used = queries.used_nonces(conn, [op.nonce for op in ops])
        taken = queries.fingerprint_owners(conn, [fp for op in ops for fp in op.fingerprints])
        now = now_ms()
        results: list[Any] = []
        accepted = queries.AcceptedBatch()
        for op in ops:
            node_id = op.verified.node_id
            try:
                op.check(receipts, used, taken, now)
            except DuplicateContributionError as exc:
                results.append(exc)
                continue
            except ProtocolError as exc:
                logger.info(
                    "rejected contribution %s from node %s: %s: %s",
                    op.cid.hex()[:16],
                    node_id,
                    exc.status_name,
                    exc,
                )
                results.append(exc)
                continue
            signed = ingest._sign(op, now)
            used.add((op.nonce, node_id))
            receipts[op.cid] = (signed.receipt, signed.signature)
            for fp in op.fingerprints:
                taken[fp] = node_id
                accepted.examples.append((fp, op.cid, node_id))
            accepted.nodes.append((node_id, op.verified.public_key, now))
            accepted.nonces.append((op.nonce, node_id, op.ts_ms))
            accepted.contributions.append(
                (
                    op.cid,
                    node_id,
                    b"" if op.payload_file else op.verified.payload_bytes,
                    op.verified.signature,
                    op.ts_ms,
                    now,
                    op.n_examples,
                    signed.receipt,
                    signed.signature,
                    op.payload_file,
                )
            )
            results.append(signed)
        queries.insert_accepted(conn, accepted)
        return results


@dataclass
class _Failed(BatchOp):
    """A request already rejected, passed through the writer to keep its place in line."""

    error: ProtocolError

    @classmethod
    def run_batch(cls, conn: sqlite3.Connection, ops: list[_Failed]) -> list[Any]:
        return [op.error for op in ops]


def backfill_fingerprints(store: Store) -> int:
    """Fingerprint the examples of a store written before copy checks existed (once: only
    while no example has a fingerprint), so that they are protected too."""
    if queries.has_fingerprints(store):
        return 0
    entries = []
    for row in queries.all_contributions(store):
        msg = contribution_pb2.ContributionPayload.FromString(row.payload)
        entries += [(fp, row.id, row.node_id) for fp in fingerprints(msg)]
    if entries:
        queries.insert_fingerprints(store, entries)
        logger.info("fingerprinted %d stored examples for copy checks", len(entries))
    return len(entries)
