"""The layers' import rules (``[tool.importlinter]`` in pyproject.toml) hold, as
``lint-imports`` in the repository root reports them (``.ci/lint-imports``; it sees
``node/``, ``coordinator/`` and ``plugins/`` through their links in ``crowdsft/``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    pytest.importorskip("importlinter")
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "lint-imports"), sys.executable],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
