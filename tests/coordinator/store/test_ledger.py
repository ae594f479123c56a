"""The verifiable ledger: Merkle proofs, signed hash-chained round records, and ``node verify``
catching each kind of tampering."""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner

from crowdsft.cli import main
from crowdsft.coordinator.rounds.runner import RoundRunner
from crowdsft.ledger import (
    LEDGER_TAG,
    MerkleTree,
    canonical,
    merkle_root,
    record_hash,
    verify_inclusion,
    verify_ledger,
)
from crowdsft.testing.standin import StandInSpace


def ids(n: int) -> list[bytes]:
    return [bytes([i % 256, i // 256]) * 16 for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33])
def test_every_leaf_has_a_proof_and_tampering_breaks_it(n):
    leaves = ids(n)
    tree = MerkleTree(leaves)
    root = tree.root
    assert root == merkle_root(leaves)
    for i, cid in enumerate(leaves):
        path = tree.proof(i)
        assert len(path) <= max(1, (n - 1).bit_length())
        assert verify_inclusion(cid, i, n, path, root)
        assert not verify_inclusion(b"\xff" * 32, i, n, path, root)
        assert not verify_inclusion(cid, i, n, path, b"\x00" * 32)
        if n > 1:
            assert not verify_inclusion(cid, (i + 1) % n, n, path, root)
            bad = [bytes(32), *path[1:]]
            assert not verify_inclusion(cid, i, n, bad, root)
            assert not verify_inclusion(cid, i, n, path[:-1], root)


def test_root_depends_on_order_and_content():
    leaves = ids(6)
    assert merkle_root(leaves) != merkle_root(leaves[::-1])
    assert merkle_root(leaves) != merkle_root(leaves[:5])


def test_canonical_bytes_are_stable():
    a = canonical({"b": [1.5, None], "a": "é"})
    assert a == b'{"a":"\xc3\xa9","b":[1.5,null]}'
    with pytest.raises(ValueError):
        canonical({"x": float("nan")})


# -- a coordinator with rounds ------------------------------------------------------------------

NODES = 8
LENGTHS = [40, 38, 44, 10, 90, 35, 5, 60]  # response lengths: quality for the stand-in space


def words(n: int, k: int, length: int) -> str:
    """About ``length`` characters of text of its own (no two nodes' data look alike)."""
    import random

    rng = random.Random(f"{n}-{k}")
    out = ""
    while len(out) < length:
        out += "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) + " "
    return out[:length]


def cli(*args: str, ok: bool | None = True):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok is True:
        assert result.exit_code == 0, result.output
    return result


def submit_crowd(coord, tmp_path) -> list:
    keys = []
    for n in range(NODES):
        key = tmp_path / f"node{n}.key"
        cli("node", "keygen", "--out", str(key))
        data = tmp_path / f"node{n}.jsonl"
        data.write_text(
            "".join(
                json.dumps(
                    {"prompt": f"node {n} question {k}", "response": words(n, k, LENGTHS[n])}
                )
                + "\n"
                for k in range(3)
            )
        )
        cli(
            "node",
            "submit",
            "--coordinator",
            coord.address,
            "--key",
            str(key),
            str(data),
            "--no-progress",
        )
        keys.append(key)
    return keys


def run_rounds(coord, count: int) -> None:
    space = StandInSpace(coord.config.adapter_dir)
    runner = RoundRunner(coord.config, coord.coordinator.store, space)
    for _ in range(count):
        runner.run()


@pytest.fixture
def ledger_coord(make_coordinator, tmp_path):
    coord = make_coordinator(
        rounds={"groups": 2, "judging_error": 0.0, "seed": 5, "reward": "rank"}
    )
    keys = submit_crowd(coord, tmp_path)
    run_rounds(coord, 3)
    return coord, keys


def verify(coord, key, ok: bool = True) -> dict:
    result = cli(
        "node", "verify", "--coordinator", coord.address, "--key", str(key), "--json", ok=None
    )
    assert result.exit_code == (0 if ok else 1), result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("reward", ["rank", "marginal", "regression"])
def test_records_verify_and_imply_the_points(make_coordinator, tmp_path, reward):
    coord = make_coordinator(
        rounds={"groups": 2, "judging_error": 0.0, "seed": 5, "reward": reward}
    )
    submit_crowd(coord, tmp_path)
    run_rounds(coord, 3)
    with coord.client() as c:
        entries = c.ledger()
    assert [e.round_id for e in entries] == [1, 2, 3]
    report = verify_ledger(entries, coord.public_key)
    assert report.ok, [str(p) for p in report.problems]
    stored = dict(coord.coordinator.store.query("SELECT node_id, points FROM nodes"))
    assert stored and any(v != 0 for v in stored.values())
    for node, points in stored.items():
        assert report.points.get(node, 0.0) == pytest.approx(points, abs=1e-9)
    first = entries[0].data()
    assert first["prev_hash"] == "00" * 32
    assert report.head == record_hash(entries[-1].record).hex()
    assert entries[1].data()["prev_hash"] == record_hash(entries[0].record).hex()
    assert first["contributions"]["count"] == NODES * 3
    consumed = first["consumed"]
    winners = first["groups"][first["ranking"][0]] if first["updated"] else []
    assert consumed["count"] == 3 * len(winners) and sorted(consumed["nodes"]) == sorted(winners)
    assert len(consumed["merkle_root"]) == 64
    assert first["strategies"]["reward"] == reward


def test_rounds_a_judging_error_decided_verify_and_say_so(make_coordinator, tmp_path, caplog):
    """An operator may still simulate the paper's judge (rounds.judging_error > 0): a swapped
    round is recorded as such, its winner is not the best-scoring candidate, and nodes verify
    it and its points like any round."""
    coord = make_coordinator(
        rounds={"groups": 2, "judging_error": 1.0, "seed": 5, "reward": "rank"}
    )
    keys = submit_crowd(coord, tmp_path)
    with caplog.at_level("WARNING", logger="crowdsft.coordinator.rounds.runner"):
        run_rounds(coord, 3)
    warned = [r.getMessage() for r in caplog.records if "judging_error is 1" in r.getMessage()]
    assert len(warned) == 3 and "set it to 0" in warned[0]
    with coord.client() as c:
        entries = c.ledger()
    records = [e.data() for e in entries]
    swapped = [r for r in records if r["swapped"]]
    assert swapped and all(r["updated"] for r in swapped)
    for r in swapped:
        best = max(range(len(r["candidates"])), key=lambda i: r["candidates"][i]["score"])
        assert r["winner"] != best and r["strategies"]["judging_error"] == 1.0
    report = verify_ledger(entries, coord.public_key)
    assert report.ok, [str(p) for p in report.problems]
    assert verify(coord, keys[0])["ok"] is True


def test_every_node_verifies_an_honest_ledger(ledger_coord):
    coord, keys = ledger_coord
    stats = json.loads(
        cli("coordinator", "stats", "--config", str(coord.config.path), "--json").output
    )
    assert stats["rounds_finished"] == 3 and len(stats["ledger_head"]) == 64
    used = 0
    for key in keys:
        out = verify(coord, key)
        assert out["ok"] and out["rounds"] == 3 and out["receipts"] == 3
        used += out["included"]
    assert used == NODES * 3  # the first round used every contribution
    human = cli("node", "verify", "--coordinator", coord.address, "--key", str(keys[0])).output
    assert "everything checks out" in human


def _tamper(coord, round_id: int, edit=None, resign: bool = True, raw=None) -> None:
    """Change the stored record of ``round_id``: ``edit`` the parsed record and re-sign it with
    the coordinator's own key (an operator rewriting history), or replace its bytes or
    signature (``raw``) without re-signing."""
    conn = sqlite3.connect(coord.config.db_path)
    try:
        record, signature = conn.execute(
            "SELECT record, signature FROM ledger WHERE round_id=?", (round_id,)
        ).fetchone()
        if raw is not None:
            record, signature = raw(bytes(record), bytes(signature))
        else:
            data = json.loads(record)
            edit(data)
            record = canonical(data)
            if resign:
                signature = coord.coordinator.identity.sign(LEDGER_TAG + record)
        conn.execute(
            "UPDATE ledger SET record=?, signature=? WHERE round_id=?",
            (record, signature, round_id),
        )
        conn.commit()
    finally:
        conn.close()


def _winner_member(coord, round_id: int) -> str:
    rec = json.loads(
        coord.coordinator.store.query("SELECT record FROM ledger WHERE round_id=?", (round_id,))[0][
            0
        ]
    )
    return rec["groups"][rec["ranking"][0]][0]


def _key_of(coord, keys, node_id: str):
    from crowdsft.keys import load_private_key

    return next(k for k in keys if load_private_key(k).node_id == node_id)


def _kinds(out: dict) -> set[tuple[int | None, str]]:
    return {(p["round_id"], p["kind"]) for p in out["problems"]}


def test_a_changed_record_breaks_its_signature(ledger_coord):
    coord, keys = ledger_coord

    def change_score(record: bytes, signature: bytes):
        data = json.loads(record)
        data["candidates"][0]["score"] += 1.0
        return canonical(data), signature

    _tamper(coord, 2, raw=change_score)
    out = verify(coord, keys[0], ok=False)
    assert (2, "signature") in _kinds(out)


def test_a_forged_signature_is_caught(ledger_coord):
    coord, keys = ledger_coord
    _tamper(coord, 1, raw=lambda r, s: (r, bytes([s[0] ^ 1]) + s[1:]))
    out = verify(coord, keys[3], ok=False)
    assert (1, "signature") in _kinds(out)


def test_a_broken_link_is_caught(ledger_coord):
    coord, keys = ledger_coord

    def relink(data):
        data["prev_hash"] = "11" * 32

    _tamper(coord, 3, relink)  # validly signed, but not chained to round 2
    out = verify(coord, keys[0], ok=False)
    assert (3, "link") in _kinds(out)


def test_a_changed_points_entry_is_caught(ledger_coord):
    coord, keys = ledger_coord
    node = _winner_member(coord, 1)

    def inflate(data):
        before, after = data["points"][node]
        data["points"][node] = [before, after + 5]

    _tamper(coord, 1, inflate)
    out = verify(coord, _key_of(coord, keys, node), ok=False)
    problems = [p for p in out["problems"] if p["kind"] == "points" and p["round_id"] == 1]
    assert problems and node in problems[0]["message"]


def test_a_contribution_left_out_of_a_round_is_caught(ledger_coord):
    coord, keys = ledger_coord

    def other_root(data):
        data["contributions"]["merkle_root"] = "22" * 32

    _tamper(coord, 1, other_root)
    out = verify(coord, keys[0], ok=False)
    assert (1, "inclusion") in _kinds(out)


def test_points_reported_off_the_ledger_are_caught(ledger_coord):
    coord, keys = ledger_coord
    node = _winner_member(coord, 1)
    conn = sqlite3.connect(coord.config.db_path)
    conn.execute("UPDATE nodes SET points = points - 1 WHERE node_id=?", (node,))
    conn.commit()
    conn.close()
    out = verify(coord, _key_of(coord, keys, node), ok=False)
    assert (None, "status") in _kinds(out)
