"""``node watch`` follows the rounds across a coordinator restart (or a connection closed for
its age), showing each event once."""

from __future__ import annotations

import json
import threading
import time

from click.testing import CliRunner

from crowdsft.cli import main
from crowdsft.coordinator.store import queries


def plan(coord, round_id: int) -> None:
    coord.coordinator.store.write(
        lambda conn: queries.insert_planned_round(
            conn,
            round_id,
            seed=0,
            started_ms=round_id,
            strategies={},
            base_lineage=[],
            groups=[["a"], ["b"]],
            weights=[[1.0], [1.0]],
            contribution_seqs=[],
        )
    )


def test_watch_resumes_after_a_restart_without_repeating_events(coord):
    plan(coord, 1)
    out: dict = {}

    def watch():
        out["result"] = CliRunner().invoke(
            main, ["node", "watch", "--coordinator", coord.address, "--count", "2", "--json"]
        )

    thread = threading.Thread(target=watch)
    thread.start()
    time.sleep(1.5)  # round 1 shown
    coord.restart(same_port=True)
    plan(coord, 2)
    thread.join(60)
    result = out["result"]
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [(e["round_id"], e["kind"]) for e in events] == [(1, "planned"), (2, "planned")]
