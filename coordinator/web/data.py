"""What the live page shows, read from the store (and the last report, where one was
written): plain dicts, served as JSON under ``/api/`` and rendered into the page."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from crowdsft.config import CoordinatorConfig
from crowdsft.ledger import record_hash

from ..report.build import distance_of
from ..store import queries
from ..store.db import Store


def report_dir(config: CoordinatorConfig) -> Path:
    """Where ``crowdsft coordinator report`` writes by default, and the page reads from."""
    return config.data_dir / "report"


def last_report(config: CoordinatorConfig) -> dict[str, Any] | None:
    path = report_dir(config) / "report.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ledger_head(store: Store) -> dict[str, Any] | None:
    """The last signed ledger record: its round, hash and signature (hex)."""
    rows = store.query(
        "SELECT round_id, record, signature FROM ledger ORDER BY round_id DESC LIMIT 1"
    )
    if not rows:
        return None
    rid, record, signature = rows[0]
    rec = json.loads(bytes(record))
    return {
        "round_id": rid,
        "record_hash": record_hash(bytes(record)).hex(),
        "prev_hash": rec.get("prev_hash"),
        "signature": bytes(signature).hex(),
        "height": rid,
    }


def _round(r: queries.RoundRow, evaluation: str) -> dict[str, Any]:
    def dist(score: float | None) -> float | None:
        return None if score is None else distance_of(score, evaluation)

    return {
        "round_id": r.round_id,
        "status": r.status,
        "started_ms": r.started_ms,
        "finished_ms": r.finished_ms,
        "groups": r.groups,
        "updated": r.updated,
        "winner": r.winner,
        "ranking": r.ranking,
        "base_lineage": r.base_lineage,
        "base_distance": dist(r.base_score),
        "candidates": [
            {
                "group": c.group,
                "consolidated": c.group == len(r.groups),
                "adapter": c.adapter,
                "distance": dist(c.score),
            }
            for c in sorted(r.candidates, key=lambda c: c.group)
        ],
        "consolidated": (
            None if r.consolidated is None else {"members": len(r.consolidated["members"])}
        ),
        "n_candidates": len(r.groups) + (r.consolidated is not None),
        "winner_label": (
            None
            if not r.updated or r.winner is None
            else "the consolidated candidate"
            if r.consolidated_won
            else f"group {r.winner}"
        ),
    }


def rounds(
    store: Store, config: CoordinatorConfig, limit: int | None = None, offset: int = 0
) -> list[dict[str, Any]]:
    """Rounds, planned or finished, newest first (``limit`` of them from ``offset``); scores
    as distances (lower is better)."""
    ev = config.evaluation.function
    newest_first = list(reversed(queries.rounds(store)))
    page = newest_first[offset : None if limit is None else offset + limit]
    return [_round(r, ev) for r in page]


def round_count(store: Store) -> int:
    return int(store.query("SELECT COUNT(*) FROM rounds")[0][0])


def round_detail(store: Store, config: CoordinatorConfig, round_id: int) -> dict[str, Any] | None:
    found = [
        r for r in queries.rounds(store, after_round_id=round_id - 1) if r.round_id == round_id
    ]
    return _round(found[0], config.evaluation.function) if found else None


def lineage(store: Store) -> list[dict[str, Any]]:
    """The current model: the base and each adapter merged into it, with the round it won."""
    won: dict[str, int] = {}
    for r in queries.finished_rounds(store):
        if r.updated and r.winner is not None:
            for c in r.candidates:
                if c.group == r.winner:
                    won[c.adapter] = r.round_id
    return [{"adapter": a, "round_id": won.get(a)} for a in queries.lineage(store)]


def leaderboard(
    store: Store, config: CoordinatorConfig, limit: int | None = None, offset: int = 0
) -> list[dict[str, Any]]:
    """Nodes by points (``limit`` of them from place ``offset + 1``): points, rounds joined,
    contributions, and the value (± standard error) from the last report, where one was
    written. Ordered and cut in the store, so that a page costs the same with many nodes."""
    rows_ = store.query(
        "SELECT n.node_id, n.display_name, n.points, "
        "(SELECT COUNT(*) FROM contributions c WHERE c.node_id = n.node_id) AS k "
        "FROM nodes n ORDER BY n.points DESC, k DESC, n.node_id LIMIT ? OFFSET ?",
        (-1 if limit is None else limit, offset),
    )
    if not rows_:
        return []
    wanted = {r[0] for r in rows_}
    joined: dict[str, int] = {}
    for r in queries.finished_rounds(store):
        for group in r.groups:
            for node in group:
                if node in wanted:
                    joined[node] = joined.get(node, 0) + 1
    report = last_report(config) or {}
    values = {c["node_id"]: c for c in report.get("contributors", []) if "node_id" in c}
    rows = []
    for i, (node_id, name, points, k) in enumerate(rows_):
        v = values.get(node_id, {})
        stderr = v.get("shapley_stderr")
        rows.append(
            {
                "place": offset + i + 1,
                "node_id": node_id,
                "name": name or "",
                "points": points,
                "rounds_joined": joined.get(node_id, 0),
                "contributions": k,
                "value": v.get("shapley"),
                "value_stderr": None if stderr is None or math.isnan(stderr) else stderr,
            }
        )
    return rows


def standings(store: Store) -> dict[str, Any]:
    """Points in aggregate (what the page shows unless ``metrics.publish = "nodes"``): how
    many nodes hold points, the total, the median and the largest, and how points spread
    (deciles). No node is named."""
    points = [p for (p,) in store.query("SELECT points FROM nodes ORDER BY points")]
    n = len(points)
    held = [p for p in points if p > 0]

    def quantile(q: float) -> float | None:
        return points[min(n - 1, int(q * n))] if n else None

    return {
        "nodes": n,
        "nodes_with_points": len(held),
        "points_total": sum(points),
        "points_median": quantile(0.5),
        "points_max": points[-1] if n else None,
        "deciles": [quantile(q / 10) for q in range(1, 10)] if n else [],
    }


def node(store: Store, config: CoordinatorConfig, node_id: str) -> dict[str, Any] | None:
    """A node's registration, points, receipts (its contributions) and rounds."""
    row = queries.node_row(store, node_id)
    if row is None:
        return None
    receipts = [
        {
            "contribution_id": bytes(cid).hex(),
            "accepted_at_ms": at,
            "examples": n,
            # the signed receipt (crowdsft.v1.Receipt) and the coordinator's signature
            "receipt": bytes(receipt).hex(),
            "receipt_signature": bytes(signature).hex(),
        }
        for cid, at, n, receipt, signature in store.query(
            "SELECT id, accepted_at_ms, example_count, receipt, receipt_signature "
            "FROM contributions WHERE node_id=? ORDER BY seq",
            (node_id,),
        )
    ]
    return {
        "node_id": node_id,
        "name": row.display_name,
        "registered_at_ms": row.registered_at_ms,
        "points": row.points,
        "receipts": receipts,
        "rounds": queries.participation(store, node_id),
    }


def overview(store: Store, config: CoordinatorConfig) -> dict[str, Any]:
    """The page's head: the round in progress (if any), the last finished, the lineage, the
    ledger head and the counts."""
    all_rounds = rounds(store, config)
    current = next((r for r in all_rounds if r["status"] != "finished"), None)
    last = next((r for r in all_rounds if r["status"] == "finished"), None)
    counts = store.query(
        "SELECT (SELECT COUNT(*) FROM nodes), (SELECT COUNT(*) FROM contributions)"
    )[0]
    return {
        "round_in_progress": current,
        "last_round": last,
        "rounds_finished": sum(r["status"] == "finished" for r in all_rounds),
        "lineage": lineage(store),
        "ledger_head": ledger_head(store),
        "nodes": counts[0],
        "contributions": counts[1],
        "evaluation": config.evaluation.function,
        "report": last_report(config) is not None,
    }
