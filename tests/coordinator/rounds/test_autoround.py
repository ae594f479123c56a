import dataclasses

from crowdsft.coordinator.rounds.auto import AutoRounds, due, new_contributions
from crowdsft.coordinator.rounds.runner import NotEnoughContributors
from crowdsft.envelope import new_nonce, now_ms, sign_envelope
from crowdsft.v1 import contribution_pb2


def _submit(coord, identity, n):
    for _ in range(n):
        i = new_nonce().hex()  # every example its own: copies would be rejected
        coord.coordinator.service.submit(
            sign_envelope(
                identity,
                contribution_pb2.ContributionPayload(
                    examples=[contribution_pb2.Example(prompt=f"q{i}", response="a")],
                    nonce=new_nonce(),
                    timestamp_ms=now_ms(),
                ),
                coord.public_key,
            )
        )


def test_due_rules(coord):
    cfg = coord.config
    after5 = dataclasses.replace(
        cfg, rounds=dataclasses.replace(cfg.rounds, auto_after_contributions=5)
    )
    every60 = dataclasses.replace(cfg, rounds=dataclasses.replace(cfg.rounds, auto_interval_s=60))
    assert not due(cfg, 100, 1e9)  # off by default
    assert due(after5, 5, 0) and not due(after5, 4, 0)
    assert due(every60, 1, 61) and not due(every60, 1, 59) and not due(every60, 0, 61)


def test_rounds_trigger_after_new_contributions(make_coordinator, identity):
    coord = make_coordinator(rounds={"auto_after_contributions": 3})
    calls = []

    def run_round():
        calls.append(1)
        # what a round does to the count: plan over everything submitted so far
        coord.coordinator.store.write(
            lambda conn: (
                conn.execute(
                    "INSERT INTO rounds(round_id, status, seed, started_ms, strategies, "
                    "base_lineage, groups, weights) VALUES (?, 'finished', 0, 0, '{}', "
                    "'[]', '[]', '[]')",
                    (len(calls),),
                ),
                conn.execute(
                    "INSERT INTO round_contributions SELECT ?, seq FROM contributions",
                    (len(calls),),
                ),
            )
        )

    auto = AutoRounds(coord.config, coord.coordinator.store, run_round)
    _submit(coord, identity, 2)
    assert new_contributions(coord.coordinator.store) == 2
    assert not auto.tick() and calls == []
    _submit(coord, identity, 1)
    assert auto.tick() and calls == [1]
    assert new_contributions(coord.coordinator.store) == 0
    assert not auto.tick()


def test_a_round_without_enough_contributors_is_skipped(make_coordinator, identity):
    coord = make_coordinator(rounds={"auto_after_contributions": 1})

    def run_round():
        raise NotEnoughContributors("need 3")

    _submit(coord, identity, 1)
    assert not AutoRounds(coord.config, coord.coordinator.store, run_round).tick()
