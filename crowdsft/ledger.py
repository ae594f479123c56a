"""The verifiable ledger: one signed record per finished round, chained by hash.

A record is a JSON object serialised canonically (sorted keys, no spaces, UTF-8, no NaN) and
signed by the coordinator with Ed25519 over ``LEDGER_TAG || record``. Its hash is the SHA-256
of the record bytes; each record names the hash of the one before it (``prev_hash``; the first
names 32 zero bytes), so a record cannot be changed, dropped or reordered without breaking
either a signature or a link.

The contributions a round used are committed to as a Merkle tree over their contribution ids
in store order (RFC 6962 hashing: a leaf is ``SHA-256(0x00 || id)``, an inner node
``SHA-256(0x01 || left || right)``, the tree split at the largest power of two below its size),
so a node can check that its contribution is in a round with a proof of ``log2(n)`` hashes
without seeing anyone else's.

This module is shared by the coordinator (which writes records) and the node (which checks
them); ``verify_ledger`` recomputes every points entry from the records with the reward rule
each record names.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from crowdsft.keys import verify_signature
from crowdsft.plugins.manager import StrategyFailed
from crowdsft.tournament import DecidedRound, award, replay_points

LEDGER_TAG = b"crowdsft.v1.LedgerRecord\n"
TREE_HEAD_TAG = b"crowdsft.v1.TreeHead\n"
RECORD_VERSION = 1
GENESIS_HASH = bytes(32)
POINTS_TOLERANCE = 1e-9


# -- canonical records -------------------------------------------------------------------------


def canonical(obj: Any) -> bytes:
    """The one byte string of a record: sorted keys, compact, UTF-8, finite numbers only."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def record_hash(record: bytes) -> bytes:
    return hashlib.sha256(record).digest()


# -- Merkle trees (RFC 6962) -------------------------------------------------------------------


def leaf_hash(contribution_id: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + contribution_id).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def merkle_root(ids: Sequence[bytes]) -> bytes:
    """The root over contribution ids (the SHA-256 of nothing for an empty list)."""
    return MerkleTree(ids).root


class MerkleTree:
    """A tree over a round's contribution ids, for many proofs from one build: every subtree
    hash is computed once and kept, so a root costs ``n - 1`` inner hashes and each proof
    ``log2(n)`` look-ups."""

    def __init__(self, ids: Sequence[bytes]) -> None:
        self.ids = list(ids)
        self._leaves = [leaf_hash(i) for i in self.ids]
        self.index = {cid: i for i, cid in enumerate(self.ids)}
        self._inner: dict[tuple[int, int], bytes] = {}

    def _hash(self, lo: int, hi: int) -> bytes:
        """The hash of the subtree over leaves ``lo`` to ``hi - 1``."""
        if hi - lo == 1:
            return self._leaves[lo]
        h = self._inner.get((lo, hi))
        if h is None:
            k = lo + _split(hi - lo)
            h = _node(self._hash(lo, k), self._hash(k, hi))
            self._inner[(lo, hi)] = h
        return h

    @property
    def root(self) -> bytes:
        return self._hash(0, len(self._leaves)) if self._leaves else hashlib.sha256(b"").digest()

    def proof(self, index: int) -> list[bytes]:
        """The audit path of leaf ``index``: sibling hashes from the leaf up."""
        if not 0 <= index < len(self._leaves):
            raise IndexError(f"leaf {index} is outside a tree of {len(self._leaves)}")
        lo, hi, path = 0, len(self._leaves), []
        while hi - lo > 1:
            k = lo + _split(hi - lo)
            if index < k:
                path.append(self._hash(k, hi))
                hi = k
            else:
                path.append(self._hash(lo, k))
                lo = k
        return path[::-1]


def inclusion_proof(ids: Sequence[bytes], index: int) -> list[bytes]:
    return MerkleTree(ids).proof(index)


def verify_inclusion(
    contribution_id: bytes, index: int, size: int, path: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``path`` proves leaf ``index`` of a tree of ``size`` leaves holds
    ``contribution_id`` under ``root`` (RFC 6962, section 2.1.1)."""
    if not 0 <= index < size:
        return False
    if any(len(p) != 32 for p in path):
        return False
    h = leaf_hash(contribution_id)
    fn, sn = index, size - 1
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            h = _node(p, h)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            h = _node(h, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and h == root


def consistency_proof(leaves: Sequence[bytes], first: int) -> list[bytes]:
    """The proof that the tree over the first ``first`` leaves is a prefix of the tree over
    all of ``leaves`` (RFC 9162, section 2.1.4.1; leaves are hashed as ``leaf_hash``)."""
    n = len(leaves)
    if not 0 < first <= n:
        raise ValueError(f"no consistency proof from {first} leaves to {n}")
    tree = MerkleTree(leaves)

    def sub(m: int, lo: int, hi: int, whole: bool) -> list[bytes]:
        if m == hi - lo:
            return [] if whole else [tree._hash(lo, hi)]
        k = _split(hi - lo)
        if m <= k:
            return [*sub(m, lo, lo + k, whole), tree._hash(lo + k, hi)]
        return [*sub(m - k, lo + k, hi, False), tree._hash(lo, lo + k)]

    return sub(first, 0, n, True)


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows that the tree of ``first`` leaves with ``first_root`` is a
    prefix of the tree of ``second`` leaves with ``second_root`` (RFC 9162, 2.1.4.2)."""
    if not 0 < first <= second or any(len(p) != 32 for p in proof):
        return False
    if first == second:
        return not proof and first_root == second_root
    path = list(proof)
    if first & (first - 1) == 0:  # an exact power of two: the old root is a subtree
        path.insert(0, first_root)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = _node(c, fr)
            sr = _node(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = _node(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    """A record as published: its exact bytes and the coordinator's signature over them."""

    round_id: int
    record: bytes
    signature: bytes

    @property
    def hash(self) -> bytes:
        return record_hash(self.record)

    def data(self) -> dict[str, Any]:
        return json.loads(self.record)


def sign_record(sign, record: dict[str, Any]) -> tuple[bytes, bytes]:
    """Serialise ``record`` canonically and sign it with ``sign`` (bytes -> signature)."""
    data = canonical(record)
    return data, sign(LEDGER_TAG + data)


@dataclass
class Problem:
    """One thing that does not check out, said precisely."""

    round_id: int | None
    kind: str  # signature, link, format, points, inclusion, receipt, status
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"round_id": self.round_id, "kind": self.kind, "message": self.message}

    def __str__(self) -> str:
        where = f"round {self.round_id}: " if self.round_id is not None else ""
        return f"{where}{self.kind}: {self.message}"


REQUIRED: dict[str, type | tuple[type, ...]] = {
    "version": int,
    "round_id": int,
    "prev_hash": str,
    "coordinator": str,
    "strategies": dict,
    "population": list,
    "groups": list,
    "weights": list,
    "contributions": dict,
    "candidates": list,
    "base_score": (int, float),
    "updated": bool,
    "ranking": list,
    "winner": (int, type(None)),
    "points": dict,
}


def _format_problems(rid: int, rec: dict[str, Any]) -> list[str]:
    out = []
    for key, kind in REQUIRED.items():
        if key not in rec:
            out.append(f"field {key!r} is missing")
        elif not isinstance(rec[key], kind):
            out.append(f"field {key!r} has the wrong type")
    if out:
        return out
    population = set(rec["population"])
    for g, members in enumerate(rec["groups"]):
        for n in members:
            if n not in population:
                out.append(f"group {g} names {n}, who is not in the population")
    extra = rec.get("consolidated")
    if extra is not None:
        if (
            not isinstance(extra, dict)
            or not isinstance(extra.get("members"), list)
            or not isinstance(extra.get("weights"), list)
            or len(extra["members"]) != len(extra["weights"])
        ):
            out.append("field 'consolidated' needs members and weights, one per member")
        else:
            for n in extra["members"]:
                if n not in population:
                    out.append(
                        f"the consolidated candidate names {n}, who is not in the population"
                    )
    n_candidates = len(rec["groups"]) + (1 if extra is not None else 0)
    if n_candidates != len(rec["candidates"]) or len(rec["groups"]) != len(rec["weights"]):
        out.append("groups, weights and candidates differ in number")
    ranked = [x for x in rec["ranking"] if not isinstance(x, int) or not 0 <= x < n_candidates]
    if ranked or len(set(rec["ranking"])) != len(rec["ranking"]):
        out.append("the ranking names candidates that the record does not hold")
    if rec["winner"] is not None and not 0 <= rec["winner"] < n_candidates:
        out.append("the winner names a candidate that the record does not hold")
    if "reward" not in rec["strategies"]:
        out.append("strategies do not name the reward rule")
    return out


@dataclass
class LedgerReport:
    """What ``verify_ledger`` found: problems (empty when everything checks out) and the
    points it recomputed, per node, after the last record."""

    rounds: int = 0
    head: str = GENESIS_HASH.hex()  # hash of the last record: compare it with other nodes
    problems: list[Problem] = field(default_factory=list)
    points: dict[str, float] = field(default_factory=dict)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_ledger(
    entries: Sequence[LedgerEntry], coordinator_key: bytes, plugins=None
) -> LedgerReport:
    """Check every signature and hash link and recompute every points entry.

    Records must come in order from round 1. Points are recomputed with the reward rule each
    record names, replaying the earlier records with the function the coordinator decides
    with (``crowdsft.tournament.replay_points``); a record that cannot be trusted or read (bad
    signature, bad format) is reported and not used for replay; a validly signed record with a
    broken link is reported and still replayed (its content is the coordinator's word).
    """
    from crowdsft.plugins.manager import get_plugins

    plugins = plugins or get_plugins()
    report = LedgerReport()
    prev = GENESIS_HASH
    good: list[dict[str, Any]] = []
    awarded: dict[str, float] = {}
    key_hex = coordinator_key.hex()
    for expected_id, entry in enumerate(entries, 1):
        rid = entry.round_id
        report.rounds += 1
        if not verify_signature(coordinator_key, entry.signature, LEDGER_TAG + entry.record):
            report.problems.append(
                Problem(rid, "signature", "the coordinator's signature does not match the record")
            )
            prev = entry.hash
            continue
        try:
            rec = entry.data()
        except ValueError as exc:
            report.problems.append(Problem(rid, "format", f"the record is not JSON: {exc}"))
            prev = entry.hash
            continue
        if not isinstance(rec, dict):
            report.problems.append(Problem(rid, "format", "the record is not a JSON object"))
            prev = entry.hash
            continue
        try:
            bad = _format_problems(rid, rec)
        except TypeError as exc:  # e.g. a list where a node id should be
            bad = [f"unexpected content: {exc}"]
        if bad:
            report.problems += [Problem(rid, "format", m) for m in bad]
            prev = entry.hash
            continue
        if rec["round_id"] != rid or rid != expected_id:
            report.problems.append(
                Problem(
                    rid,
                    "link",
                    f"record is for round {rec['round_id']}, listed as round {rid}; "
                    f"round {expected_id} was expected here",
                )
            )
        if rec["coordinator"] != key_hex:
            report.problems.append(
                Problem(rid, "signature", "the record names another coordinator key")
            )
        if rec["prev_hash"] != prev.hex():
            report.problems.append(
                Problem(
                    rid,
                    "link",
                    f"prev_hash {rec['prev_hash'][:16]}… does not match the hash of the "
                    f"previous record {prev.hex()[:16]}…",
                )
            )
        prev = entry.hash
        report.records[rid] = rec
        report.problems += _check_points(rec, good, awarded, plugins)
        good.append(rec)
        for node, (_before, after) in rec["points"].items():
            awarded[node] = float(after)
    report.points = dict(awarded)
    report.head = prev.hex()
    return report


def recompute_points(
    rec: dict[str, Any],
    earlier: Sequence[dict[str, Any]],
    awarded: dict[str, float],
    reward,
) -> dict[str, float]:
    """Everyone's points after ``rec`` (points awarded, i.e. without the initial 1), as the
    coordinator computes them: ``tournament.replay_points`` over this round's population
    with a fresh ``reward`` rule, then this round's recorded outcome."""
    everyone = list(rec["population"])
    points = replay_points(
        reward, everyone, [DecidedRound.from_record(r) for r in earlier], awarded
    )
    this = DecidedRound.from_record(rec)
    index = {n: i for i, n in enumerate(everyone)}
    points = award(reward, points, this.outcome(index), this.updated)
    return {n: float(points[i]) - 1.0 for i, n in enumerate(everyone)}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=POINTS_TOLERANCE, abs_tol=POINTS_TOLERANCE)


def _check_points(
    rec: dict[str, Any], earlier: Sequence[dict[str, Any]], awarded: dict[str, float], plugins
) -> list[Problem]:
    rid = rec["round_id"]
    name = rec["strategies"]["reward"]
    options = rec["strategies"].get("options", {}).get("reward", {})
    if name not in plugins.names("reward"):
        package = rec["strategies"].get("packages", {}).get("reward")
        where = (
            f"install {package.rsplit(' ', 1)[0]} (the record names {package})"
            if isinstance(package, str) and package
            else "install the plugin that provides it (the record names no package)"
        )
        return [
            Problem(
                rid,
                "unchecked",
                f"cannot check the points: the reward rule {name!r} is not installed here; "
                f"{where}, then run node verify again",
            )
        ]
    try:
        reward = plugins.create("reward", name, **options)
    except Exception as exc:  # a rule that cannot be built is a finding, not a crash
        return [Problem(rid, "points", f"cannot recompute: reward rule {name!r}: {exc}")]
    try:
        expected = recompute_points(rec, earlier, awarded, reward)
    except (ValueError, KeyError, IndexError, TypeError, StrategyFailed) as exc:
        return [Problem(rid, "points", f"cannot recompute the points: {exc}")]
    problems = []
    listed = rec["points"]
    for node, value in sorted(expected.items()):
        before = awarded.get(node, 0.0)
        entry = listed.get(node)
        if entry is None:
            if not _close(value, before):
                problems.append(
                    Problem(
                        rid,
                        "points",
                        f"node {node}: the record lists no change, but the {name} rule gives "
                        f"{value:.6g} (was {before:.6g})",
                    )
                )
            continue
        b, a = float(entry[0]), float(entry[1])
        if not _close(b, before):
            problems.append(
                Problem(
                    rid,
                    "points",
                    f"node {node}: points before are {b:.6g} in the record, {before:.6g} after "
                    f"the earlier records",
                )
            )
        if not _close(a, value):
            problems.append(
                Problem(
                    rid,
                    "points",
                    f"node {node}: {a:.6g} points in the record, {value:.6g} by the {name} rule",
                )
            )
    for node in sorted(set(listed) - set(expected)):
        problems.append(
            Problem(rid, "points", f"node {node} has a points entry but is not in the population")
        )
    return problems


# -- heads: what a node remembers, and what nodes compare ---------------------------------------

HEAD_FORMAT = "crowdsft-ledger-head/1"


@dataclass(frozen=True)
class SignedHead:
    """A ledger head: the record of round ``round_id`` and the coordinator's signature over
    it. Each record names the hash of the one before, so a signed record commits the
    coordinator to the whole history up to it: it is the signed tree head of this log, and
    the records between two heads are the proof that the later one extends the earlier.

    Two valid heads of one coordinator with the same ``round_id`` and different records are
    proof that it showed two histories (anyone can check both signatures); a valid head for
    a round that the coordinator no longer shows is proof that it rolled its ledger back."""

    coordinator_key: bytes
    round_id: int
    record: bytes
    signature: bytes

    @classmethod
    def of(cls, coordinator_key: bytes, entry: LedgerEntry) -> SignedHead:
        return cls(coordinator_key, entry.round_id, entry.record, entry.signature)

    @property
    def hash(self) -> bytes:
        return record_hash(self.record)

    def valid(self) -> bool:
        """The signature verifies under ``coordinator_key`` and the record names its round."""
        if not verify_signature(self.coordinator_key, self.signature, LEDGER_TAG + self.record):
            return False
        try:
            rec = json.loads(self.record)
        except ValueError:
            return False
        return isinstance(rec, dict) and rec.get("round_id") == self.round_id

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": HEAD_FORMAT,
            "coordinator_key": self.coordinator_key.hex(),
            "round_id": self.round_id,
            "record_hash": self.hash.hex(),
            "record": self.record.decode("utf-8"),
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> SignedHead:
        """A head as ``as_dict`` writes it (a ``node head`` file); ValueError if malformed."""
        if not isinstance(data, dict) or data.get("format") != HEAD_FORMAT:
            raise ValueError(f"not a ledger head (format {HEAD_FORMAT!r} expected)")
        try:
            head = cls(
                bytes.fromhex(data["coordinator_key"]),
                int(data["round_id"]),
                str(data["record"]).encode("utf-8"),
                bytes.fromhex(data["signature"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed ledger head: {exc}") from None
        return head


@dataclass(frozen=True)
class HeadCheck:
    """How a ledger compares with a head seen before: ``consistent`` (the ledger extends it),
    ``behind`` (a peer's head is later than the ledger we were shown: fetch again; if the
    coordinator still shows less, it is showing different nodes different ledgers),
    ``rollback`` (a head we verified ourselves is later than the ledger now shown) or ``fork``
    (the ledger's record at the head's round is another one: ``other`` is that record, and
    the two signed records are the proof)."""

    kind: str
    message: str
    other: LedgerEntry | None = None


def check_head(head: SignedHead, entries: Sequence[LedgerEntry], own: bool = True) -> HeadCheck:
    """Compare ``entries`` (a ledger from round 1, as verified by ``verify_ledger``) with
    ``head``. ``own``: a head this node verified itself (a shorter ledger is then a rollback);
    else a peer's (a shorter ledger may just be stale)."""
    size = len(entries)
    short = head.hash.hex()[:16]
    if head.round_id > size:
        if own:
            return HeadCheck(
                "rollback",
                f"this node verified round {head.round_id} (record {short}…, signed by the "
                f"coordinator) and the ledger now shows {size} round(s): it was rolled back",
            )
        return HeadCheck(
            "behind",
            f"a peer holds the coordinator's signed record of round {head.round_id}; the "
            f"ledger shown to this node has {size} round(s)",
        )
    entry = entries[head.round_id - 1]
    if entry.record != head.record:
        return HeadCheck(
            "fork",
            f"round {head.round_id}: the ledger's record {entry.hash.hex()[:16]}… is not the "
            f"record {short}… {'this node verified before' if own else 'a peer holds'}; both "
            "are signed by the coordinator, which has shown two histories",
            other=entry,
        )
    return HeadCheck("consistent", f"the ledger extends round {head.round_id} ({short}…)")


# -- the ledger as a transparency log (RFC 9162) ----------------------------------------------


def log_root(records: Sequence[bytes]) -> bytes:
    """The Merkle root over ledger records (each leaf ``SHA-256(0x00 || record)``)."""
    return MerkleTree(list(records)).root


@dataclass(frozen=True)
class SignedTreeHead:
    """The coordinator's signed statement of its whole ledger: ``tree_size`` records whose
    Merkle tree (over the record bytes) has ``root_hash``, at ``timestamp_ms``. Two valid
    heads with the same size and different roots prove the coordinator showed two logs."""

    coordinator_key: bytes
    head: bytes
    signature: bytes

    @classmethod
    def sign(cls, identity: Any, records: Sequence[bytes], timestamp_ms: int) -> SignedTreeHead:
        head = canonical(
            {
                "coordinator": identity.public_key.hex(),
                "root_hash": log_root(records).hex(),
                "timestamp_ms": int(timestamp_ms),
                "tree_size": len(records),
                "version": 1,
            }
        )
        return cls(identity.public_key, head, identity.sign(TREE_HEAD_TAG + head))

    def data(self) -> dict[str, Any]:
        return dict(self._parsed)

    @functools.cached_property
    def _parsed(self) -> dict[str, Any]:  # parsed once: size and root are read often
        return json.loads(self.head)

    @property
    def size(self) -> int:
        return int(self._parsed["tree_size"])

    @property
    def root(self) -> bytes:
        return bytes.fromhex(self._parsed["root_hash"])

    def valid(self) -> bool:
        """Signed by ``coordinator_key``, naming it, with a size and a 32-byte root."""
        if not verify_signature(self.coordinator_key, self.signature, TREE_HEAD_TAG + self.head):
            return False
        try:
            d = self.data()
            ok = d["coordinator"] == self.coordinator_key.hex() and len(self.root) == 32
            return ok and isinstance(d["tree_size"], int) and d["tree_size"] >= 0
        except (ValueError, KeyError, TypeError):
            return False


def check_tree_head(
    new: SignedTreeHead,
    proof: Sequence[bytes],
    entries: Sequence[LedgerEntry],
    known: SignedTreeHead | None,
) -> list[tuple[str, str]]:
    """(kind, message) for each way ``new`` fails: it must be validly signed, describe the
    ledger served (its first ``tree_size`` records, fetched after the head), and extend
    ``known`` (the head this node verified before) by the consistency ``proof``."""
    if not new.valid():
        return [("tree-head", "the tree head is not validly signed by the coordinator")]
    found: list[tuple[str, str]] = []
    # the head is fetched before the ledger: a round may have finished in between, so the
    # ledger may be longer, never shorter, and its first tree_size records are the head's
    served = [e.record for e in entries[: new.size]]
    if len(served) < new.size or new.root != log_root(served):
        found.append(
            (
                "tree-head",
                f"the signed tree head ({new.size} records, root {new.root.hex()[:16]}…) does "
                f"not describe the ledger served ({len(entries)} records)",
            )
        )
    if known is None or known.size == 0:
        return found
    if new.size < known.size:
        found.append(
            (
                "rollback",
                f"this node verified a signed tree of {known.size} records; the coordinator "
                f"now signs one of {new.size}",
            )
        )
    elif new.size == known.size and new.root != known.root:
        found.append(
            (
                "fork",
                f"two signed tree heads of {new.size} records with different roots: the "
                "coordinator signed two logs",
            )
        )
    elif new.size > known.size and not verify_consistency(
        known.size, new.size, known.root, new.root, proof
    ):
        found.append(
            (
                "fork",
                f"the signed tree of {new.size} records does not extend the one of "
                f"{known.size} this node verified (the consistency proof fails)",
            )
        )
    return found
