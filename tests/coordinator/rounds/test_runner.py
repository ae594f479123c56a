"""The round runner over the model-free stand-in space: the points rule it decides with is
the one node verification replays, and plugins see every round with its node ids."""

from __future__ import annotations

import json

import pytest

from crowdsft import hookimpl, ledger, tournament
from crowdsft.coordinator.rounds import runner as runner_module
from crowdsft.coordinator.rounds.runner import RoundRunner
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
                        ident, [{"prompt": f"{ident.node_id} {batch}.{j}", "response": words}]
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
    assert list(record.scores) == pytest.approx(summary.scores)


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
                    c.submit_one(sign_contribution(ident, [ex]))
        set_data = runner.space.set_data
        runner.space.set_data = lambda data: (seen.append(data), set_data(data))
        runner.run()

    run([0, 1, 2, 3])
    run([3, 1, 0, 2])
    assert len(seen) == 2 and seen[0] == seen[1]
    assert [len(examples) for examples in seen[0]] == [4] * len(NODES)
