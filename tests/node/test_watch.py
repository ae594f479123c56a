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
    # what the node said while it waited, on stderr: connected, lost, reconnected
    said = [line for line in result.stderr.splitlines() if line.strip()]
    assert said[0] == f"connected to {coord.address}; waiting for a round"
    assert any(line.startswith("lost the stream (") and "reconnecting in" in line for line in said)
    assert f"reconnected to {coord.address}; waiting for the next round" in said


def test_watch_says_it_is_connected_and_waiting_unless_quiet(coord):
    plan(coord, 1)
    args = ["node", "watch", "--coordinator", coord.address, "--count", "1"]
    loud = CliRunner().invoke(main, args)
    assert loud.exit_code == 0, loud.output
    assert loud.stderr.startswith(f"connected to {coord.address}; waiting")
    assert loud.stdout.startswith("round 1: 2 contributors in 2 groups")
    quiet = CliRunner().invoke(main, ["-q", *args])
    assert quiet.exit_code == 0 and quiet.stderr == ""
