"""Crash safety: the coordinator killed with SIGKILL 20 times, aimed at rounds in progress and
uploads in flight, while nodes submit and rounds run (see ``crowdsft.testing.crash``;
``bench/crash.py`` runs longer)."""

from __future__ import annotations

import json

import pytest

from crowdsft.testing.crash import run_harness


@pytest.mark.timeout(600)
def test_twenty_kills_lose_nothing_and_finish_every_round_once(tmp_path):
    report = run_harness(tmp_path / "coordinator", kills=20, nodes=6, contributions=40, seed=1)
    assert report.ok, "\n".join(report.problems[:20])
    assert report.kills == 20
    assert report.acknowledged == 6 * 40
    assert report.rounds >= 3
    assert report.payload_files >= 6 * (40 // 7)  # the large ones went through files
    # the kills are aimed at work: some must strike inside rounds (and some mid-upload)
    assert report.kills_in_round > 0, "no kill interrupted a round"
    assert report.kills_in_upload > 0, "no kill interrupted an upload"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_coordinator_killed_in_ray_rounds_resumes_them_and_finishes_each_once(tmp_path):
    """The same harness with real training: the tiny LM, its candidates trained as Ray tasks
    on a cluster started apart (``ray start``), which outlives every kill of the
    coordinator; each restart joins it again and resumes the interrupted round."""
    pytest.importorskip("peft")
    pytest.importorskip("ray")
    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.store.db import Store
    from crowdsft.testing.raycluster import ray_cluster
    from crowdsft.testing.tiny import tiny_model

    model, tok = tiny_model()
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    root = tmp_path / "coordinator"
    with ray_cluster(nodes=1, cpus=2) as address:
        report = run_harness(
            root,
            kills=6,
            nodes=4,
            contributions=20,
            interval_s=(0.5, 2.0),
            pace_s=1.0,  # restarts take seconds here: data keeps coming, rounds keep running
            seed=2,
            model=folder,
            ray_address=address,
        )
    assert report.ok, "\n".join(report.problems[:20])
    assert report.kills == 6 and report.acknowledged == 4 * 20 and report.rounds >= 2
    assert report.kills_in_round > 0, "no kill interrupted a round"
    assert "resuming round" in (root / "coordinator.log").read_text()
    # every candidate was trained (and answered its prompts) by a Ray worker
    with Store(load_coordinator_config(root / "coordinator.toml").db_path) as store:
        trained = [json.loads(t) for (t,) in store.query("SELECT training FROM candidates")]
    assert trained and all("node_id" in t["worker"] for t in trained)
