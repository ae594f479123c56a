"""Files written atomically: a failure part-way leaves the old content, never half a file."""

from __future__ import annotations

import pytest

from crowdsft import atomic


def test_write_bytes_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "model.bin"
    atomic.write_bytes(path, b"old" * 1000)
    atomic.write_bytes(path, b"new", mode=0o600)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["model.bin"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.bin"
    atomic.write_bytes(path, b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "export"
    with atomic.folder(out) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"1")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(RuntimeError), atomic.folder(out) as tmp:
        (tmp / "config.json").write_text('{"half": true}')
        raise RuntimeError("crashed while saving")
    assert (out / "config.json").read_text() == "{}"  # the complete old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with atomic.folder(out) as tmp:
        (tmp / "config.json").write_text('{"v": 2}')
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
