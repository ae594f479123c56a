"""The heavy lane: large contributions are checked in a separate process at a lower OS
priority (nice +10), so that most of the work they cost (the signature over megabytes,
parsing, Unicode checks, normalisation) runs outside the serving process's interpreter lock
and yields the CPU to it when both want it.

Honest nodes' small contributions keep the fast in-process path. What a large one still
costs the serving process: receiving it, copying it to the lane, hashing its id, and its
commit. The lane does only the stateless part of ``Ingest.prepare`` (``inspect``);
everything that needs the coordinator's state (the peer's and node's budgets, admission,
the store) stays in-process (see ``Ingest._prepare_heavy`` for the order).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from crowdsft.envelope import verify_envelope
from crowdsft.errors import AuthenticationError, InvalidPayloadError, UnavailableError
from crowdsft.v1 import contribution_pb2, envelope_pb2
from crowdsft.validation import Limits, check_payload, count_field, structure_problems, summarise

logger = logging.getLogger(__name__)

EXAMPLES_FIELD = contribution_pb2.ContributionPayload.DESCRIPTOR.fields_by_name["examples"].number
NICENESS = 10  # the lane's OS priority below the server's (CPU share about 1:10 when both run)


@dataclass(frozen=True)
class Inspection:
    """What the lane found: ``problem`` is empty for a contribution that passed (then with
    what the durable write needs), else the kind ("signature" or "payload") and message of
    the first check that failed."""

    problem: str = ""
    message: str = ""
    fingerprints: tuple[bytes, ...] = ()
    n_examples: int = 0
    nonce: bytes = b""
    timestamp_ms: int = 0
    coordinator_key: bytes = b""


def inspect(envelope_bytes: bytes, limits: Limits) -> Inspection:
    """The stateless checks of a contribution, in ``Ingest.prepare``'s order: signature,
    example count on the wire, unknown fields, counts and sizes, combining marks, then
    normalisation and fingerprints."""
    envelope = envelope_pb2.SignedEnvelope.FromString(envelope_bytes)

    def count(node_id: str, payload: bytes) -> None:
        most = limits.max_examples_per_contribution
        if count_field(payload, EXAMPLES_FIELD, most + 1) > most:
            raise InvalidPayloadError(
                f"contribution has more than {most} examples; the limit is {most}"
            )

    try:
        _, payload = verify_envelope(envelope, contribution_pb2.ContributionPayload, count)
    except AuthenticationError as exc:
        return Inspection("signature", str(exc))
    except InvalidPayloadError as exc:
        return Inspection("payload", str(exc))
    unknown = structure_problems(payload)
    if unknown:
        return Inspection("payload", summarise(unknown))
    checked = check_payload(payload, limits)
    if checked.problems:
        return Inspection("payload", summarise(checked.problems))
    return Inspection(
        fingerprints=tuple(checked.fingerprints),
        n_examples=len(payload.examples),
        nonce=payload.nonce,
        timestamp_ms=payload.timestamp_ms,
        coordinator_key=payload.coordinator_key,
    )


def _worker_start(parent: int) -> None:
    """In the lane's process: a lower priority; Ctrl-C is the coordinator's to handle (it
    closes the lane); and the process ends when the coordinator does, even if it was killed."""
    with contextlib.suppress(OSError):  # not permitted: the lane still frees the lock
        os.nice(NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="heavy-lane-parent-watch", daemon=True).start()


class HeavyLane:
    """One worker process at a lower priority, and a bound on the calls waiting for it
    (each holds a server worker thread): past ``max_waiting`` a large contribution is refused
    with UNAVAILABLE and a retry hint rather than queued."""

    def __init__(self, max_waiting: int, timeout_s: float = 60.0) -> None:
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(max_waiting)
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise UnavailableError("coordinator is shutting down; retry")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_start,
                    initargs=(os.getpid(),),
                )
            return self._pool

    def start(self) -> None:
        """Start the worker process now (it imports the checks: about a second), so that
        the first large contribution does not wait for it."""
        self._executor().submit(os.getpid)

    def inspect(self, envelope: envelope_pb2.SignedEnvelope, limits: Limits) -> Inspection:
        data = envelope.SerializeToString()
        for attempt in (1, 2):
            if not self._slots.acquire(blocking=False):
                raise UnavailableError(
                    f"the coordinator is checking {self.max_waiting} large contributions "
                    "already; retry shortly"
                )
            try:
                pool = self._executor()
                future = pool.submit(inspect, data, limits)
            except BaseException:
                self._slots.release()
                raise
            # The slot is free when the job is, not when this caller stops waiting for it.
            future.add_done_callback(lambda _: self._slots.release())
            try:
                return future.result(self.timeout_s)
            except BrokenProcessPool:  # the worker died (killed, out of memory): once more
                logger.warning("the heavy-lane worker process died; starting another")
                with self._lock:
                    if self._pool is pool:
                        self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                if attempt == 2:
                    raise UnavailableError(
                        "the coordinator could not check this contribution; retry"
                    ) from None
            except TimeoutError:
                future.cancel()
                raise UnavailableError(
                    "checking this contribution took too long; retry later"
                ) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
