"""Prometheus metrics on [metrics] listen: scraped during ingest and a round, they move."""

from __future__ import annotations

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crowdsft.envelope import sign_contribution


def scrape(web) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://{web.address}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_ingest_and_rounds(served, nodes, submit_from, run_round):
    coord, web = served
    before = scrape(web)
    assert before[("crowdsft_nodes", ())] == 0
    assert before[("crowdsft_ledger_height", ())] == 0
    submit_from(coord, nodes, each=2)
    # one refused: a tampered signature
    env = sign_contribution(
        nodes[0], [{"prompt": "p", "response": "r"}], coordinator=coord.public_key
    )
    env.signature = bytes(64)
    with coord.client() as client, pytest.raises(grpc.RpcError):
        client.stub.SubmitContribution(env, timeout=10)
    during = scrape(web)
    assert during[("crowdsft_contributions_total", (("code", "OK"),))] == 8
    assert during[("crowdsft_contributions_total", (("code", "UNAUTHENTICATED"),))] == 1
    assert during[("crowdsft_ingest_seconds_count", ())] == 9
    assert during[("crowdsft_nodes", ())] == 4
    assert during[("crowdsft_store_bytes", ())] > 0
    assert during[("crowdsft_rounds_finished_total", ())] == 0

    summary = run_round(coord)
    after = scrape(web)
    assert after[("crowdsft_rounds_finished_total", ())] == 1
    assert after[("crowdsft_round_seconds_count", ())] == 1
    # every candidate: the groups' and (the default) the consolidated one
    assert after[("crowdsft_candidate_training_seconds_count", ())] == len(summary.scores)
    assert after[("crowdsft_ledger_height", ())] == summary.round_id == 1


def test_metrics_are_off_by_default_and_need_a_valid_address(make_coordinator):
    from crowdsft.errors import ConfigError

    coord = make_coordinator()
    assert coord.coordinator.metrics is None
    with pytest.raises(ConfigError, match="not HOST:PORT"):
        make_coordinator(metrics={"listen": "9464"})
