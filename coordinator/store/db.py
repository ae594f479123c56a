"""The coordinator's durable store: SQLite in WAL mode with ``synchronous=FULL``.

All writes go through one writer thread that commits in groups (group commit): callers hand it
an operation and get a future that resolves only after the transaction holding that operation
has been committed to disk. That is what makes "acknowledged" mean "durable" without paying one
fsync per contribution. Reads use a connection per thread and see committed data only.

Large payloads (``SIDE_PAYLOAD_BYTES`` or more) are kept out of the database, in files beside
it (``<db>.payloads/``): the caller writes and fsyncs the file on its own thread *before* it
queues the row that names it, so the writer's commit stays small and a 4 MB contribution does
not hold up everybody else's (measured: an fsync of 4 MB inside the writer's transaction took
13-22 ms, and every honest write waited for it). Crash safety is unchanged: a row is committed
only after its file is durable, a file whose row never committed is removed at the next start
(and at once when its write is rejected), and a file is checked against the contribution id
(its SHA-256) whenever it is read.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from crowdsft.errors import CrowdSFTError, ProtocolError, StorageFullError, UnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# 2: contributions.payload_file (payloads kept beside the database); 3: rounds.consolidated
SCHEMA_VERSION = 3
# the columns each upgrade adds: (version it makes, table, column and type)
UPGRADES = (
    (2, "contributions", "payload_file TEXT"),
    (3, "rounds", "consolidated TEXT"),
)

# Payloads at least this large are kept in files beside the database (see the module text).
SIDE_PAYLOAD_BYTES = 65_536

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL UNIQUE,
    display_name TEXT NOT NULL DEFAULT '',
    registered_at_ms INTEGER NOT NULL,
    points REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS contributions (
    seq INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    node_id TEXT NOT NULL REFERENCES nodes(node_id),
    payload BLOB NOT NULL,
    signature BLOB NOT NULL,
    client_ts_ms INTEGER NOT NULL,
    accepted_at_ms INTEGER NOT NULL,
    example_count INTEGER NOT NULL,
    receipt BLOB NOT NULL,
    receipt_signature BLOB NOT NULL,
    payload_file TEXT  -- a large payload's file under <db>.payloads/ (payload is then empty)
);
CREATE INDEX IF NOT EXISTS contributions_by_node ON contributions(node_id);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY,
    status TEXT NOT NULL,  -- planned, trained, scored, finished
    seed INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    strategies TEXT NOT NULL,  -- JSON: the strategy names and options of this round
    base_lineage TEXT NOT NULL,  -- JSON: adapter hashes merged into the base model, in order
    groups TEXT NOT NULL,  -- JSON: node ids per group
    weights TEXT NOT NULL,  -- JSON: influence weight per member, per group
    base_score REAL,
    updated INTEGER,
    ranking TEXT,  -- JSON: candidates best first after any judging error
    swapped INTEGER,
    winner INTEGER,  -- a group (or the consolidated candidate: the index after the groups)
    consolidated TEXT  -- JSON: members, weights and upto of the consolidated candidate, or NULL
);
CREATE TABLE IF NOT EXISTS round_contributions (
    round_id INTEGER NOT NULL REFERENCES rounds(round_id),
    contribution_seq INTEGER NOT NULL REFERENCES contributions(seq),
    PRIMARY KEY (round_id, contribution_seq)
);
CREATE TABLE IF NOT EXISTS candidates (
    round_id INTEGER NOT NULL REFERENCES rounds(round_id),
    group_index INTEGER NOT NULL,
    adapter TEXT NOT NULL,  -- sha256 of the adapter file under data/adapters/
    training TEXT NOT NULL,  -- JSON: steps, tokens, losses, seed
    score REAL,
    PRIMARY KEY (round_id, group_index)
);
CREATE TABLE IF NOT EXISTS points_ledger (
    round_id INTEGER NOT NULL REFERENCES rounds(round_id),
    node_id TEXT NOT NULL REFERENCES nodes(node_id),
    points_before REAL NOT NULL,
    points_after REAL NOT NULL,
    PRIMARY KEY (round_id, node_id)
);
CREATE TABLE IF NOT EXISTS consumed (
    contribution_seq INTEGER PRIMARY KEY REFERENCES contributions(seq),
    round_id INTEGER NOT NULL REFERENCES rounds(round_id)
);
CREATE TABLE IF NOT EXISTS lineage (
    position INTEGER PRIMARY KEY,
    adapter TEXT NOT NULL,
    round_id INTEGER NOT NULL REFERENCES rounds(round_id)
);
CREATE TABLE IF NOT EXISTS ledger (
    round_id INTEGER PRIMARY KEY REFERENCES rounds(round_id),
    record BLOB NOT NULL,  -- canonical JSON (crowdsft.ledger)
    signature BLOB NOT NULL,  -- the coordinator's Ed25519 signature over the record
    hash BLOB NOT NULL  -- SHA-256 of the record; the next record names it
);
CREATE TABLE IF NOT EXISTS examples (
    fingerprint BLOB PRIMARY KEY,  -- crowdsft.validation.example_fingerprint
    contribution_id BLOB NOT NULL,
    node_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS flagged (
    contribution_seq INTEGER PRIMARY KEY REFERENCES contributions(seq),
    reason TEXT NOT NULL,  -- e.g. near-duplicate of contribution <id> (node <id>), similarity
    earlier_seq INTEGER,
    similarity REAL,
    round_id INTEGER  -- the round whose planning flagged it
);
CREATE TABLE IF NOT EXISTS invites (
    token_hash BLOB PRIMARY KEY,  -- SHA-256 of the token: the token itself is never stored
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    used_by TEXT,
    used_ms INTEGER
);
CREATE INDEX IF NOT EXISTS invites_by_node ON invites(used_by);
CREATE TABLE IF NOT EXISTS nonces (
    nonce BLOB NOT NULL,
    node_id TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    PRIMARY KEY (nonce, node_id)
) WITHOUT ROWID;
"""


class StoreError(CrowdSFTError):
    """The database cannot be opened or has an unexpected schema."""


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=30,
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class BatchOp:
    """An operation that the writer runs together with the others of its class in a batch:
    ``run_batch`` gets them in submission order and returns one result (or ProtocolError) per
    operation. It must see the effects of earlier operations in the same list."""

    @classmethod
    def run_batch(cls, conn: sqlite3.Connection, ops: list[Any]) -> list[Any]:
        raise NotImplementedError


Op = Callable[[sqlite3.Connection], Any] | BatchOp


Done = Callable[[bool, Any], None]


@dataclass
class _Request:
    op: Op
    done: Done  # called on the writer thread after the commit: (ok, result or exception)


_STOP = object()


def future_and_done() -> tuple[Future[Any], Done]:
    """A future and the ``done(ok, value)`` callback that settles it. The future is running
    from the start: a caller that stops waiting (``asyncio.wrap_future`` cancels on a
    client's deadline) cannot cancel it, so the writer can always set its result."""
    fut: Future[Any] = Future()
    fut.set_running_or_notify_cancel()

    def done(ok: bool, value: Any) -> None:
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    return fut, done


def _answer(req: _Request, ok: bool, value: Any) -> None:
    """Call a request's callback; one that fails is logged, never the end of the writer."""
    try:
        req.done(ok, value)
    except Exception:
        logger.exception("a store callback failed")


def _disk_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL (the disk, or the database's size limit) or the OS's ENOSPC."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc)
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a new or renamed file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """The database plus its writer thread. Use as a context manager or call ``close()``."""

    def __init__(
        self, path: Path, *, max_batch: int = 512, side_payload_bytes: int = SIDE_PAYLOAD_BYTES
    ) -> None:
        """``on_writable(ok)`` may be set to hear when writes start failing because the disk
        is full (False) and when they succeed again (True)."""
        self.on_writable: Callable[[bool], None] | None = None
        self.full = False
        self._full_lock = threading.Lock()  # the writer and payload writers both report
        self._payload_dir_ready = False
        self._payload_dir_lock = threading.Lock()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_batch = max_batch
        self.side_payload_bytes = side_payload_bytes
        self.payload_dir = self.path.with_name(self.path.name + ".payloads")
        try:
            self._conn = connect(self.path)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: could not switch to WAL mode (got {mode})")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        self._check_schema()
        # The sweep removes files that no committed row names: safe only where no other
        # process is writing payloads to this store. The first Store to open a database holds
        # an exclusive lock on it for its lifetime; another (a CLI command beside a running
        # coordinator) does not sweep.
        self._lock_fd: int | None = os.open(
            self.path.with_name(self.path.name + ".payloads.lock"), os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._lock_fd is not None:
            self._sweep_payload_files()
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._submit_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._writer = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._writer.start()

    def _check_schema(self) -> None:
        row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) < SCHEMA_VERSION:
            self._upgrade(int(row[0]))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {row[0]}; this coordinator reads {SCHEMA_VERSION}"
            )

    def _upgrade(self, found: int) -> None:
        """Bring a store of schema version ``found`` to ``SCHEMA_VERSION`` in one transaction
        (a crash leaves either version): each upgrade adds a column, which reads as NULL in
        the rows written before it."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for version, table, column in UPGRADES:
                if version <= found:
                    continue
                cols = [r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")]
                if column.split()[0] not in cols:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
            self._conn.execute(
                "UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),)
            )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        logger.info("%s: schema upgraded from version %d to %d", self.path, found, SCHEMA_VERSION)

    # -- large payloads, kept beside the database ---------------------------------------------

    def _sweep_payload_files(self) -> None:
        """Remove payload files that no committed row names (a crash between the file and its
        row, or a leftover temporary file). Runs before the writer starts: nothing is in
        flight."""
        if not self.payload_dir.is_dir():
            return
        named = {
            r[0]
            for r in self._conn.execute(
                "SELECT payload_file FROM contributions WHERE payload_file IS NOT NULL"
            )
        }
        removed = 0
        for entry in self.payload_dir.iterdir():
            if entry.name not in named:
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.info("removed %d payload file(s) that no stored contribution names", removed)

    def put_payload(self, payload: bytes, cid: bytes) -> str:
        """Write a large payload durably to its own file (on the caller's thread, before the
        row that names it is queued) and return the file's name. The name is unique per call,
        so that a rejected write can remove its file without touching another's."""
        name = f"{cid.hex()}-{secrets.token_hex(6)}"
        tmp = self.payload_dir / f".{name}.tmp"
        try:
            self._ensure_payload_dir()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.payload_dir / name)
            _fsync_dir(self.payload_dir)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if _disk_full(exc) or exc.errno == errno.EDQUOT:
                self._writable(False)
                raise StorageFullError(
                    "the coordinator's disk is full; nothing was stored; retry later"
                ) from None
            logger.error("cannot write a payload file under %s: %s", self.payload_dir, exc)
            raise UnavailableError(
                "the coordinator could not store the contribution; nothing was stored; retry"
            ) from None
        return name

    def _ensure_payload_dir(self) -> None:
        """Create the payload folder once, durably: its own entry in the database's folder is
        flushed too, so that a crash cannot lose the folder under a committed row."""
        if self._payload_dir_ready:
            return
        with self._payload_dir_lock:
            if self._payload_dir_ready:
                return
            if not self.payload_dir.is_dir():
                self.payload_dir.mkdir(exist_ok=True)
                _fsync_dir(self.payload_dir.parent)
            self._payload_dir_ready = True

    def drop_payload(self, name: str) -> None:
        """Remove the file of a payload whose row was not committed (a failure is logged: the
        next start's sweep removes it)."""
        try:
            (self.payload_dir / name).unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot remove payload file %s: %s", name, exc)

    def load_payload(self, stored: bytes, name: str | None, cid: bytes) -> bytes:
        """A contribution's payload bytes, inline or from its file, checked against the
        contribution id (its SHA-256) either way: bytes edited in the database or on disk
        are refused, never trained on or served."""
        if name is None:
            data = bytes(stored)
            if hashlib.sha256(data).digest() != cid:
                raise StoreError(
                    f"the stored payload of contribution {cid.hex()} does not match its id "
                    "(changed in the database)"
                )
            return data
        try:
            data = (self.payload_dir / name).read_bytes()
        except OSError as exc:
            raise StoreError(
                f"payload file of contribution {cid.hex()} is unreadable: {exc}"
            ) from None
        if hashlib.sha256(data).digest() != cid:
            raise StoreError(
                f"payload file {self.payload_dir / name} does not match contribution "
                f"{cid.hex()} (changed on disk)"
            )
        return data

    # -- writes -------------------------------------------------------------------------------

    def submit(self, op: Op) -> Future[Any]:
        """Queue ``op`` for the writer; the future resolves after its transaction commits.

        ``op`` runs inside the transaction on the writer's connection. It must check before it
        writes: a ProtocolError it raises fails only its own future, and it must not have
        written anything by then. Any other exception rolls back the batch, whose operations
        are then retried one by one.
        """
        fut, done = future_and_done()
        self.submit_with(op, done)
        return fut

    def submit_with(self, op: Op, done: Done) -> None:
        """Like ``submit``, but calls ``done(ok, value)`` on the writer thread after the commit
        (cheaper than a future on hot paths; ``done`` must be quick and must not block)."""
        with self._submit_lock:
            if not self._closed.is_set():
                self._queue.put(_Request(op, done))
                return
        done(False, UnavailableError("coordinator store is closed"))

    def write(self, op: Op, timeout: float | None = 60) -> Any:
        return self.submit(op).result(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._commit_batch(batch)  # type: ignore[arg-type]
            if stop:
                break
        self._drain(UnavailableError("coordinator is shutting down; retry"))

    @staticmethod
    def _apply(conn: sqlite3.Connection, batch: list[_Request]) -> list[tuple[bool, Any]]:
        """Run the batch's operations in order, those of one ``BatchOp`` class together."""
        outcomes: list[tuple[bool, Any]] = [(False, None)] * len(batch)
        groups: dict[type[BatchOp], list[int]] = {}
        for i, req in enumerate(batch):
            if isinstance(req.op, BatchOp):
                groups.setdefault(type(req.op), []).append(i)
                continue
            try:
                outcomes[i] = (True, req.op(conn))
            except ProtocolError as exc:
                outcomes[i] = (False, exc)
        for kind, idx in groups.items():
            results = kind.run_batch(conn, [batch[i].op for i in idx])
            for i, result in zip(idx, results, strict=True):
                outcomes[i] = (not isinstance(result, ProtocolError), result)
        return outcomes

    def _writable(self, ok: bool) -> None:
        """Record whether writes succeed; called from the writer and from the threads that
        write payload files, so the change and its announcement happen under one lock (two
        announcements never cross)."""
        with self._full_lock:
            if ok == (not self.full):
                return
            self.full = not ok
            if ok:
                logger.warning("the store accepts writes again")
            else:
                logger.error(
                    "the disk under %s is full: writes fail until space is freed", self.path
                )
            if self.on_writable is not None:
                self.on_writable(ok)

    def _commit_batch(self, batch: list[_Request]) -> None:
        changes_before = self._conn.total_changes
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            outcomes = self._apply(self._conn, batch)
            self._conn.execute("COMMIT")
        except Exception as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            if _disk_full(exc):
                self._writable(False)
                exc = StorageFullError(
                    "the coordinator's disk is full; nothing was stored; retry later"
                )
                for req in batch:
                    _answer(req, False, exc)
                return
            if len(batch) > 1:
                logger.warning("batch of %d failed (%s); retrying one by one", len(batch), exc)
                for req in batch:
                    self._commit_batch([req])
            else:
                logger.exception("store write failed")
                _answer(batch[0], False, exc)
            return
        if self._conn.total_changes != changes_before:
            self._writable(True)  # something was written: the disk takes writes again
        for req, (ok, value) in zip(batch, outcomes, strict=True):
            _answer(req, ok, value)

    def _drain(self, exc: Exception) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request):
                _answer(item, False, exc)

    # -- reads --------------------------------------------------------------------------------

    def reader(self) -> sqlite3.Connection:
        """This thread's read connection (sees committed data only)."""
        if self._closed.is_set():
            raise UnavailableError("coordinator store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.reader().execute(sql, params).fetchall()

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Commit what is queued, stop the writer, close every connection. Idempotent."""
        with self._submit_lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._queue.put(_STOP)
        self._writer.join()
        self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
