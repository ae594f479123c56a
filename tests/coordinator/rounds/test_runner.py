"""The round runner over the model-free stand-in space: the points rule it decides with is
the one node verification replays, and plugins see every round with its node ids."""

from __future__ import annotations

import json

import pytest

from crowdsft import hookimpl, ledger, tournament
from crowdsft.coordinator.rounds import runner as runner_module
from crowdsft.coordinator.rounds.runner import RoundRunner
from crowdsft.coordinator.store import queries
from crowdsft.coordinator.store.chain import ledger_entries
from crowdsft.coordinator.store.db import StoreError
from crowdsft.demo.run import seeded_identity
from crowdsft.envelope import sign_contribution
from crowdsft.ledger import LedgerEntry, sign_record, verify_ledger
from crowdsft.plugins.manager import Plugins, create_plugin_manager
from crowdsft.testing.standin import StandInSpace

NODES = [seeded_identity(3, f"node {k}") for k in range(6)]  # the same groups every run


def fill(coord, batch: int) -> None:
    """Two contributions from every node, with responses of different lengths."""
    with coord.client() as c:
        for k, ident in enumerate(NODES):
            for j in range(2):
                words = " ".join(["word"] * (2 + 3 * k + j))
                c.submit_one(
                    sign_contribution(
                        ident,
                        [{"prompt": f"{ident.node_id} {batch}.{j}", "response": words}],
                        coordinator=coord.public_key,
                    )
                )


@pytest.fixture
def make_runner(make_coordinator):
    def make(reward="rank", plugins=None):
        coord = make_coordinator(
            rounds={"groups": 3, "reward": reward, "consume": "none"},
            admission={"near_duplicate_threshold": 0.0},
        )
        space = StandInSpace(coord.config.adapter_dir)
        runner = RoundRunner(coord.config, coord.coordinator.store, space, plugins=plugins)
        return coord, runner

    return make


def test_the_runner_and_node_verification_replay_points_with_one_function():
    assert runner_module.replay_points is tournament.replay_points
    assert ledger.replay_points is tournament.replay_points


@pytest.mark.parametrize("reward", ["rank", "regression"])
def test_points_verify_over_several_rounds_and_a_tampered_entry_is_caught(make_runner, reward):
    coord, runner = make_runner(reward)
    for batch in range(4):
        fill(coord, batch)
        runner.run()
    entries = ledger_entries(coord.coordinator.store)
    key = coord.public_key
    report = verify_ledger(entries, key)
    assert report.ok, [str(p) for p in report.problems]
    held = runner.points()  # every node; the ledger lists only those whose points changed
    assert {n: report.points.get(n, 0.0) for n in held} == pytest.approx(held)

    # Change one node's points in the last round that awarded any and sign the record again
    # (a dishonest coordinator holds its key): only the points recomputation can catch it.
    records = [json.loads(e.record) for e in entries]
    k = max(i for i, rec in enumerate(records) if rec["points"])
    rec = records[k]
    node = sorted(rec["points"])[0]
    rec["points"][node][1] += 1.0
    identity = coord.coordinator.identity
    data, sig = sign_record(identity.sign, rec)
    tampered = [*entries[:k], LedgerEntry(k + 1, data, sig), *entries[k + 1 :]]
    found = verify_ledger(tampered, key).problems
    assert any(p.kind == "points" and p.round_id == k + 1 and node in p.message for p in found)


def test_round_finished_hook_gets_the_node_ids_of_each_group(make_runner):
    seen = []

    class Recorder:
        @hookimpl
        def crowdsft_round_finished(self, record):
            seen.append(record)

    plugins = Plugins(create_plugin_manager(load_entry_points=False))
    plugins.register(Recorder(), name="recorder")
    coord, runner = make_runner(plugins=plugins)
    fill(coord, 0)
    summary = runner.run()
    assert len(seen) == 1
    record = seen[0]
    assert record.group_nodes == summary.groups
    assert sorted(n for g in record.group_nodes for n in g) == sorted(i.node_id for i in NODES)
    assert record.updated == summary.updated and record.winner == summary.winner
    # the groups' scores, then (the default) the consolidated candidate's
    assert list(record.scores) == pytest.approx(summary.scores[: len(summary.groups)])
    assert record.consolidated is not None
    assert record.consolidated.score == pytest.approx(summary.scores[-1])


def test_a_finished_round_without_its_ledger_record_stops_the_next_decision(make_runner):
    """Points are replayed from the signed records; a store whose finished rounds lack them
    (older than the ledger) is refused with a clear error, never replayed in part."""
    coord, runner = make_runner("regression")
    fill(coord, 0)
    runner.run()
    coord.coordinator.store.write(lambda conn: conn.execute("DELETE FROM ledger"))
    fill(coord, 1)
    with pytest.raises(StoreError, match=r"rounds \[1\] have no ledger record"):
        runner.run()


def test_the_credit_rule_is_refused_before_planning_where_training_records_no_credit(
    make_runner,
):
    from crowdsft.errors import ConfigError

    coord, runner = make_runner("credit")  # the stand-in space records no credit
    fill(coord, 0)
    with pytest.raises(ConfigError, match="in-run credit"):
        runner.run()
    assert runner.unfinished() is None  # nothing was planned


def test_a_round_resumed_under_another_reward_rule_is_refused(make_runner, make_coordinator):
    import dataclasses

    from crowdsft.errors import ConfigError

    coord, runner = make_runner("rank")
    fill(coord, 0)
    with pytest.raises(runner_module.RoundInterrupted):
        runner.run(stop_after="planned")
    rounds = dataclasses.replace(coord.config.rounds, reward="regression")
    changed = RoundRunner(
        dataclasses.replace(coord.config, rounds=rounds),
        coord.coordinator.store,
        runner.space,
    )
    with pytest.raises(ConfigError, match="planned under reward 'rank'"):
        changed.run()
    assert runner.run().round_id == 1  # under the rule it was planned with, it finishes


def test_a_round_trains_each_node_on_the_same_data_whatever_order_it_arrived_in(make_runner):
    """A node's upload stream may commit its contributions out of file order; fine-tuning is
    order-sensitive, so a round must hand each group the same examples in the same order."""
    seen = []

    def run(order):
        coord, runner = make_runner()
        with coord.client() as c:
            for ident in NODES:
                examples = [{"prompt": f"q{j}", "response": f"{ident.node_id} {j}"} for j in order]
                for ex in examples:
                    c.submit_one(sign_contribution(ident, [ex], coordinator=coord.public_key))
        set_data = runner.space.set_data
        runner.space.set_data = lambda data: (seen.append(data), set_data(data))
        runner.run()

    run([0, 1, 2, 3])
    run([3, 1, 0, 2])
    assert len(seen) == 2 and seen[0] == seen[1]
    # every node in a group, then every node again for the consolidated candidate
    assert [len(examples) for examples in seen[0]] == [4] * (2 * len(NODES))


# -- the consolidated candidate ------------------------------------------------------------------


class MoreDataHelps(StandInSpace):
    """A stand-in in which a candidate trained on more examples scores higher, so that the
    consolidated candidate (everyone's data) wins; ``records`` keeps each training's data."""

    def __init__(self, adapter_dir, bonus=1.0):
        super().__init__(adapter_dir)
        self.bonus = bonus
        self.trained: list[tuple[list[int], int]] = []

    def propose(self, base, members, weights, rng):
        cand = super().propose(base, members, weights, rng)
        body = self._read(cand.adapter)
        n = sum(len(self.data[m]) for m in members)
        self.trained.append(([int(m) for m in members], n))
        body["quality"] += self.bonus * n
        data = json.dumps(body, sort_keys=True).encode()
        import hashlib

        from crowdsft import atomic

        digest = hashlib.sha256(data).hexdigest()
        atomic.write_bytes(self.adapter_dir / f"{digest}.json", data)
        return type(cand)(cand.chain, digest)


@pytest.fixture
def consolidating(make_coordinator):
    def make(every=1, bonus=1.0, reward="rank", consume="winner"):
        coord = make_coordinator(
            rounds={
                "groups": 2,
                "reward": reward,
                "consume": consume,
                "consolidate_every": every,
                "judging_error": 0.0,
            },
            admission={"near_duplicate_threshold": 0.0},
        )
        space = MoreDataHelps(coord.config.adapter_dir, bonus)
        return coord, RoundRunner(coord.config, coord.coordinator.store, space)

    return make


@pytest.mark.parametrize("reward", ["rank", "regression"])
def test_a_consolidated_candidate_that_wins_consumes_nothing_and_nodes_verify(
    consolidating, reward
):
    coord, runner = consolidating(reward=reward)
    fill(coord, 0)
    first = runner.run()
    assert first.consolidated == sorted(i.node_id for i in NODES)
    assert first.consolidated_won and first.winner == 2 and len(first.scores) == 3
    store = coord.coordinator.store
    assert store.query("SELECT COUNT(*) FROM consumed")[0][0] == 0  # nothing retired
    assert runner.lineage() == [first.adapters[2]]
    assert runner.space.trained[-1] == (list(range(6, 12)), 12)  # everyone, all their data
    if reward == "rank":  # the groups, ranked among themselves, are paid as usual
        group_order = [g for g in first.ranking if g < 2]
        for rank, g in enumerate(group_order):
            for node in first.groups[g]:
                assert first.points[node] == 2 - rank
    second = runner.run()  # nothing consumed: everyone is grouped again
    assert sorted(n for g in second.groups for n in g) == first.consolidated
    entries = ledger_entries(store)
    records = [json.loads(e.record) for e in entries]
    assert records[0]["consolidated"]["members"] == first.consolidated
    assert records[0]["winner"] == 2 and records[0]["candidates"][2]["consolidated"] is True
    report = verify_ledger(entries, coord.public_key)
    assert report.ok, [str(p) for p in report.problems]
    held = runner.points()
    assert {n: report.points.get(n, 0.0) for n in held} == pytest.approx(held)


def test_a_consolidated_candidate_trains_on_consumed_data_too(consolidating):
    """Every second round: round 1 is groups only, a group wins and its data retires; round
    2's consolidated candidate still trains on everything, at the points' weights."""
    coord, runner = consolidating(every=2, bonus=0.0)
    fill(coord, 0)
    first = runner.run()
    assert first.consolidated is None and first.updated and first.winner < 2
    consumed = set(first.groups[first.winner])
    held = runner.points()
    second = runner.run()
    assert second.consolidated == sorted(i.node_id for i in NODES)
    plan = queries.round_row(coord.coordinator.store, 2).consolidated
    # points-squared influence on the points held when the round was planned
    assert plan["weights"] == pytest.approx(
        [(1.0 + held.get(n, 0.0)) ** 2 for n in plan["members"]]
    )
    assert runner.space.trained[-1][1] == 12  # all 12, the consumed ones included
    grouped = {x for g in second.groups for x in g}
    assert grouped.isdisjoint(consumed) and len(grouped) == 6 - len(consumed)
    report = verify_ledger(ledger_entries(coord.coordinator.store), coord.public_key)
    assert report.ok, [str(p) for p in report.problems]


def test_a_tampered_consolidated_record_is_caught(consolidating):
    coord, runner = consolidating()
    fill(coord, 0)
    runner.run()
    entries = ledger_entries(coord.coordinator.store)
    rec = json.loads(entries[0].record)
    rec["consolidated"]["members"].append("f" * 32)  # someone outside the population
    rec["consolidated"]["weights"].append(1.0)
    rec["ranking"].append(7)
    data, sig = sign_record(coord.coordinator.identity.sign, rec)
    found = verify_ledger([LedgerEntry(1, data, sig)], coord.public_key).problems
    text = " ".join(str(p) for p in found)
    assert "not in the population" in text and "ranking names candidates" in text


# -- a reward plugin that fails ----------------------------------------------------------------


class BuggyWin:
    """A reward rule with the bug users hit: it reads a field the outcome does not have."""

    def reset(self, n):
        pass

    def observe(self, outcome):
        pass

    def update(self, points, outcome):
        return points + outcome.winner  # RoundOutcome has no 'winner': AttributeError


class BuggyPlugin:
    @hookimpl
    def crowdsft_register_reward(self, register):
        register("buggy-win", BuggyWin)


def test_a_failing_reward_plugin_is_named_in_one_line_and_the_round_can_be_redecided(
    make_runner,
):
    import dataclasses

    from crowdsft.errors import ConfigError
    from crowdsft.plugins.manager import StrategyFailed

    plugins = Plugins(create_plugin_manager(load_entry_points=False))
    plugins.register(BuggyPlugin(), name="buggy")
    coord, runner = make_runner(plugins=plugins)
    working = coord.config
    runner.config = dataclasses.replace(
        working, rounds=dataclasses.replace(working.rounds, reward="buggy-win")
    )
    fill(coord, 0)
    trained = []
    propose = runner.space.propose
    runner.space.propose = lambda *a: (trained.append(a[1]), propose(*a))[1]
    with pytest.raises(StrategyFailed) as failed:
        runner.run()
    message = str(failed.value)
    assert "\n" not in message
    assert "the reward strategy 'buggy-win' failed: AttributeError" in message
    assert f"{__file__}:" in message  # where in the plugin
    store = coord.coordinator.store
    assert queries.round_row(store, 1).status == "scored"  # training and scores kept
    n_trained = len(trained)

    # the config switched to a working rule: refused without --redecide, with the way out
    fixed = RoundRunner(working, store, runner.space, plugins=plugins)
    with pytest.raises(ConfigError, match=r"planned under reward 'buggy-win'.*--redecide"):
        fixed.run()
    summary = fixed.run(redecide=True)
    assert summary.round_id == 1 and len(trained) == n_trained  # nothing trained again
    entries = ledger_entries(store)
    record = json.loads(entries[0].record)
    assert record["strategies"]["reward"] == "rank"
    assert record["strategies"]["redecided"]["from"] == {"reward": "buggy-win"}
    report = verify_ledger(entries, coord.public_key)  # nodes verify it as any other round
    assert report.ok, [str(p) for p in report.problems]
    # the next round plans under the working rule as usual
    fill(coord, 1)
    assert fixed.run().round_id == 2


def test_redecide_is_refused_before_a_model_loads_without_an_unfinished_round(make_runner):
    import dataclasses

    from crowdsft.coordinator.training.preflight import round_problems

    coord, runner = make_runner()
    fill(coord, 0)
    store = coord.coordinator.store
    assert any("no unfinished round" in p for p in round_problems(coord.config, store, True))
    with pytest.raises(runner_module.RoundInterrupted):
        runner.run(stop_after="planned")
    other = dataclasses.replace(
        coord.config, rounds=dataclasses.replace(coord.config.rounds, judging_error=0.3)
    )
    problems = round_problems(other, store)
    assert any("planned under judging_error 0.0" in p and "--redecide" in p for p in problems)
    assert not [p for p in round_problems(other, store, True) if "planned" in p]


def test_coordinator_round_shows_its_progress_as_distances_in_words(make_coordinator):
    from crowdsft.coordinator.cli import round_event_line

    coord = make_coordinator(
        rounds={"groups": 3, "consume": "none"}, admission={"near_duplicate_threshold": 0.0}
    )
    events = []
    runner = RoundRunner(
        coord.config,
        coord.coordinator.store,
        StandInSpace(coord.config.adapter_dir),
        on_event=lambda kind, info: events.append((kind, info)),
    )
    fill(coord, 0)
    runner.run()
    lines = [
        line for kind, info in events if (line := round_event_line(kind, info, "l2")) is not None
    ]
    assert lines[0] == (
        "round 1 planned: 6 contributors in 3 groups, and a consolidated candidate of all 6"
    )
    scored = [line for line in lines if "distance" in line]
    assert len(scored) == 4 and scored[-1].startswith("the consolidated candidate: distance ")
    shown = [-info["score"] for kind, info in events if kind == "candidate_scored"]
    for line, d in zip(scored, shown, strict=True):
        assert f"distance {d:.4f} (lower is better)" in line
    assert "score=" not in " ".join(lines)


def test_redecide_to_a_rule_that_pays_from_credit_is_refused_before_anything_changes(
    make_runner,
):
    import dataclasses

    from crowdsft.errors import ConfigError

    coord, runner = make_runner("rank")  # the stand-in space records no in-run credit
    fill(coord, 0)
    with pytest.raises(runner_module.RoundInterrupted):
        runner.run(stop_after="trained")
    store = coord.coordinator.store
    planned = queries.round_row(store, 1).strategies
    credit = dataclasses.replace(
        coord.config, rounds=dataclasses.replace(coord.config.rounds, reward="credit")
    )
    space = StandInSpace(coord.config.adapter_dir)
    space.records_credit = True  # the space would record credit from now on; round 1's did not
    with pytest.raises(ConfigError, match="trained without in-run credit"):
        RoundRunner(credit, store, space).run(redecide=True)
    assert queries.round_row(store, 1).strategies == planned  # nothing was written
    assert runner.run().round_id == 1  # under the rule it was planned with, it finishes
