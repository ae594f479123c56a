"""`crowdsft data fetch movielens`: downloaded from a local HTTP server serving an archive made
here (nothing leaves the machine), checked against pinned hashes, unpacked where `simulate`
looks; a changed archive is refused and nothing is unpacked."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from crowdsft.cli import main
from crowdsft.errors import InputError
from crowdsft.simulation.fetch import fetch_movielens, movielens_home


def _archive(folder: Path, tamper: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in ("movies.csv", "ratings.csv", "README.txt"):
            src = folder / name
            data = src.read_bytes() if src.exists() else b"readme\n"
            if tamper and name == "ratings.csv":
                data += b"1,1,5.0,0\n"
            z.writestr(f"ml-latest-small/{name}", data)
    return buf.getvalue()


@pytest.fixture
def server(tmp_path):
    """``(base_url, root)``: a local HTTP server serving files written under ``root``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()


def _pins(folder: Path) -> dict[str, str]:
    return {
        n: hashlib.sha256((folder / n).read_bytes()).hexdigest()
        for n in ("movies.csv", "ratings.csv")
    }


def test_fetch_checks_and_unpacks_where_simulate_looks(
    server, synthetic_movielens, tmp_path, monkeypatch
):
    base, root = server
    archive = _archive(synthetic_movielens)
    (root / "ml.zip").write_bytes(archive)
    monkeypatch.setenv("CROWDSFT_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("CROWDSFT_DATA", raising=False)
    folder = fetch_movielens(
        url=f"{base}/ml.zip",
        files=_pins(synthetic_movielens),
        sha256=hashlib.sha256(archive).hexdigest(),
    )
    assert folder == movielens_home() == tmp_path / "data" / "ml-latest-small"
    assert (folder / "ratings.csv").read_bytes() == (
        synthetic_movielens / "ratings.csv"
    ).read_bytes()
    # simulate finds it there without --data
    out = CliRunner().invoke(
        main,
        [
            "simulate",
            "--users",
            "10",
            "--groups",
            "2",
            "--runs",
            "1",
            "--rounds",
            "5",
            "--valuation",
            "exact",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output


def test_a_changed_archive_is_refused_and_nothing_is_unpacked(
    server, synthetic_movielens, tmp_path
):
    base, root = server
    (root / "ml.zip").write_bytes(_archive(synthetic_movielens, tamper=True))
    dest = tmp_path / "dest"
    with pytest.raises(InputError, match=r"ratings.csv has SHA-256 .* not the pinned"):
        fetch_movielens(dest, url=f"{base}/ml.zip", files=_pins(synthetic_movielens))
    assert not dest.exists()
    with pytest.raises(InputError, match=r"archive .* has SHA-256"):
        fetch_movielens(dest, url=f"{base}/ml.zip", files=_pins(synthetic_movielens), sha256="00")
    # the command line checks against the real data set's pins: refused as well
    out = CliRunner().invoke(
        main, ["data", "fetch", "movielens", "--url", f"{base}/ml.zip", "--dest", str(dest)]
    )
    assert out.exit_code != 0 and "not the pinned" in out.output and not dest.exists()
    missing = CliRunner().invoke(
        main, ["data", "fetch", "movielens", "--url", f"{base}/nothing.zip", "--dest", str(dest)]
    )
    assert missing.exit_code != 0 and "cannot download" in missing.output


def test_simulate_says_how_to_get_the_data(tmp_path):
    out = CliRunner().invoke(main, ["simulate", "--data", str(tmp_path / "none"), "--runs", "1"])
    assert out.exit_code != 0 and "crowdsft data fetch movielens" in out.output
