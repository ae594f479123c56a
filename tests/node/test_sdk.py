"""The contributor SDK (``from crowdsft import Node``): submit any iterable of dicts, get
verified receipts, resume without resending, status, verify and watch; and the documented
example, run as a user runs it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from crowdsft import Node
from crowdsft.errors import InputError
from crowdsft.keys import Identity

ROOT = Path(__file__).resolve().parents[2]


def test_submit_returns_receipts_and_resumes_without_resending(coord):
    identity = Identity.generate()
    examples = ({"prompt": f"q{i}?", "response": f"answer {i}"} for i in range(5))  # any iterable
    with Node(coord.address, key=identity) as node:
        first = node.submit(examples, examples_per_contribution=2)
        assert len(first) == 3 and first.report.accepted == 3
        assert all(r.node_id == identity.node_id for r in first)
        assert [r.examples for r in first] == [2, 2, 1]
        again = node.submit(
            [{"prompt": f"q{i}?", "response": f"answer {i}"} for i in range(5)],
            examples_per_contribution=2,
        )
        assert again.report.accepted == 0 and again.report.already_submitted == 3
        assert [r.contribution_id for r in again] == [r.contribution_id for r in first]
        status = node.status()
        assert status["contributions"] == 3 and status["examples"] == 5
        assert status["receipts_held"] == 3 and status["points"] == 0
        assert node.verify().ok


def test_bad_examples_are_named_by_index_and_nothing_is_sent(coord):
    with Node(coord.address, key=Identity.generate()) as node:
        with pytest.raises(InputError) as info:
            node.submit([{"prompt": "ok", "response": "fine"}, {"prompt": "no response"}, 7])
        message = str(info.value)
        assert 'examples[1]: missing "response"' in message
        assert "examples[2]: a record must be a JSON object" in message
        assert node.status()["contributions"] == 0


def test_watch_yields_round_events(coord):
    from crowdsft.coordinator.rounds.runner import RoundRunner
    from crowdsft.testing.standin import StandInSpace

    c = coord.coordinator
    with Node(coord.address, key=Identity.generate()) as a:
        a.submit([{"prompt": "a?", "response": "yes"}])
    with Node(coord.address, key=Identity.generate()) as b:
        b.submit([{"prompt": "b?", "response": "no"}])
    got: list[dict] = []

    def follow():
        with Node(coord.address, key=Identity.generate()) as n:
            for ev in n.watch():
                got.append(ev)
                if ev["kind"] == "finished":
                    return

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    config = dataclasses.replace(c.config, rounds=dataclasses.replace(c.config.rounds, groups=2))
    runner = RoundRunner(config, c.store, StandInSpace(c.config.adapter_dir))
    runner.run()
    watcher.join(30)
    assert [e["kind"] for e in got] == ["planned", "finished"]
    # two groups and (the default) the consolidated candidate
    assert got[1]["round_id"] == 1 and len(got[1]["scores"]) == 3


def test_the_documented_example_runs(coord, tmp_path):
    script = ROOT / "examples" / "sdk_submit.py"
    cmd = [
        sys.executable,
        str(script),
        "--coordinator",
        coord.address,
        "--key",
        str(tmp_path / "k"),
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("receipt ") == 3 and "3 accepted, 0 already sent" in first.stdout
    assert "verified" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "0 accepted, 3 already sent" in second.stdout


def test_the_example_keeps_its_key_out_of_the_current_folder(coord, tmp_path):
    """Before: without --key it wrote ./node.key, a private key in whatever folder it was run
    from (a repository, say). Now the crowdsft home's node key, as the CLI uses."""
    import os

    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    env = dict(os.environ, CROWDSFT_HOME=str(home))
    script = ROOT / "examples" / "sdk_submit.py"
    done = subprocess.run(
        [sys.executable, str(script), "--coordinator", coord.address],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=work,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert list(work.iterdir()) == []
    assert (home / "node.key").is_file()
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "*.key" in ignored and "crowdsft-demo/" in ignored
