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

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from crowdsft.config import CoordinatorConfig
from crowdsft.envelope import now_ms
from crowdsft.errors import ConfigError, CrowdSFTError
from crowdsft.keys import Identity
from crowdsft.plugins.manager import Plugins, get_plugins
from crowdsft.plugins.reward import Consolidated
from crowdsft.tournament import Strategies, Tournament, check_credit, replay_points
from crowdsft.validation import payload_examples, training_order

from ..store import queries
from ..store.chain import append_record, decided_rounds
from ..store.db import Store
from . import copies
from .executor import CandidateJob, LocalExecutor, TrainingExecutor
from .space import Candidate, RoundSpace

logger = logging.getLogger(__name__)

STEPS = ("planned", "trained", "scored", "finished")


# The rules that decide a planned round (after its training and scoring), which
# ``coordinator round --redecide`` may switch; grouping and influence made the plan itself.
DECIDING = ("selection", "judging_error", "reward")


def decision_changes(planned: dict[str, Any], config: CoordinatorConfig) -> dict[str, list[Any]]:
    """How the config's deciding rules differ from those an unfinished round was planned
    with: ``{"reward": [planned, now], "options.reward": [...], ...}`` (empty: no change)."""
    now = config.rounds.names().as_dict()
    changes: dict[str, list[Any]] = {}
    for key in DECIDING:
        if key in planned and planned[key] != now[key]:
            changes[key] = [planned[key], now[key]]
    for kind in ("selection", "reward"):
        before = planned.get("options", {}).get(kind, {})
        after = now.get("options", {}).get(kind, {})
        if before != after:
            changes[f"options.{kind}"] = [before, after]
    return changes


def changed_rules_message(round_id: int, changes: dict[str, list[Any]]) -> str:
    planned = ", ".join(f"{k} {v[0]!r}" for k, v in changes.items())
    now = ", ".join(f"{k} {v[1]!r}" for k, v in changes.items())
    return (
        f"round {round_id} was planned under {planned}, and the config now says {now}: set "
        "rounds back to finish it as planned, or run `crowdsft coordinator round --redecide` "
        "to decide it under the config's rules (its training and scores are kept; the ledger "
        "record names the rules it was planned with)"
    )


def redecide_problem(
    row: queries.RoundRow, config: CoordinatorConfig, plugins: Plugins
) -> str | None:
    """Why the unfinished round ``row`` cannot be decided under the config's reward rule
    (None: it can): a rule that pays from in-run credit needs it recorded in every candidate
    trained so far, which happens only where the planned rule (or valuation.in_run) asked."""
    r = config.rounds
    reward = plugins.create("reward", r.reward, **r.reward_options)
    if not getattr(reward, "needs_credit", False):
        return None
    if all("member_credit" in (c.training or {}) for c in row.candidates):
        return None
    return (
        f"round {row.round_id}'s candidates were trained without in-run credit, and the reward "
        f"{r.reward!r} pays from it: --redecide cannot decide this round under it; choose a "
        "reward that does not need in-run credit for this round"
    )


class NotEnoughContributors(CrowdSFTError):
    """There are fewer contributors with unconsumed data than groups."""


class RoundInterrupted(CrowdSFTError):
    """Raised on purpose after a persisted step (``stop_after``), as a crash would."""


@dataclass(frozen=True)
class RoundSummary:
    round_id: int
    groups: list[list[str]]  # node ids
    scores: list[float]  # per candidate: the groups', then the consolidated one's
    base_score: float
    updated: bool
    winner: int | None  # a group, or len(groups): the consolidated candidate
    ranking: list[int]
    swapped: bool
    points: dict[str, float]  # node id -> points after the round
    adapters: list[str]
    consolidated: list[str] | None = None  # the consolidated candidate's members

    @property
    def consolidated_won(self) -> bool:
        return self.consolidated is not None and self.winner == len(self.groups)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RoundRunner:
    """Runs (or resumes) one round at a time over the store: plan, train, score, decide,
    commit. Each step is persisted before the next begins."""

    def __init__(
        self,
        config: CoordinatorConfig,
        store: Store,
        space: RoundSpace,
        plugins: Plugins | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        identity: Identity | None = None,
        executor: TrainingExecutor | None = None,
    ) -> None:
        """``identity`` signs the ledger records (the coordinator's key from ``config`` by
        default); ``executor`` trains the candidates (in this process by default)."""
        from ..server.app import load_identity

        self.config = config
        self.identity = identity or load_identity(config)
        self.store = store
        self.space = space
        self.executor: TrainingExecutor = executor or LocalExecutor()
        self.plugins = plugins or get_plugins()
        self.on_event = on_event or (lambda kind, info: None)
        self._stop_after: str | None = None
        embed = getattr(space, "embed", None)
        self._embeddings = copies.EmbeddingCache(embed) if embed is not None else None

    def _tournament(self) -> Tournament:
        r = self.config.rounds
        return Tournament(
            self._strategies(), r.planned_rounds, consolidate_every=r.consolidate_every
        )

    def _strategies(self) -> Strategies:
        return self.config.rounds.names().build(self.plugins)

    def _rng(self, round_id: int, stream: int, *more: int) -> np.random.Generator:
        return np.random.default_rng([self.config.rounds.seed, round_id, stream, *more])

    def _write(self, op: Callable[..., Any], *args: Any) -> Any:
        """``op(conn, *args)`` in its own committed transaction."""
        return self.store.write(lambda conn: op(conn, *args))

    # -- reads ----------------------------------------------------------------------------

    def unfinished(self) -> int | None:
        return queries.unfinished_round(self.store)

    def lineage(self) -> list[str]:
        return queries.lineage(self.store)

    def points(self) -> dict[str, float]:
        """Points awarded so far, per node (0 for nodes never in a finished round)."""
        return queries.awarded_points(self.store)

    # -- the round ------------------------------------------------------------------------

    def run(self, stop_after: str | None = None, redecide: bool = False) -> RoundSummary:
        """Run (or resume) one round to its end. ``stop_after`` names a step after which to
        stop by raising RoundInterrupted (for tests of resumption). ``redecide``: an
        unfinished round planned under other selection or reward rules than the config's is
        decided under the config's (see ``_redecide``); without it, such a round is refused."""
        self._stop_after = stop_after
        check_credit(self._strategies().reward, self.space)
        round_id = self.unfinished()
        if round_id is None:
            round_id = self._plan()
            self._maybe_stop(stop_after, "planned")
        else:
            logger.info("resuming round %d", round_id)
            self.on_event("round_resumed", {"round_id": round_id})
        begin = getattr(self.space, "begin_round", None)
        if begin is not None:
            begin(round_id)
        row = queries.round_row(self.store, round_id)
        changes = decision_changes(row.strategies, self.config)
        if changes:
            if not redecide:
                raise ConfigError(changed_rules_message(round_id, changes))
            problem = redecide_problem(row, self.config, self.plugins)
            if problem:  # before anything is written: the round stays as it was planned
                raise ConfigError(problem)
            self._redecide(round_id, row.strategies, changes)
            row = queries.round_row(self.store, round_id)
        weights = [np.asarray(w, dtype=float) for w in row.weights]
        base = Candidate(tuple(row.base_lineage))
        contributors = [n for g in row.groups for n in g]
        index = {n: i for i, n in enumerate(contributors)}
        data = self._data(round_id, contributors)
        groups = [np.array([index[n] for n in g], dtype=np.int64) for g in row.groups]
        if row.consolidated is not None:
            # the consolidated candidate's members follow the groups' in the space's data,
            # each with everything it contributed so far
            members = list(row.consolidated["members"])
            groups.append(np.arange(len(data), len(data) + len(members), dtype=np.int64))
            weights.append(np.asarray(row.consolidated["weights"], dtype=float))
            data += self._consolidated_data(row.consolidated)
        self.space.set_data(data)

        adapters = self._train(round_id, base, groups, weights)
        self._maybe_stop(stop_after, "trained")
        base_score, scores = self._score(round_id, base, adapters)
        self._maybe_stop(stop_after, "scored")
        return self._finish(round_id, row, adapters, scores, base_score, base)

    def _redecide(
        self, round_id: int, planned: dict[str, Any], changes: dict[str, list[Any]]
    ) -> None:
        """Switch an unfinished round's deciding rules (selection and reward, with their
        options) to the config's. Its groups, training and scores stay; its ledger record
        will name the rules that decided it and, under ``redecided``, the ones it was planned
        with. Nothing about the plan depends on these rules, so nodes verify the round as any
        other (the points are recomputed with the rule the record names)."""
        r = self.config.rounds
        now = r.names().as_dict()
        strategies = dict(planned)
        for key in DECIDING:
            strategies[key] = now[key]
        options = {k: dict(v) for k, v in planned.get("options", {}).items()}
        for kind in ("selection", "reward"):
            options.pop(kind, None)
            if now.get("options", {}).get(kind):
                options[kind] = dict(now["options"][kind])
        strategies.pop("options", None)
        if options:
            strategies["options"] = options
        packages = dict(planned.get("packages", {}))
        packages.pop("reward", None)
        package = self.plugins.package_of("reward", r.reward)
        if package:
            packages["reward"] = package
        strategies.pop("packages", None)
        if packages:
            strategies["packages"] = packages
        earlier = planned.get("redecided", {}).get("from", {})
        strategies["redecided"] = {
            "from": {k: v[0] for k, v in changes.items()} | earlier,
            "at_ms": now_ms(),
        }
        self._write(queries.set_round_strategies, round_id, strategies)
        logger.warning(
            "round %d: re-decided under the config's rules (%s); the ledger record says so",
            round_id,
            "; ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items()),
        )
        self.on_event("round_redecided", {"round_id": round_id, "changes": changes})

    @staticmethod
    def _maybe_stop(stop_after: str | None, step: str) -> None:
        if stop_after == step:
            raise RoundInterrupted(f"stopped after step {step!r} on request")

    # -- plan -------------------------------------------------------------------------------

    def _plan(self) -> int:
        r = self.config.rounds
        round_id = queries.next_round_id(self.store)
        self._flag_near_duplicates(round_id)
        by_node = queries.unconsumed_pool(self.store)
        nodes = sorted(by_node)
        if len(nodes) < r.groups:
            raise NotEnoughContributors(
                f"a round needs at least {r.groups} contributors with unconsumed data; "
                f"there are {len(nodes)}"
            )
        awarded = self.points()
        points = np.array([1.0 + awarded.get(n, 0.0) for n in nodes])
        tournament = self._tournament()
        groups, weights = tournament.plan(points, round_id - 1, self._rng(round_id, 0))
        groups_nodes = [[nodes[i] for i in g] for g in groups]
        consolidated = None
        if tournament.consolidates(round_id - 1):
            # every contributor so far, with all its data (consumed or not), at the influence
            # weight of its current points
            accepted = queries.accepted_pool(self.store)
            members = sorted(accepted)
            held = np.array([1.0 + awarded.get(n, 0.0) for n in members])
            consolidated = {
                "members": members,
                "weights": tournament.plan_consolidated(held).tolist(),
                "upto": max(seq for seqs in accepted.values() for seq in seqs),
            }
        strategies = r.names().as_dict() | {
            "consolidate_every": r.consolidate_every,
            "consume": r.consume,
            "evaluation": self.config.evaluation.function,
            "embedder": self.config.evaluation.embedder,
            "seed": r.seed,
        }
        # a reward rule from a plugin package: the record names the package (and version),
        # so that a node without it can say what to install to check the points
        package = self.plugins.package_of("reward", r.reward)
        if package:
            strategies["packages"] = {"reward": package}
        started_ms, base_lineage = now_ms(), self.lineage()
        self.store.write(
            lambda conn: queries.insert_planned_round(
                conn,
                round_id,
                seed=r.seed,
                started_ms=started_ms,
                strategies=strategies,
                base_lineage=base_lineage,
                groups=groups_nodes,
                weights=[w.tolist() for w in weights],
                contribution_seqs=[seq for n in nodes for seq in by_node[n]],
                consolidated=consolidated,
            )
        )
        logger.info(
            "round %d planned: %d contributors in %d groups%s",
            round_id,
            len(nodes),
            len(groups),
            (
                f", and a consolidated candidate of all {len(consolidated['members'])}"
                if consolidated
                else ""
            ),
        )
        if self.config.rounds.judging_error > 0:
            logger.warning(
                "round %d: rounds.judging_error is %g, so with that probability the round "
                "installs a lower-ranked candidate, possibly one worse than the current model "
                "(the paper's simulated judge; coordinator.toml files written before 0 became "
                "the default hold 0.05): set it to 0 unless you mean to simulate that",
                round_id,
                self.config.rounds.judging_error,
            )
        self.on_event(
            "round_planned",
            {
                "round_id": round_id,
                "groups": groups_nodes,
                "consolidated": consolidated["members"] if consolidated else None,
            },
        )
        return round_id

    def _flag_near_duplicates(self, round_id: int) -> None:
        """Flag contributions that copy an earlier contribution of another node (see
        ``copies``); flagged contributions never enter a round."""
        threshold = self.config.admission.near_duplicate_threshold
        if threshold <= 0 or self._embeddings is None:
            return
        found = copies.flag_rows(
            queries.unflagged_contributions(self.store),
            queries.never_used_seqs(self.store),
            self._embeddings,
            threshold,
        )
        if not found:
            return
        entries = [
            (
                copy.seq,
                f"near-duplicate (cosine {s:.3f}) of contribution {first.id.hex()} "
                f"from node {first.node_id}, submitted earlier",
                first.seq,
                s,
                round_id,
            )
            for copy, first, s in found
        ]
        self._write(queries.insert_flags, entries)
        logger.info(
            "round %d: %d contribution(s) flagged as near-duplicates", round_id, len(entries)
        )
        self.on_event("near_duplicates_flagged", {"round_id": round_id, "count": len(entries)})

    def _data(self, round_id: int, contributors: list[str]) -> list[list[dict[str, str]]]:
        data: dict[str, list[dict[str, str]]] = {n: [] for n in contributors}
        for node_id, payload in queries.round_payloads(self.store, round_id):
            data[node_id] += payload_examples(payload)
        return [training_order(data[n]) for n in contributors]

    def _consolidated_data(self, plan: dict[str, Any]) -> list[list[dict[str, str]]]:
        """The consolidated candidate's members' examples: everything each contributed up to
        the plan's last contribution, flagged ones left out, in training order."""
        data: dict[str, list[dict[str, str]]] = {n: [] for n in plan["members"]}
        for node_id, payload in queries.consolidated_payloads(self.store, int(plan["upto"])):
            if node_id in data:
                data[node_id] += payload_examples(payload)
        return [training_order(data[n]) for n in plan["members"]]

    # -- train and score ---------------------------------------------------------------------

    def _train(
        self, round_id: int, base: Candidate, groups: list[np.ndarray], weights: list[np.ndarray]
    ) -> list[str]:
        row = queries.round_row(self.store, round_id)
        done = {c.group: c.adapter for c in row.candidates}
        jobs = [
            CandidateJob(g, members, w, self._rng(round_id, 1, g))
            for g, (members, w) in enumerate(zip(groups, weights, strict=True))
            if g not in done
        ]

        consolidated = row.consolidated is not None
        n_groups = len(row.groups)

        def started(job: CandidateJob) -> None:
            self.on_event(
                "candidate_training",
                {
                    "round_id": round_id,
                    "group": job.group,
                    "members": len(job.members),
                    "consolidated": consolidated and job.group == n_groups,
                },
            )

        for g, adapter in self.executor.train(self.space, base, jobs, started):
            info = self.space.training_info(adapter)
            self._write(queries.insert_candidate, round_id, g, adapter, info)
            done[g] = adapter
            self.on_event(
                "candidate_trained", {"round_id": round_id, "group": g, "adapter": adapter}
            )
            self._maybe_stop(self._stop_after, f"candidate:{g}")
        self._write(queries.advance_status, round_id, "planned", "trained")
        return [done[g] for g in range(len(groups))]

    def _score(
        self, round_id: int, base: Candidate, adapters: list[str]
    ) -> tuple[float, list[float]]:
        row = queries.round_row(self.store, round_id)
        stored = {c.group: c.score for c in row.candidates}
        # An executor that generates elsewhere answers for every model still to score, so
        # that all of a round's scores come from the same kind of worker.
        prepare = getattr(self.executor, "prepare_scores", None)
        if prepare is not None:
            missing = [base] if row.base_score is None else []
            missing += [
                Candidate(base.lineage, a) for g, a in enumerate(adapters) if stored.get(g) is None
            ]
            prepare(self.space, missing)
        base_score = row.base_score
        if base_score is None:
            base_score = float(self.space.score([base])[0])
            self._write(queries.set_base_score, round_id, base_score)
        scores = []
        for g, adapter in enumerate(adapters):
            s = stored.get(g)
            if s is None:
                s = float(self.space.score([Candidate(base.lineage, adapter)])[0])
                self._write(queries.set_candidate_score, round_id, g, s)
                self.on_event(
                    "candidate_scored",
                    {
                        "round_id": round_id,
                        "group": g,
                        "score": s,
                        "consolidated": row.consolidated is not None and g == len(row.groups),
                    },
                )
            scores.append(s)
        self._write(queries.advance_status, round_id, "trained", "scored")
        return base_score, scores

    # -- decide and commit --------------------------------------------------------------------

    def _finish(
        self,
        round_id: int,
        row: queries.RoundRow,
        adapters: list[str],
        scores: list[float],
        base_score: float,
        base: Candidate,
    ) -> RoundSummary:
        r = self.config.rounds
        groups_nodes = row.groups
        weights = [np.asarray(w, dtype=float) for w in row.weights]
        n_groups = len(groups_nodes)
        plan = row.consolidated
        everyone = queries.node_ids(self.store)
        index = {n: i for i, n in enumerate(everyone)}
        awarded = self.points()
        tournament = self._tournament()
        # The same replay that node verification runs over the ledger records.
        points = replay_points(
            tournament.strategies.reward,
            everyone,
            decided_rounds(self.store, round_id),
            awarded,
        )
        groups = [np.array([index[n] for n in g], dtype=np.int64) for g in groups_nodes]
        # Members' in-run credit against the target, where the training recorded it: signed
        # into the ledger record with the candidates, so that nodes can recompute the points
        # of a rule that pays from it.
        trained = {c.group: c.training for c in queries.round_row(self.store, round_id).candidates}
        credit_lists = [trained.get(g, {}).get("member_credit") for g in range(len(adapters))]
        credits = (
            [np.asarray(c, dtype=float) for c in credit_lists]
            if all(c is not None for c in credit_lists)
            else None
        )
        signs_credit = bool(getattr(tournament.strategies.reward, "needs_credit", False))
        if signs_credit and credits is None:
            raise ConfigError(
                f"round {round_id}'s candidates were trained without in-run credit, and the "
                "reward rule pays from it"
            )
        consolidated = None
        if plan is not None:
            consolidated = Consolidated(
                members=np.array([index[n] for n in plan["members"]], dtype=np.int64),
                weights=np.asarray(plan["weights"], dtype=float),
                score=float(scores[n_groups]),
                won=False,  # decided below
                credits=credits[n_groups] if credits is not None else None,
            )
        record = tournament.decide(
            round_id - 1,
            groups,
            weights,
            np.asarray(scores[:n_groups]),
            base_score,
            points,
            self._rng(round_id, 2),
            population=everyone,
            credits=credits[:n_groups] if credits is not None else None,
            consolidated=consolidated,
        )
        after = {n: float(record.points_after[i]) - 1.0 for i, n in enumerate(everyone)}
        winner = record.winner
        if not record.updated or r.consume == "none":
            consumed_nodes: list[str] = []
        elif r.consume == "all":
            consumed_nodes = [n for g in groups_nodes for n in g]
        elif winner is not None and winner < n_groups:
            consumed_nodes = list(groups_nodes[winner])
        else:
            # the consolidated candidate won: it trained on everyone's data, and retiring all
            # of it would leave nothing to group; the groups play on with the new model
            consumed_nodes = []
        ranking = [int(x) for x in record.order] if record.order is not None else []
        write = queries.FinishWrite(
            round_id=round_id,
            updated=record.updated,
            ranking=ranking,
            swapped=record.swapped,
            winner=winner,
            winner_adapter=adapters[winner] if winner is not None else None,
            points={
                n: (awarded.get(n, 0.0), after[n])
                for n in everyone
                if abs(after[n] - awarded.get(n, 0.0)) > 1e-12
            },
            consumed_nodes=consumed_nodes,
        )

        def candidate_entry(g: int, adapter: str, score: float) -> dict[str, Any]:
            entry: dict[str, Any] = ({"consolidated": True} if g == n_groups else {"group": g}) | {
                "adapter": adapter,
                "score": float(score),
            }
            if signs_credit and credits is not None:
                entry["member_credit"] = [float(x) for x in credits[g]]
            return entry

        def commit(conn) -> None:
            finished_ms = now_ms()
            stored = queries.finish_round(conn, write, finished_ms)
            if stored is None:  # finished by an earlier attempt: nothing to do twice
                return
            body: dict[str, Any] = {
                "seed": stored.seed,
                "started_ms": stored.started_ms,
                "finished_ms": finished_ms,
                "strategies": stored.strategies,
                "base_lineage": list(base.lineage),
                "lineage": queries.lineage_in(conn),
                "population": everyone,
                "groups": groups_nodes,
                "weights": [[float(x) for x in w] for w in weights],
                "candidates": [
                    candidate_entry(g, a, s)
                    for g, (a, s) in enumerate(zip(adapters, scores, strict=True))
                ],
                "base_score": float(base_score),
                "updated": bool(record.updated),
                "ranking": ranking,
                "swapped": bool(record.swapped),
                "winner": winner,
                "consumed": {"policy": r.consume, "nodes": sorted(consumed_nodes)},
                "flagged": queries.flags_of_round(conn, round_id),
                "points": {n: [b, a] for n, (b, a) in write.points.items()},
            }
            if plan is not None:
                body["consolidated"] = {
                    "members": list(plan["members"]),
                    "weights": [float(x) for x in plan["weights"]],
                }
            append_record(conn, self.identity, round_id, body)

        self.store.write(commit)
        summary = RoundSummary(
            round_id=round_id,
            groups=groups_nodes,
            scores=list(scores),
            base_score=base_score,
            updated=record.updated,
            winner=winner,
            ranking=ranking,
            swapped=record.swapped,
            points=after,
            adapters=adapters,
            consolidated=list(plan["members"]) if plan is not None else None,
        )
        logger.info(
            "round %d finished: %s",
            round_id,
            (
                "no candidate improved"
                if not record.updated
                else "the consolidated candidate won"
                if summary.consolidated_won
                else f"group {winner} won"
            ),
        )
        self.plugins.round_finished(record)
        self.on_event("round_finished", summary.as_dict())
        return summary


def round_history(store: Store) -> list[dict[str, Any]]:
    """Every finished round with its candidates, for reports and node status."""
    return [r.as_dict() for r in queries.finished_rounds(store)]
