"""Load: 50 concurrent nodes x 400 contributions over loopback while a round runs; nothing lost,
nothing duplicated (``bench/load.py`` prints the throughput and latency figures)."""

from __future__ import annotations

import threading

import pytest

from crowdsft.coordinator.rounds.runner import RoundRunner
from crowdsft.envelope import new_nonce, now_ms, sign_envelope
from crowdsft.keys import Identity
from crowdsft.ledger import verify_ledger
from crowdsft.testing.load import ONE_ADDRESS, run_load
from crowdsft.testing.standin import StandInSpace
from crowdsft.v1 import contribution_pb2


@pytest.mark.timeout(900)
def test_fifty_nodes_while_a_round_runs(make_coordinator):
    coord = make_coordinator(
        rounds={"groups": 2, "judging_error": 0.0},
        admission={"near_duplicate_threshold": 0.0},
        **ONE_ADDRESS,  # fifty nodes, all on this machine's one address
    )
    early = [Identity.generate() for _ in range(4)]
    with coord.client() as c:
        for n, ident in enumerate(early):
            c.stub.SubmitContribution(
                sign_envelope(
                    ident,
                    contribution_pb2.ContributionPayload(
                        examples=[
                            contribution_pb2.Example(
                                prompt=f"early {n}", response="x" * (10 * n + 5)
                            )
                        ],
                        nonce=new_nonce(),
                        timestamp_ms=now_ms(),
                    ),
                    coord.public_key,
                ),
                timeout=10,
            )
    runner = RoundRunner(
        coord.config,
        coord.coordinator.store,
        StandInSpace(coord.config.adapter_dir, delay_s=0.5),
    )
    summaries = []
    round_thread = threading.Thread(target=lambda: summaries.append(runner.run()))
    round_thread.start()
    result = run_load(coord.address, nodes=50, per_node=400)
    round_thread.join(60)
    assert not result.errors, result.errors
    assert result.codes == {0: 20_000}
    assert len(result.acknowledged) == 20_000
    stored = coord.contribution_ids()
    assert len(stored) == len(set(stored)) == 20_000 + len(early)
    assert result.acknowledged <= set(stored)
    assert summaries and summaries[0].round_id == 1
    with coord.client() as c:
        assert verify_ledger(c.ledger(), coord.public_key).ok
