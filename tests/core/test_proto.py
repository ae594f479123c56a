"""The committed protocol stubs match the .proto sources (CI also runs this check)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_up_to_date():
    pytest.importorskip("grpc_tools")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_payload_type_has_its_own_domain_tag():
    from crowdsft.envelope import domain_tag
    from crowdsft.v1 import contribution_pb2, envelope_pb2

    types = [
        contribution_pb2.ContributionPayload,
        contribution_pb2.RegisterPayload,
        contribution_pb2.StatusRequestPayload,
        envelope_pb2.Receipt,
    ]
    tags = {domain_tag(t) for t in types}
    assert len(tags) == len(types)
    assert domain_tag(envelope_pb2.Receipt) == b"crowdsft.v1.Receipt\n"
