"""Crash safety: the coordinator killed with SIGKILL 20 times, aimed at rounds in progress and
uploads in flight, while nodes submit and rounds run (see ``crowdsft.testing.crash``;
``bench/crash.py`` runs longer)."""

from __future__ import annotations

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
