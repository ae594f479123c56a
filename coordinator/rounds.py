"""Fine-tuning rounds in the coordinator: the round engine over the contributions in the
store, persisted step by step so that a coordinator stopped at any point resumes the round
and finishes it exactly once.

A round moves through these states, each committed before the next begins:

``planned``
    the contributors (nodes with contributions not yet consumed), their groups, influence
    weights, the round's seed and the base model's lineage are fixed;
``trained``
    every group's candidate adapter is trained and stored by content hash (one commit per
    candidate: a restart retrains only the candidates that were not stored);
``scored``
    the base model and every candidate are scored against the target (one commit each);
``finished``
    selection, reward, the points ledger, the consumed contributions and the new model
    lineage, all in one transaction.

All randomness derives from ``(rounds.seed, round_id)``, so a resumed round makes the same
decisions it would have made without the interruption.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from crowdsft.config import CoordinatorConfig
from crowdsft.errors import CrowdSFTError
from crowdsft.node.envelope import now_ms
from crowdsft.node.keys import Identity
from crowdsft.plugins.manager import Plugins, get_plugins
from crowdsft.plugins.reward import RoundOutcome
from crowdsft.v1 import contribution_pb2
from crowdsft.validation import example_dicts

from .candidate import Candidate
from .engine import RoundEngine, Strategies, TournamentState
from .ledger import append_record
from .store import Store

logger = logging.getLogger(__name__)

STEPS = ("planned", "trained", "scored", "finished")


class NotEnoughContributors(CrowdSFTError):
    """There are fewer contributors with unconsumed data than groups."""


class RoundInterrupted(CrowdSFTError):
    """Raised on purpose after a persisted step (``stop_after``), as a crash would."""


class RoundSpace(Protocol):
    """What the runner needs of a model space (``LLMSpace`` is one)."""

    n_contributors: int

    def set_data(self, data: Sequence[Sequence[dict[str, str]]]) -> None: ...

    def propose(self, base: Candidate, members: np.ndarray, weights: np.ndarray, rng) -> Any: ...

    def score(self, models: Sequence[Candidate]) -> np.ndarray: ...

    def training_info(self, adapter: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RoundSummary:
    round_id: int
    groups: list[list[str]]  # node ids
    scores: list[float]
    base_score: float
    updated: bool
    winner: int | None
    ranking: list[int]
    swapped: bool
    points: dict[str, float]  # node id -> points after the round
    adapters: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def examples_of(payload: bytes) -> list[dict[str, str]]:
    return example_dicts(contribution_pb2.ContributionPayload.FromString(payload))


class RoundRunner:
    def __init__(
        self,
        config: CoordinatorConfig,
        store: Store,
        space: RoundSpace,
        plugins: Plugins | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        identity: Identity | None = None,
    ) -> None:
        """``identity`` signs the ledger records (the coordinator's key from ``config`` by
        default)."""
        from .server import load_identity

        self.config = config
        self.identity = identity or load_identity(config)
        self.store = store
        self.space = space
        self.plugins = plugins or get_plugins()
        self.on_event = on_event or (lambda kind, info: None)
        self._stop_after: str | None = None
        self._embedded: dict[str, np.ndarray] = {}  # near-duplicate checks: text -> vector

    # -- strategies -----------------------------------------------------------------------

    def _strategies(self) -> Strategies:
        r = self.config.rounds
        p = self.plugins
        return Strategies(
            grouping=p.create("grouping", r.grouping, groups=r.groups),
            selection=p.create("selection", r.selection, error=r.judging_error),
            reward=p.create("reward", r.reward),
            influence=p.create("influence", r.influence),
        )

    def _rng(self, round_id: int, stream: int, *more: int) -> np.random.Generator:
        return np.random.default_rng([self.config.rounds.seed, round_id, stream, *more])

    # -- reads ----------------------------------------------------------------------------

    def _q(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.store.query(sql, params)

    def _execute(self, sql: str, params: tuple[Any, ...]) -> None:
        """One statement in its own committed transaction."""
        self.store.write(lambda conn: conn.execute(sql, params))

    def unfinished(self) -> int | None:
        rows = self._q("SELECT round_id FROM rounds WHERE status != 'finished' ORDER BY round_id")
        return rows[0][0] if rows else None

    def lineage(self) -> list[str]:
        return [r[0] for r in self._q("SELECT adapter FROM lineage ORDER BY position")]

    def points(self) -> dict[str, float]:
        """Points awarded so far, per node (0 for nodes never in a finished round)."""
        return {r[0]: r[1] for r in self._q("SELECT node_id, points FROM nodes")}

    # -- the round ------------------------------------------------------------------------

    def run(self, stop_after: str | None = None) -> RoundSummary:
        """Run (or resume) one round to its end. ``stop_after`` names a step after which to
        stop by raising RoundInterrupted (for tests of resumption)."""
        self._stop_after = stop_after
        round_id = self.unfinished()
        if round_id is None:
            round_id = self._plan()
            self._maybe_stop(stop_after, "planned")
        else:
            logger.info("resuming round %d", round_id)
            self.on_event("round_resumed", {"round_id": round_id})
        row = self._q(
            "SELECT status, groups, weights, base_lineage FROM rounds WHERE round_id=?",
            (round_id,),
        )[0]
        groups_nodes: list[list[str]] = json.loads(row[1])
        weights = [np.asarray(w, dtype=float) for w in json.loads(row[2])]
        base = Candidate(tuple(json.loads(row[3])))
        contributors = [n for g in groups_nodes for n in g]
        index = {n: i for i, n in enumerate(contributors)}
        self.space.set_data(self._data(round_id, contributors))
        groups = [np.array([index[n] for n in g], dtype=np.int64) for g in groups_nodes]

        adapters = self._train(round_id, base, groups, weights)
        self._maybe_stop(stop_after, "trained")
        base_score, scores = self._score(round_id, base, adapters)
        self._maybe_stop(stop_after, "scored")
        return self._finish(round_id, groups_nodes, weights, adapters, scores, base_score, base)

    @staticmethod
    def _maybe_stop(stop_after: str | None, step: str) -> None:
        if stop_after == step:
            raise RoundInterrupted(f"stopped after step {step!r} on request")

    def _plan(self) -> int:
        r = self.config.rounds
        round_id = (self._q("SELECT COALESCE(MAX(round_id), 0) FROM rounds")[0][0] or 0) + 1
        self._flag_near_duplicates(round_id)
        pool = self._q(
            "SELECT c.node_id, c.seq FROM contributions c "
            "LEFT JOIN consumed x ON x.contribution_seq = c.seq "
            "LEFT JOIN flagged f ON f.contribution_seq = c.seq "
            "WHERE x.contribution_seq IS NULL AND f.contribution_seq IS NULL "
            "ORDER BY c.node_id, c.seq"
        )
        by_node: dict[str, list[int]] = {}
        for node_id, seq in pool:
            by_node.setdefault(node_id, []).append(seq)
        nodes = sorted(by_node)
        if len(nodes) < r.groups:
            raise NotEnoughContributors(
                f"a round needs at least {r.groups} contributors with unconsumed data; "
                f"there are {len(nodes)}"
            )
        awarded = self.points()
        points = np.array([1.0 + awarded.get(n, 0.0) for n in nodes])
        strategies = self._strategies()
        engine = RoundEngine(space=None, strategies=strategies, rounds=r.planned_rounds)
        state = TournamentState(base=None, base_score=0.0, points=points, round_index=round_id - 1)
        groups, weights = engine.plan(state, self._rng(round_id, 0))
        groups_nodes = [[nodes[i] for i in g] for g in groups]
        lineage = self.lineage()
        strategies_json = json.dumps(
            {
                "grouping": r.grouping,
                "groups": r.groups,
                "selection": r.selection,
                "judging_error": r.judging_error,
                "reward": r.reward,
                "influence": r.influence,
                "consume": r.consume,
                "evaluation": self.config.evaluation.function,
                "embedder": self.config.evaluation.embedder,
                "seed": r.seed,
            }
        )

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO rounds(round_id, status, seed, started_ms, strategies, base_lineage, "
                "groups, weights) VALUES (?, 'planned', ?, ?, ?, ?, ?, ?)",
                (
                    round_id,
                    r.seed,
                    now_ms(),
                    strategies_json,
                    json.dumps(lineage),
                    json.dumps(groups_nodes),
                    json.dumps([w.tolist() for w in weights]),
                ),
            )
            conn.executemany(
                "INSERT INTO round_contributions(round_id, contribution_seq) VALUES (?, ?)",
                [(round_id, seq) for n in nodes for seq in by_node[n]],
            )

        self.store.write(op)
        logger.info(
            "round %d planned: %d contributors in %d groups", round_id, len(nodes), len(groups)
        )
        self.on_event("round_planned", {"round_id": round_id, "groups": groups_nodes})
        return round_id

    def _flag_near_duplicates(self, round_id: int) -> None:
        """Flag contributions with an example at least ``near_duplicate_threshold`` similar
        (cosine, in the space's embedding) to an example of an earlier contribution from
        another node. Flagged contributions never enter a round, so a copier gains nothing;
        the earlier submitter keeps the credit. Deterministic for a given store, so a round
        planned again after a crash flags the same contributions."""
        threshold = self.config.admission.near_duplicate_threshold
        embed = getattr(self.space, "embed", None)
        if threshold <= 0 or embed is None:
            return
        rows = self._q(
            "SELECT c.seq, c.id, c.node_id, c.payload FROM contributions c "
            "LEFT JOIN flagged f ON f.contribution_seq = c.seq "
            "WHERE f.contribution_seq IS NULL ORDER BY c.seq"
        )
        unused = {
            seq
            for (seq,) in self._q(
                "SELECT c.seq FROM contributions c "
                "LEFT JOIN round_contributions rc ON rc.contribution_seq = c.seq "
                "WHERE rc.contribution_seq IS NULL"
            )
        }
        if not unused:
            return
        texts, owner = [], []  # one row per example: (contribution row index)
        for k, (_seq, _cid, _node, payload) in enumerate(rows):
            for e in examples_of(payload):
                texts.append(f"{e.get('system', '')}\n{e['prompt']}\n{e['response']}")
                owner.append(k)
        if not texts:
            return
        emb = self._embeddings(embed, texts)
        owner_a = np.asarray(owner)
        seqs = np.array([r[0] for r in rows])
        nodes = np.array([r[2] for r in rows])
        flagged: dict[int, tuple[int, float]] = {}  # row index -> (earlier row index, sim)
        check = [i for i, k in enumerate(owner) if rows[k][0] in unused]
        for start in range(0, len(check), 512):
            idx = np.asarray(check[start : start + 512])
            sims = emb[idx] @ emb.T
            mine = owner_a[idx]
            earlier = seqs[owner_a][None, :] < seqs[mine][:, None]
            other = nodes[owner_a][None, :] != nodes[mine][:, None]
            ok = earlier & other & ~np.isin(owner_a, list(flagged))[None, :]
            sims = np.where(ok, sims, -np.inf)
            best = sims.argmax(axis=1)
            for j, k in enumerate(mine):
                s = float(sims[j, best[j]])
                if s >= threshold - 1e-9 and (k not in flagged or s > flagged[k][1]):
                    flagged[int(k)] = (int(owner_a[best[j]]), s)
        if not flagged:
            return
        entries = []
        for k, (first, s) in sorted(flagged.items()):
            entries.append(
                (
                    int(rows[k][0]),
                    f"near-duplicate (cosine {s:.3f}) of contribution "
                    f"{bytes(rows[first][1]).hex()} from node {rows[first][2]}, submitted earlier",
                    int(rows[first][0]),
                    s,
                    round_id,
                )
            )
        self.store.write(
            lambda conn: conn.executemany(
                "INSERT OR IGNORE INTO flagged(contribution_seq, reason, earlier_seq, "
                "similarity, round_id) VALUES (?, ?, ?, ?, ?)",
                entries,
            )
        )
        logger.info(
            "round %d: %d contribution(s) flagged as near-duplicates", round_id, len(entries)
        )
        self.on_event("near_duplicates_flagged", {"round_id": round_id, "count": len(entries)})

    def _embeddings(self, embed: Callable[[list[str]], Any], texts: list[str]) -> np.ndarray:
        """Unit-length embeddings of ``texts``; each text is embedded once per runner (rounds
        compare new examples with every earlier one, which would otherwise be re-embedded in
        every round)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._embedded]
        if new:
            vectors = np.asarray(embed(new), dtype=float)
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            self._embedded.update(zip(new, vectors, strict=True))
        return np.stack([self._embedded[t] for t in texts])

    def _data(self, round_id: int, contributors: list[str]) -> list[list[dict[str, str]]]:
        rows = self._q(
            "SELECT c.node_id, c.payload FROM round_contributions rc "
            "JOIN contributions c ON c.seq = rc.contribution_seq "
            "WHERE rc.round_id=? ORDER BY c.seq",
            (round_id,),
        )
        data: dict[str, list[dict[str, str]]] = {n: [] for n in contributors}
        for node_id, payload in rows:
            data[node_id] += examples_of(payload)
        return [data[n] for n in contributors]

    def _train(
        self, round_id: int, base: Candidate, groups: list[np.ndarray], weights: list[np.ndarray]
    ) -> list[str]:
        done = dict(
            self._q("SELECT group_index, adapter FROM candidates WHERE round_id=?", (round_id,))
        )
        for g, (members, w) in enumerate(zip(groups, weights, strict=True)):
            if g in done:
                continue
            self.on_event(
                "candidate_training", {"round_id": round_id, "group": g, "members": len(members)}
            )
            cand = self.space.propose(base, members, w, self._rng(round_id, 1, g))
            info = json.dumps(self.space.training_info(cand.adapter))
            self._execute(
                "INSERT INTO candidates(round_id, group_index, adapter, training) "
                "VALUES (?, ?, ?, ?)",
                (round_id, g, cand.adapter, info),
            )
            done[g] = cand.adapter
            self.on_event(
                "candidate_trained", {"round_id": round_id, "group": g, "adapter": cand.adapter}
            )
            self._maybe_stop(self._stop_after, f"candidate:{g}")
        self.store.write(
            lambda conn: conn.execute(
                "UPDATE rounds SET status='trained' WHERE round_id=? AND status='planned'",
                (round_id,),
            )
        )
        return [done[g] for g in range(len(groups))]

    def _score(
        self, round_id: int, base: Candidate, adapters: list[str]
    ) -> tuple[float, list[float]]:
        row = self._q("SELECT base_score FROM rounds WHERE round_id=?", (round_id,))[0]
        base_score = row[0]
        if base_score is None:
            base_score = float(self.space.score([base])[0])
            self.store.write(
                lambda conn: conn.execute(
                    "UPDATE rounds SET base_score=? WHERE round_id=?", (base_score, round_id)
                )
            )
        stored = dict(
            self._q("SELECT group_index, score FROM candidates WHERE round_id=?", (round_id,))
        )
        scores = []
        for g, adapter in enumerate(adapters):
            s = stored.get(g)
            if s is None:
                s = float(self.space.score([Candidate(base.lineage, adapter)])[0])
                self._execute(
                    "UPDATE candidates SET score=? WHERE round_id=? AND group_index=?",
                    (s, round_id, g),
                )
                self.on_event("candidate_scored", {"round_id": round_id, "group": g, "score": s})
            scores.append(s)
        self.store.write(
            lambda conn: conn.execute(
                "UPDATE rounds SET status='scored' WHERE round_id=? AND status='trained'",
                (round_id,),
            )
        )
        return base_score, scores

    def _replay(self, engine: RoundEngine, everyone: list[str], up_to: int) -> np.ndarray:
        """Rebuild the reward rule's state from the finished rounds before ``up_to``; return
        the points vector (1 + awarded) over ``everyone`` as the reward rule left it."""
        index = {n: i for i, n in enumerate(everyone)}
        reward = engine.strategies.reward
        reward.reset(len(everyone))
        points = np.ones(len(everyone))
        for rid, groups_json, weights_json, base_score, updated, ranking in self._q(
            "SELECT round_id, groups, weights, base_score, updated, ranking FROM rounds "
            "WHERE status='finished' AND round_id < ? ORDER BY round_id",
            (up_to,),
        ):
            groups = [np.array([index[n] for n in g]) for g in json.loads(groups_json)]
            weights = [np.asarray(w) for w in json.loads(weights_json)]
            scores = np.array(
                [
                    r[0]
                    for r in self._q(
                        "SELECT score FROM candidates WHERE round_id=? ORDER BY group_index", (rid,)
                    )
                ]
            )
            order = np.asarray(json.loads(ranking) if ranking else [], dtype=np.int64)
            outcome = RoundOutcome(rid - 1, groups, scores, base_score, order, weights)
            reward.observe(outcome)
            if updated:
                points = reward.update(points, outcome)
        return points

    def _finish(
        self,
        round_id: int,
        groups_nodes: list[list[str]],
        weights: list[np.ndarray],
        adapters: list[str],
        scores: list[float],
        base_score: float,
        base: Candidate,
    ) -> RoundSummary:
        r = self.config.rounds
        everyone = sorted({n for (n,) in self._q("SELECT node_id FROM nodes")})
        index = {n: i for i, n in enumerate(everyone)}
        engine = RoundEngine(space=None, strategies=self._strategies(), rounds=r.planned_rounds)
        replayed = self._replay(engine, everyone, round_id)
        awarded = self.points()
        points = np.array([1.0 + awarded.get(n, 0.0) for n in everyone])
        if getattr(engine.strategies.reward, "replaces_points", False):
            points = replayed  # the rule carries its own view of everyone's points
        groups = [np.array([index[n] for n in g], dtype=np.int64) for g in groups_nodes]
        candidates = [Candidate(base.lineage, a) for a in adapters]
        state = TournamentState(base, base_score, points, round_id - 1)
        new_state, record = engine.decide(
            state, groups, weights, candidates, np.asarray(scores), self._rng(round_id, 2)
        )
        after = {n: float(new_state.points[i]) - 1.0 for i, n in enumerate(everyone)}
        winner = record.winner
        if not record.updated or r.consume == "none":
            consumed_nodes: list[str] = []
        elif r.consume == "all":
            consumed_nodes = [n for g in groups_nodes for n in g]
        else:
            consumed_nodes = list(groups_nodes[winner]) if winner is not None else []

        ranking = [int(x) for x in record.order] if record.order is not None else []
        changed = {
            n: (awarded.get(n, 0.0), after[n])
            for n in everyone
            if abs(after[n] - awarded.get(n, 0.0)) > 1e-12
        }

        def op(conn: sqlite3.Connection) -> None:
            status, seed, started_ms, strategies = conn.execute(
                "SELECT status, seed, started_ms, strategies FROM rounds WHERE round_id=?",
                (round_id,),
            ).fetchone()
            if status == "finished":  # finished by an earlier attempt: nothing to do twice
                return
            finished_ms = now_ms()
            conn.execute(
                "UPDATE rounds SET status='finished', finished_ms=?, updated=?, ranking=?, "
                "swapped=?, winner=? WHERE round_id=?",
                (
                    finished_ms,
                    int(record.updated),
                    json.dumps(ranking) if record.order is not None else None,
                    int(record.swapped),
                    winner,
                    round_id,
                ),
            )
            for n, (before, now) in changed.items():
                conn.execute(
                    "INSERT INTO points_ledger(round_id, node_id, points_before, "
                    "points_after) VALUES (?, ?, ?, ?)",
                    (round_id, n, before, now),
                )
                conn.execute("UPDATE nodes SET points=? WHERE node_id=?", (now, n))
            if consumed_nodes:
                conn.execute(
                    f"INSERT INTO consumed(contribution_seq, round_id) "
                    f"SELECT rc.contribution_seq, rc.round_id FROM round_contributions rc "
                    f"JOIN contributions c ON c.seq = rc.contribution_seq "
                    f"WHERE rc.round_id=? AND c.node_id IN ({','.join('?' * len(consumed_nodes))})",
                    (round_id, *consumed_nodes),
                )
            if record.updated and winner is not None:
                position = conn.execute("SELECT COUNT(*) FROM lineage").fetchone()[0]
                conn.execute(
                    "INSERT INTO lineage(position, adapter, round_id) VALUES (?, ?, ?)",
                    (position, adapters[winner], round_id),
                )
            append_record(
                conn,
                self.identity,
                round_id,
                {
                    "seed": seed,
                    "started_ms": started_ms,
                    "finished_ms": finished_ms,
                    "strategies": json.loads(strategies),
                    "base_lineage": list(base.lineage),
                    "lineage": [
                        r[0] for r in conn.execute("SELECT adapter FROM lineage ORDER BY position")
                    ],
                    "population": everyone,
                    "groups": groups_nodes,
                    "weights": [[float(x) for x in w] for w in weights],
                    "candidates": [
                        {"group": g, "adapter": a, "score": float(s)}
                        for g, (a, s) in enumerate(zip(adapters, scores, strict=True))
                    ],
                    "base_score": float(base_score),
                    "updated": bool(record.updated),
                    "ranking": ranking,
                    "swapped": bool(record.swapped),
                    "winner": winner,
                    "consumed": {"policy": r.consume, "nodes": sorted(consumed_nodes)},
                    "flagged": [
                        {"contribution": bytes(a).hex(), "earlier": bytes(b).hex(), "cosine": s}
                        for a, b, s in conn.execute(
                            "SELECT c.id, e.id, f.similarity FROM flagged f "
                            "JOIN contributions c ON c.seq = f.contribution_seq "
                            "JOIN contributions e ON e.seq = f.earlier_seq "
                            "WHERE f.round_id=? ORDER BY f.contribution_seq",
                            (round_id,),
                        )
                    ],
                    "points": {n: [b, a] for n, (b, a) in changed.items()},
                },
            )

        self.store.write(op)
        summary = RoundSummary(
            round_id=round_id,
            groups=groups_nodes,
            scores=list(scores),
            base_score=base_score,
            updated=record.updated,
            winner=winner,
            ranking=[int(x) for x in record.order] if record.order is not None else [],
            swapped=record.swapped,
            points={n: after[n] for n in everyone},
            adapters=adapters,
        )
        logger.info(
            "round %d finished: %s",
            round_id,
            f"group {winner} won" if record.updated else "no candidate improved",
        )
        self.plugins.round_finished(record)
        self.on_event("round_finished", summary.as_dict())
        return summary


def round_history(store: Store) -> list[dict[str, Any]]:
    """Every finished round with its candidates, for reports and node status."""
    out = []
    for (
        rid,
        groups,
        base_score,
        updated,
        ranking,
        swapped,
        winner,
        started,
        finished,
    ) in store.query(
        "SELECT round_id, groups, base_score, updated, ranking, swapped, winner, started_ms, "
        "finished_ms FROM rounds WHERE status='finished' ORDER BY round_id"
    ):
        cands = store.query(
            "SELECT group_index, adapter, score FROM candidates WHERE round_id=? "
            "ORDER BY group_index",
            (rid,),
        )
        out.append(
            {
                "round_id": rid,
                "groups": json.loads(groups),
                "base_score": base_score,
                "updated": bool(updated),
                "ranking": json.loads(ranking) if ranking else [],
                "swapped": bool(swapped),
                "winner": winner,
                "started_ms": started,
                "finished_ms": finished,
                "candidates": [{"group": g, "adapter": a, "score": s} for g, a, s in cands],
            }
        )
    return out
