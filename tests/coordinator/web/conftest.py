"""A coordinator with finished rounds and its HTTP side (metrics, live page, JSON)."""

from __future__ import annotations

import pytest

from crowdsft.envelope import sign_contribution
from crowdsft.keys import Identity

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")


@pytest.fixture
def served(make_coordinator, request):
    """``(harness, web)``: a coordinator whose [metrics] listen serves on a free port."""
    from crowdsft.coordinator.web.serve import WebServer

    # the page with its leaderboard and node pages (the operator's choice); tests that need
    # the default (aggregates only) say so with @pytest.mark.parametrize("publish", ...)
    publish = getattr(request, "param", "nodes")
    coord = make_coordinator(
        metrics={"listen": "127.0.0.1:0", "publish": publish, "requests_per_s": 1000.0},
        rounds={"groups": 2, "judging_error": 0.0, "seed": 3},
        admission={"reject_duplicate_examples": False, "near_duplicate_threshold": 0.0},
    )
    c = coord.coordinator
    web = WebServer(c.config, c.store, c.metrics).start()
    try:
        yield coord, web
    finally:
        web.stop()


def _submit_from(coord, identities, each=2, tag="x"):
    """``each`` contributions from every identity; returns the receipts."""
    receipts = []
    with coord.client() as client:
        for k, ident in enumerate(identities):
            for i in range(each):
                env = sign_contribution(
                    ident,
                    [{"prompt": f"{tag} {k} {i}?", "response": f"answer {k} {i} " * 3}],
                    coordinator=coord.public_key,
                )
                receipts.append(client.submit_one(env)[0])
    return receipts


def _run_round(coord):
    """A round over the stand-in model space, its events counted by the metrics."""
    from crowdsft.coordinator.rounds.runner import RoundRunner
    from crowdsft.testing.standin import StandInSpace

    c = coord.coordinator
    space = StandInSpace(c.config.adapter_dir)
    runner = RoundRunner(c.config, c.store, space, on_event=c.metrics.on_event)
    return runner.run()


@pytest.fixture
def nodes():
    return [Identity.generate() for _ in range(4)]


@pytest.fixture
def submit_from():
    """``submit_from(coord, identities, each=2)``: receipts of contributions from each."""
    return _submit_from


@pytest.fixture
def run_round():
    """``run_round(coord)``: a round over the stand-in space, counted by the metrics."""
    return _run_round
