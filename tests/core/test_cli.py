"""The ``crowdsft`` command as users run it."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys

from click.testing import CliRunner

from crowdsft.cli import main
from crowdsft.coordinator.server.app import wait_ready


def run(*args: str, env: dict[str, str] | None = None, ok: bool = True):
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_help_lists_the_roles():
    out = run("--help").output
    for word in ("node", "coordinator", "quickstart"):
        assert word in out


def test_keygen(tmp_path):
    key = tmp_path / "id" / "node.key"
    out = json.loads(run("node", "keygen", "--out", str(key), "--json").output)
    assert len(out["node_id"]) == 32 and not out["encrypted"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = run("node", "keygen", "--out", str(key), ok=False)
    assert again.exit_code == 2 and "refusing to overwrite" in again.output
    enc = tmp_path / "enc.key"
    out = run(
        "node",
        "keygen",
        "--out",
        str(enc),
        "--encrypt",
        "--json",
        env={"CROWDSFT_KEY_PASSPHRASE": "s3cret"},
    ).output
    assert json.loads(out)["encrypted"]
    missing = run("node", "keygen", "--out", str(tmp_path / "x.key"), "--encrypt", ok=False)
    assert missing.exit_code == 2 and "needs a passphrase" in missing.output


def test_coordinator_init(tmp_path):
    d = tmp_path / "coord"
    out = run("coordinator", "init", str(d)).output
    assert "coordinator key" in out
    assert stat.S_IMODE((d / "coordinator.key").stat().st_mode) == 0o600
    assert (d / "data").is_dir()
    assert "# Crowd-SFT coordinator configuration." in (d / "coordinator.toml").read_text()
    again = run("coordinator", "init", str(d), ok=False)
    assert again.exit_code == 2 and "refusing to overwrite" in again.output


def test_unknown_config_key_is_named(tmp_path):
    d = tmp_path / "coord"
    run("coordinator", "init", str(d))
    cfg = d / "coordinator.toml"
    cfg.write_text(cfg.read_text().replace("[rate_limit]", "[rate_limit]\nburts = 3"))
    bad = run("coordinator", "stats", "--config", str(cfg), ok=False)
    assert bad.exit_code == 2 and "unknown key rate_limit.burts" in bad.output


def _examples(tmp_path, n=5):
    p = tmp_path / "mine.jsonl"
    p.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(n))
    )
    return p


def test_submit_twice_adds_nothing(coord, tmp_path):
    key = tmp_path / "node.key"
    run("node", "keygen", "--out", str(key))
    data = _examples(tmp_path)
    args = ["node", "submit", "--coordinator", coord.address, "--key", str(key), str(data)]
    first = json.loads(run(*args, "--json").output)
    assert (first["accepted"], first["failed"]) == (5, 0)
    assert coord.counts()["contributions"] == 5
    second = json.loads(run(*args, "--json").output)
    assert (second["accepted"], second["already_submitted"]) == (0, 5)
    assert coord.counts()["contributions"] == 5
    human = run(*args).output
    assert "0 accepted, 5 already submitted" in human

    status = json.loads(
        run("node", "status", "--coordinator", coord.address, "--key", str(key), "--json").output
    )
    assert (status["contributions"], status["examples"], status["points"]) == (5, 5, 0.0)
    assert status["receipts_held"] == 5
    stats = json.loads(
        run("coordinator", "stats", "--config", str(coord.config.path), "--json").output
    )
    assert (stats["nodes"], stats["contributions"], stats["examples"]) == (1, 5, 5)
    assert stats["per_node"][0]["examples"] == 5
    assert (
        "contributions: 5" in run("coordinator", "stats", "--config", str(coord.config.path)).output
    )


def test_submit_reports_bad_lines_and_sends_nothing(coord, tmp_path):
    key = tmp_path / "node.key"
    run("node", "keygen", "--out", str(key))
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "no answer"}\n')
    bad = run(
        "node", "submit", "--coordinator", coord.address, "--key", str(key), str(data), ok=False
    )
    assert bad.exit_code == 2
    assert 'line 2: missing "response"' in bad.output and "nothing was sent" in bad.output
    assert coord.counts()["contributions"] == 0


def test_submit_with_encrypted_key_and_grouped_examples(coord, tmp_path):
    key = tmp_path / "node.key"
    env = {"MY_PASS": "pw"}
    run("node", "keygen", "--out", str(key), "--encrypt", "--passphrase-env", "MY_PASS", env=env)
    data = _examples(tmp_path, 7)
    base = ["node", "submit", "--coordinator", coord.address, "--key", str(key)]
    locked = run(*base, str(data), ok=False)
    assert locked.exit_code == 2 and "is encrypted" in locked.output
    out = run(
        *base,
        "--passphrase-env",
        "MY_PASS",
        "--examples-per-contribution",
        "3",
        "--license",
        "CC-BY-4.0",
        "--consent",
        "--json",
        str(data),
        env=env,
    ).output
    report = json.loads(out)
    assert (report["contributions"], report["examples"], report["accepted"]) == (3, 7, 3)
    assert coord.counts()["contributions"] == 3


def test_submit_to_an_allowlist_coordinator_fails_clearly(make_coordinator, tmp_path):
    coord = make_coordinator(admission={"policy": "allowlist", "allowlist": ()})
    key = tmp_path / "node.key"
    run("node", "keygen", "--out", str(key))
    out = run(
        "node",
        "submit",
        "--coordinator",
        coord.address,
        "--key",
        str(key),
        str(_examples(tmp_path, 2)),
        ok=False,
    )
    assert out.exit_code == 2 and "PERMISSION_DENIED" in out.output


def test_quickstart_json(tmp_path):
    out = json.loads(run("quickstart", "--workdir", str(tmp_path / "qs"), "--json").output)
    assert out["stats"]["contributions"] == len(out["receipts"]) == 6
    assert out["resubmitted_new"] == 0


def test_serve_shuts_down_cleanly_on_sigterm(tmp_path):
    d = tmp_path / "coord"
    run("coordinator", "init", str(d))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crowdsft.cli",
            "coordinator",
            "serve",
            "--config",
            str(d / "coordinator.toml"),
            "--listen",
            address,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_ready(address, timeout=20)
        key = tmp_path / "node.key"
        run("node", "keygen", "--out", str(key))
        run(
            "node",
            "submit",
            "--coordinator",
            address,
            "--key",
            str(key),
            str(_examples(tmp_path, 3)),
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "received SIGTERM; shutting down" in err
    assert "coordinator stopped (accepted 3" in err
    stats = json.loads(
        run("coordinator", "stats", "--config", str(d / "coordinator.toml"), "--json").output
    )
    assert stats["contributions"] == 3
