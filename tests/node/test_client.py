"""The node's coordinator client: retries, backoff, registration and duplicates."""

from __future__ import annotations

import random

import grpc
import pytest

from crowdsft.envelope import sign_contribution
from crowdsft.errors import CoordinatorError
from crowdsft.node.client import RETRY_AFTER_TRAILER, Backoff, CoordinatorClient


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailers=()):
        self._code, self._trailers = code, tuple(trailers)

    def code(self):
        return self._code

    def details(self):
        return f"fake {self._code.name}"

    def trailing_metadata(self):
        return self._trailers


def test_a_registration_retried_after_a_lost_reply_succeeds(coord, identity):
    """The first reply is lost after the coordinator registered the node (and spent the
    nonce). The retry must not resend the same signed request: that would be a replay."""
    with coord.client() as client:
        real = client.stub.RegisterNode
        calls = []

        def lossy(envelope, timeout=None):
            calls.append(envelope)
            response = real(envelope, timeout=timeout)
            if len(calls) == 1:
                raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)  # the reply never arrived
            return response

        client.stub.RegisterNode = lossy
        response = client.register(identity, display_name="alice")
    assert len(calls) == 2
    assert calls[0].payload != calls[1].payload  # signed afresh, with a new nonce
    assert response.node_id == identity.node_id and not response.newly_registered


def test_transient_errors_are_retried_and_the_retry_hint_is_a_floor(monkeypatch):
    slept = []
    monkeypatch.setattr("crowdsft.node.client.time.sleep", slept.append)
    client = CoordinatorClient("127.0.0.1:1", backoff=Backoff(base=0.001, cap=0.01, attempts=4))
    outcomes = [
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, [(RETRY_AFTER_TRAILER, "1500")]),
        FakeRpcError(grpc.StatusCode.UNAVAILABLE),
        "done",
    ]

    def call():
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out

    try:
        assert client._retry("testing", call) == "done"
    finally:
        client.close()
    assert len(slept) == 2
    assert slept[0] >= 1.5  # the coordinator's hint
    assert slept[1] <= 0.01  # the backoff's cap


def test_permanent_errors_are_not_retried(monkeypatch):
    monkeypatch.setattr("crowdsft.node.client.time.sleep", lambda s: None)
    client = CoordinatorClient("127.0.0.1:1", backoff=Backoff(attempts=5))
    calls = []

    def call():
        calls.append(1)
        raise FakeRpcError(grpc.StatusCode.PERMISSION_DENIED)

    try:
        with pytest.raises(CoordinatorError, match="PERMISSION_DENIED") as err:
            client._retry("submitting", call)
    finally:
        client.close()
    assert len(calls) == 1 and err.value.status_name == "PERMISSION_DENIED"


def test_giving_up_after_the_last_attempt_names_the_code(monkeypatch):
    monkeypatch.setattr("crowdsft.node.client.time.sleep", lambda s: None)
    client = CoordinatorClient("127.0.0.1:1", backoff=Backoff(attempts=3))

    def call():
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)

    try:
        with pytest.raises(CoordinatorError, match=r"UNAVAILABLE.*is a coordinator serving"):
            client._retry("contacting", call)
    finally:
        client.close()


def test_backoff_is_capped_jittered_exponential():
    b = Backoff(base=0.5, cap=3.0, attempts=8, rng=random.Random(0))
    for attempt in range(8):
        d = b.delay(attempt)
        assert 0 <= d <= min(3.0, 0.5 * 2**attempt)
    assert b.delay(0, floor=2.0) >= 2.0


def test_submitting_twice_returns_the_original_receipt(coord, identity):
    env = sign_contribution(
        identity, [{"prompt": "p", "response": "r"}], coordinator=coord.public_key
    )
    with coord.client() as client:
        first, dup1 = client.submit_one(env)
        again, dup2 = client.submit_one(env)
    assert not dup1 and dup2
    assert again.SerializeToString() == first.SerializeToString()


def test_the_coordinator_signs_tree_heads_over_its_ledger(coord):
    """GetTreeHead (docs/protocol.md 11.8): a signed head over the ledger, valid under the
    coordinator's key; with no round yet, the empty tree."""
    import hashlib

    with coord.client() as c:
        head, proof = c.tree_head(0)
        assert head.valid() and head.size == 0 and proof == []
        assert head.root == hashlib.sha256(b"").digest()
        later, proof = c.tree_head(5)  # a node that claims to know more gets no proof
        assert later.valid() and later.size == 0 and proof == []


def test_an_unreachable_coordinator_is_one_info_line_then_the_error(caplog):
    import logging
    import socket

    from crowdsft.errors import CoordinatorError
    from crowdsft.node.client import Backoff, CoordinatorClient

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caplog.set_level(logging.INFO, logger="crowdsft")
    client = CoordinatorClient(f"127.0.0.1:{port}", timeout=2, backoff=Backoff(0.01, 0.05, 5))
    with client, pytest.raises(CoordinatorError, match="UNAVAILABLE"):
        client.info()
    said = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(said) == 1 and "retrying up to 4 more times" in said[0].getMessage()


def test_backoff_bounds_hold_for_a_client_that_retries_for_good():
    from crowdsft.node.client import Backoff

    forever = Backoff(0.2, 10.0, 10**6)
    assert forever.delay(5000) <= 10.0 and forever.ceiling(5000) == 10.0
    growing = 0.2 + 0.4 + 0.8 + 1.6 + 3.2 + 6.4  # then every wait is the cap
    assert forever.longest() == pytest.approx(growing + 10.0 * (10**6 - 7))
    assert Backoff(0.2, 10.0, 8).longest() == pytest.approx(growing + 10.0)
    assert Backoff(0.2, 10.0, 1).longest() == 0.0
