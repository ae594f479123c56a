"""The live page and its JSON, from a coordinator with finished rounds; the page loaded in
a real browser (headless Chromium), its rendered content checked and a screenshot saved."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

ARTIFACTS = Path(os.environ.get("CROWDSFT_TEST_ARTIFACTS", "test-artifacts"))


@pytest.fixture
def busy(served, nodes, submit_from, run_round):
    """Two finished rounds, and a report written where the page looks for it."""
    coord, web = served
    first = submit_from(coord, nodes, each=2, tag="first")
    run_round(coord)
    second = submit_from(coord, nodes, each=1, tag="second")
    run_round(coord)
    from crowdsft.coordinator.report.build import build_report
    from crowdsft.coordinator.web.data import report_dir
    from crowdsft.testing.tiny import CharEmbedder

    c = coord.coordinator
    build_report(c.config, c.store, report_dir(c.config), CharEmbedder(), ["answer 1 1 answer"])
    return coord, web, first + second


def get(web, path, status=200):
    r = httpx.get(f"http://{web.address}{path}", timeout=10)
    assert r.status_code == status, (path, r.status_code, r.text[:300])
    return r


def test_the_json_behind_the_page(busy, nodes):
    _, web, _ = busy
    o = get(web, "/api/overview").json()
    assert o["rounds_finished"] == 2 and o["round_in_progress"] is None
    assert o["nodes"] == 4 and o["contributions"] == 12
    assert o["ledger_head"]["round_id"] == 2 and len(o["ledger_head"]["record_hash"]) == 64
    board = get(web, "/api/leaderboard").json()
    assert [row["place"] for row in board] == [1, 2, 3, 4]
    assert [row["points"] for row in board] == sorted(
        (row["points"] for row in board), reverse=True
    )
    assert all(row["rounds_joined"] == 2 and row["contributions"] == 3 for row in board)
    assert all(row["value"] is not None for row in board)  # from the report
    rounds = get(web, "/api/rounds").json()
    assert [r["round_id"] for r in rounds] == [2, 1]
    one = get(web, "/api/rounds/1").json()
    assert len(one["candidates"]) == one["n_candidates"] == len(one["groups"]) + 1 == 3
    assert one["candidates"][-1]["consolidated"] and one["consolidated"]["members"] == 4
    me = nodes[0].node_id
    mine = get(web, f"/api/nodes/{me}").json()
    assert len(mine["receipts"]) == 3 and [r["round_id"] for r in mine["rounds"]] == [1, 2]
    get(web, f"/api/nodes/{'0' * 64}", 404)
    get(web, "/api/nodes/not-hex", 400)
    get(web, "/api/rounds/99", 404)
    assert me in get(web, f"/nodes/{me}").text
    assert "Round 1" in get(web, "/rounds/1").text


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("needs chromium (apt-get install chromium)")
    return found


def _browser(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=3000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_live_page_renders_in_a_browser(busy, nodes):
    _, web, _ = busy
    url = f"http://{web.address}/"
    dom = _browser("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for section in ("Current round", "Model lineage", "Leaderboard", "Rounds", "Ledger head"):
        assert section in html, section
    board = get(web, "/api/leaderboard").json()
    for row in board:
        assert row["node_id"][:16] in html
    head = get(web, "/api/ledger/head").json()
    assert head["record_hash"] in html
    assert "No round running. Last: round" in html
    assert "not computed" not in html and "±" in html  # values from the report
    assert 'src="/report/' in html and get(web, "/report/report.json").json()["rounds"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = (ARTIFACTS / "live-page.png").resolve()
    shot.unlink(missing_ok=True)
    done = _browser(f"--screenshot={shot}", "--window-size=1280,2600", url)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_report_reads_well_in_a_browser(busy):
    """Figures formatted (no raw floats), the winner marked, integer round ticks (by the
    plot code), links to the files; a screenshot beside the live page's."""
    import re

    _, web, _ = busy
    url = f"http://{web.address}/report/index.html"
    dom = _browser("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    text = re.sub(r"<[^>]+>|data:image/png;base64,[A-Za-z0-9+/=]+", " ", html)
    assert not re.search(r"\d\.\d{6,}", text), "a raw float is printed"
    assert text.count("Pearson(points, Shapley)") == 1
    assert "★" in text and ("won" in text or "base kept" in text)
    assert 'href="report.json"' in html and 'href="distance_per_round.png"' in html
    shot = (ARTIFACTS / "report.png").resolve()
    shot.unlink(missing_ok=True)
    done = _browser(f"--screenshot={shot}", "--window-size=1200,2200", url)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    assert shot.stat().st_size > 20_000
