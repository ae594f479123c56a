"""The servicer answers every domain error through one table, the same way for unary calls
(status, message, trailers) and for upload stream results (code, message, receipt, retry)."""

from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from types import SimpleNamespace

import grpc
import pytest

from crowdsft import errors
from crowdsft.config import ServerConfig
from crowdsft.coordinator.server import servicer as servicer_module
from crowdsft.coordinator.server.servicer import (
    ERROR_TABLE,
    RECEIPT_TRAILER,
    RETRY_AFTER_TRAILER,
    CoordinatorServicer,
    answer,
    result,
)
from crowdsft.v1 import envelope_pb2

RECEIPT = envelope_pb2.SignedReceipt(receipt=b"r", signature=b"s")


def instances() -> list[BaseException]:
    """One instance of every protocol error the project defines, and the store timeout."""
    out: list[BaseException] = []
    for _, cls in inspect.getmembers(errors, inspect.isclass):
        if not issubclass(cls, errors.ProtocolError):
            continue
        if cls is errors.DuplicateContributionError:
            out.append(cls("seen before", RECEIPT))
        elif cls is errors.RateLimitedError:
            out.append(cls("slow down", 0.25))
        else:
            out.append(cls(f"a {cls.__name__}"))
    return [*out, FutureTimeout()]


class Aborted(Exception):
    pass


class Context:
    """What an aio servicer method sees of a call; ``abort`` raises, as grpc's does."""

    trailers: tuple = ()

    def peer(self):
        return "ipv4:127.0.0.1:5000"

    def set_trailing_metadata(self, md):
        self.trailers = md

    async def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted


class Raising:
    """A service whose every call raises ``exc`` (its peer limits admit everything)."""

    ingest = SimpleNamespace(peers=SimpleNamespace(admit=lambda peer, size: None))

    def __init__(self, exc):
        self.exc = exc

    def __getattr__(self, name):
        def call(*args, **kwargs):
            raise self.exc

        return call


def test_every_protocol_error_is_in_the_table_with_its_own_status():
    for exc in instances():
        if isinstance(exc, errors.ProtocolError):
            assert type(exc) in ERROR_TABLE, type(exc).__name__
            assert ERROR_TABLE[type(exc)].name == exc.status_name
    assert set(ERROR_TABLE) <= {type(e) for e in instances()} | {errors.ProtocolError}


@pytest.mark.parametrize("exc", instances(), ids=lambda e: type(e).__name__)
@pytest.mark.parametrize(
    "method", ["SubmitContribution", "RegisterNode", "GetNodeStatus", "GetInclusionProofs"]
)
def test_unary_and_stream_answers_agree(exc, method):
    expected = answer(exc)
    ctx = Context()
    request = SimpleNamespace(contribution_ids=[], ByteSize=lambda: 0)  # a stand-in service

    async def call():
        with ThreadPoolExecutor(1) as pool:
            servicer = CoordinatorServicer(Raising(exc), ServerConfig(), pool)  # type: ignore[arg-type]
            await getattr(servicer, method)(request, ctx)

    with pytest.raises(Aborted):
        asyncio.run(call())
    assert (ctx.code, ctx.details) == (expected.code, expected.message)
    trailers = dict(ctx.trailers)

    streamed = result(7, b"c" * 32, False, exc)
    assert streamed.index == 7 and streamed.code == expected.code.value[0]
    assert streamed.message == expected.message
    if isinstance(exc, errors.DuplicateContributionError):
        assert streamed.receipt == RECEIPT
        assert trailers[RECEIPT_TRAILER] == RECEIPT.SerializeToString()
    else:
        assert not streamed.HasField("receipt") and RECEIPT_TRAILER not in trailers
    if expected.retry_after_ms:
        assert streamed.retry_after_ms == expected.retry_after_ms
        assert trailers[RETRY_AFTER_TRAILER] == str(expected.retry_after_ms)
        assert trailers["grpc-retry-pushback-ms"] == str(expected.retry_after_ms)
    else:
        assert streamed.retry_after_ms == 0 and RETRY_AFTER_TRAILER not in trailers
        assert "grpc-retry-pushback-ms" not in trailers


def test_retry_hints():
    assert answer(errors.RateLimitedError("x", 0.25)).retry_after_ms == 251
    assert (
        answer(errors.UnavailableError("x")).retry_after_ms == servicer_module.UNAVAILABLE_RETRY_MS
    )
    assert answer(FutureTimeout()).code == grpc.StatusCode.UNAVAILABLE
    assert answer(errors.InvalidPayloadError("x")).retry_after_ms == 0


def test_anything_else_is_internal_and_says_nothing_of_it(caplog):
    secret = RuntimeError("disk path /srv/secret")
    a = answer(secret)
    assert a.code == grpc.StatusCode.INTERNAL and "secret" not in a.message
    streamed = result(0, b"", False, secret)
    assert streamed.code == grpc.StatusCode.INTERNAL.value[0] and "secret" not in streamed.message
    assert any("internal error" in r.getMessage() for r in caplog.records)


def test_a_plugins_own_protocol_error_answers_with_its_own_status():
    class Gone(errors.NotAdmittedError):
        status_name = "NOT_FOUND"

    assert answer(Gone("no such invite")).code == grpc.StatusCode.NOT_FOUND
    assert result(0, b"", False, Gone("x")).code == grpc.StatusCode.NOT_FOUND.value[0]
