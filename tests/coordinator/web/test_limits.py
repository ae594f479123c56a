"""The HTTP side's limits (#25): privacy by default, pages of bounded size, per-address rate,
header deadlines and a connection cap, errors without tracebacks."""

from __future__ import annotations

import logging
import socket
import sqlite3
import time

import httpx
import pytest

pytest.importorskip("starlette")


def web_of(make_coordinator, **metrics):
    from crowdsft.coordinator.web.serve import WebServer

    settings = {"listen": "127.0.0.1:0", "requests_per_s": 1000.0, **metrics}
    coord = make_coordinator(metrics=settings)
    c = coord.coordinator
    return coord, WebServer(c.config, c.store, c.metrics).start()


def get(web, path, status=200):
    r = httpx.get(f"http://{web.address}{path}", timeout=10)
    assert r.status_code == status, (path, r.status_code, r.text[:300])
    return r


def add_nodes(coord, n):
    """``n`` registered nodes with points, written straight into the store's file."""
    conn = sqlite3.connect(coord.config.db_path)
    with conn:
        conn.executemany(
            "INSERT INTO nodes (node_id, public_key, registered_at_ms, points) VALUES (?,?,?,?)",
            [(f"{i:064x}", i.to_bytes(32, "big"), 1, float(i % 97)) for i in range(n)],
        )
    conn.close()


def test_node_standings_are_private_by_default(make_coordinator):
    """Before: any node's points, rounds and receipts were shown to anyone, while gRPC
    status needs the node's own signature (protocol 6.3)."""
    coord, web = web_of(make_coordinator)
    try:
        add_nodes(coord, 30)
        node = f"{3:064x}"
        assert "private" in get(web, "/api/leaderboard", 403).json()["error"]
        get(web, f"/api/nodes/{node}", 403)
        assert "node status" in get(web, f"/nodes/{node}", 403).text
        html = get(web, "/").text
        assert "Standings" in html and node[:16] not in html
        s = get(web, "/api/standings").json()
        assert s["nodes"] == 30 and s["points_max"] == 29.0 and len(s["deciles"]) == 9
    finally:
        web.stop()


def test_pages_are_bounded_with_many_nodes(make_coordinator):
    """Before: after 20,322 registrations, / returned 6.7 MB (every node) and
    /api/leaderboard 3.5 MB."""
    coord, web = web_of(make_coordinator, publish="nodes", page_size=25)
    try:
        add_nodes(coord, 3000)
        r = get(web, "/api/leaderboard?limit=10&offset=5")
        rows = r.json()
        assert [row["place"] for row in rows] == list(range(6, 16))
        assert r.headers["x-total-count"] == "3000"
        assert rows == sorted(rows, key=lambda row: -row["points"])
        assert len(get(web, "/api/leaderboard").json()) == 25  # the page size by default
        html = get(web, "/").text
        assert html.count("/nodes/") <= 25 and "/api/leaderboard?offset=25" in html
        assert len(html) < 100_000
        get(web, "/api/leaderboard?limit=100000", 400)
        get(web, "/api/rounds?offset=-1", 400)
    finally:
        web.stop()


def test_bad_ids_and_a_missing_report_answer_404_not_a_traceback(make_coordinator, caplog):
    """Before: /api/rounds/99999999999999999999 and /report/* before any report answered 500
    with a traceback."""
    caplog.set_level(logging.INFO)
    _coord, web = web_of(make_coordinator)
    try:
        get(web, "/api/rounds/99999999999999999999", 404)
        get(web, "/rounds/99999999999999999999", 404)
        get(web, "/report/report.json", 404)
        get(web, "/report/", 404)
    finally:
        web.stop()
    assert not [r for r in caplog.records if r.exc_info]


def test_an_error_is_a_short_500_and_one_log_line(make_coordinator, caplog, monkeypatch):
    from crowdsft.coordinator.web import data

    def broken(*a, **k):
        raise RuntimeError("the store is gone")

    monkeypatch.setattr(data, "overview", broken)
    caplog.set_level(logging.INFO)
    _coord, web = web_of(make_coordinator)
    try:
        r = get(web, "/api/overview", 500)
        assert r.json() == {"error": "internal error (logged on the coordinator)"}
        assert "Traceback" not in r.text and len(r.content) < 200
    finally:
        web.stop()
    logged = [r for r in caplog.records if "the store is gone" in r.getMessage()]
    assert len(logged) == 1 and not logged[0].exc_info


def test_requests_are_rate_limited_per_address(make_coordinator):
    _coord, web = web_of(make_coordinator, requests_per_s=1.0)  # a burst of 4
    try:
        codes = [httpx.get(f"http://{web.address}/api/overview").status_code for _ in range(8)]
    finally:
        web.stop()
    assert codes[:4] == [200] * 4 and 429 in codes[4:]


def _open(web) -> socket.socket:
    host, port = web.address.rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)), timeout=5)


def _closed(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_slow_headers_are_cut_off_and_connections_capped(make_coordinator):
    """Before: 3,000 connections sending a header line every 10 s were never closed, and
    took the process's file descriptors from gRPC."""
    _coord, web = web_of(make_coordinator, header_timeout_s=0.5, max_connections=4)
    try:
        slow = _open(web)
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        assert _closed(slow, 5) and time.monotonic() - started < 4
        held = [_open(web) for _ in range(4)]
        extra = _open(web)
        assert _closed(extra, 2)  # over the cap: closed at once
        for s in [*held, slow, extra]:
            s.close()
        time.sleep(0.2)
        get(web, "/api/overview")  # the server itself is fine
    finally:
        web.stop()
