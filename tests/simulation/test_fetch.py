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


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def _bomb(folder: Path, extra: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in ("movies.csv", "ratings.csv"):
            z.writestr(f"ml-latest-small/{name}", (folder / name).read_bytes())
        for name, data in extra.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_only_the_pinned_files_are_unpacked(server, synthetic_movielens, tmp_path):
    """Before: extra members (evil.sh, sub/deep.txt, a 1 GiB file) were installed too."""
    base, root = server
    archive = _bomb(
        synthetic_movielens,
        {
            "ml-latest-small/evil.sh": b"#!/bin/sh\nrm -rf ~\n",
            "ml-latest-small/sub/deep.txt": b"deep",
            "ml-latest-small/huge.bin": b"\0" * (8 << 20),  # compresses to a few KB
        },
    )
    (root / "ml.zip").write_bytes(archive)
    home = tmp_path / "home"
    dest = fetch_movielens(
        home / "ml-latest-small", url=f"{base}/ml.zip", files=_pins(synthetic_movielens)
    )
    assert _tree(home) == {
        "ml-latest-small",
        "ml-latest-small/movies.csv",
        "ml-latest-small/ratings.csv",
    }
    assert dest == home / "ml-latest-small"


def test_oversize_downloads_and_members_write_nothing(server, synthetic_movielens, tmp_path):
    """Before: a 1.9 MB archive wrote 1 GiB in 4 s, and with a wrong checksum 1 GB was
    written before the refusal."""
    base, root = server
    pins = _pins(synthetic_movielens)
    big = dict(pins, **{"ratings.csv": "0" * 64})
    payload = b"1,1,5.0,0\n" * (1 << 20)  # 10 MB that compresses to ~20 KB
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("ml-latest-small/movies.csv", (synthetic_movielens / "movies.csv").read_bytes())
        z.writestr("ml-latest-small/ratings.csv", payload)
    (root / "bomb.zip").write_bytes(archive.getvalue())
    home = tmp_path / "home"
    dest = home / "ml-latest-small"
    with pytest.raises(InputError, match="unpacked; at most 1048576"):
        fetch_movielens(dest, url=f"{base}/bomb.zip", files=big, max_member_bytes=1 << 20)
    assert _tree(home) == set()
    with pytest.raises(InputError, match=r"more than 1000 bytes|announces"):
        fetch_movielens(dest, url=f"{base}/bomb.zip", files=big, max_archive_bytes=1000)
    assert _tree(home) == set()
    with pytest.raises(InputError, match=r"archive .* has SHA-256"):
        fetch_movielens(dest, url=f"{base}/bomb.zip", files=big, sha256="00")
    assert _tree(home) == set()


def test_a_corrupt_archive_is_an_input_error_not_a_traceback(server, synthetic_movielens, tmp_path):
    base, root = server
    archive = bytearray(_archive(synthetic_movielens))
    at = archive.find(b"userId")  # inside ratings.csv's stored bytes
    archive[at] ^= 0xFF  # its CRC no longer matches
    (root / "crc.zip").write_bytes(bytes(archive))
    (root / "junk.zip").write_bytes(b"not a zip at all")
    dest = tmp_path / "home" / "ml-latest-small"
    for name in ("crc.zip", "junk.zip"):
        with pytest.raises(InputError, match="readable zip archive"):
            fetch_movielens(dest, url=f"{base}/{name}", files=_pins(synthetic_movielens))
        assert not dest.parent.exists() or _tree(dest.parent) == set()


def test_a_folder_that_is_not_movielens_is_never_replaced(server, synthetic_movielens, tmp_path):
    base, root = server
    (root / "ml.zip").write_bytes(_archive(synthetic_movielens))
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="not a MovieLens folder"):
        fetch_movielens(precious, url=f"{base}/ml.zip", files=_pins(synthetic_movielens))
    assert (precious / "thesis.tex").read_text() == "years of work"
