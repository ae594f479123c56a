"""Per-address limits at the transport, for every call the server accepts.

gRPC starts a handler for a unary request only once its message has arrived. A client that
opens calls and never sends their messages holds slots of the server-wide call limit
(``server.max_concurrent_streams``) while no code of ours has run, so no per-address limit
can see it; and the health and reflection services, which are not ours, have no limits at
all. ``PeerCalls`` is a server interceptor that makes every call, of every service, ours from
its first moment:

* each call counts against its peer address (``ratelimit.peer_host``) from the moment it
  opens; an address over ``server.max_calls_per_peer`` is refused at once, so one address
  cannot fill the server-wide limit;
* a call whose request is a single message is served as a request stream that must deliver
  that message within ``server.request_s``; one that does not is ended then, instead of
  waiting for the connection to die;
* reflection requests are paced per address (``server.reflection_per_s``): a client that
  asks faster waits for its answers.

On the wire nothing changes: a unary request is one message on an HTTP/2 stream, whichever
way the server reads it.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .ratelimit import Buckets, peer_host

REFLECTION_PREFIX = "/grpc.reflection."


class PeerCalls(grpc.aio.ServerInterceptor):
    """Counts every call against its peer address; see the module's docstring."""

    def __init__(
        self,
        per_peer: int,
        request_s: float,
        reflection_per_s: float = 20.0,
        reflection_burst: float = 100.0,
    ) -> None:
        self.per_peer = per_peer
        self.request_s = request_s
        self.reflection = Buckets(reflection_per_s, reflection_burst)
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.refused = 0  # calls refused for their address's count (for tests and metrics)
        self.timed_out = 0  # calls ended for never sending their request
        self.malformed = 0  # requests that did not parse

    # -- counting --------------------------------------------------------------------------

    def open_calls(self, host: str | None = None) -> int:
        with self._lock:
            return sum(self._open.values()) if host is None else self._open.get(host, 0)

    async def _enter(self, context: grpc.aio.ServicerContext) -> str:
        host = peer_host(context.peer())
        with self._lock:
            if self._open[host] < self.per_peer:
                self._open[host] += 1
                return host
            self.refused += 1
        context.set_trailing_metadata((("retry-after-s", "5"),))
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"peer {host} has {self.per_peer} calls open already, the most one address may "
            "have at once; wait for one to finish",
        )
        raise AssertionError("unreachable")  # abort raises

    def _leave(self, host: str) -> None:
        with self._lock:
            self._open[host] -= 1
            if not self._open[host]:
                del self._open[host]

    async def _first(self, requests: AsyncIterator[Any], context: Any, method: str) -> Any:
        """The one request of a unary-request call, within ``request_s``."""
        try:
            return await asyncio.wait_for(anext(requests), self.request_s)
        except TimeoutError:
            self.timed_out += 1
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no request arrived within {self.request_s:g}s of opening {method}",
            )
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} needs a request")
        except DecodeError:
            await self._malformed(context, method)
        raise AssertionError("unreachable")

    async def _malformed(self, context: Any, method: str) -> None:
        """A request that does not parse as its message type: answered INVALID_ARGUMENT, and
        not logged (grpc would log a traceback per call, which a client could repeat)."""
        self.malformed += 1
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid message for {method} (protobuf wire format)",
        )

    def _decoded(self, requests: AsyncIterator[Any], context: Any, method: str) -> Any:
        """A request stream whose malformed messages end the call as ``_malformed`` does."""

        async def gen() -> AsyncIterator[Any]:
            it = aiter(requests)
            while True:
                try:
                    request = await anext(it)
                except StopAsyncIteration:
                    return
                except DecodeError:
                    await self._malformed(context, method)
                yield request

        return gen()

    def _metered(self, requests: AsyncIterator[Any], context: Any, host: str) -> AsyncIterator[Any]:
        async def gen() -> AsyncIterator[Any]:
            async for request in requests:
                # Paced, not refused: a refused stream is reopened at once, and answering
                # refusals as fast as a client asks costs more than making it wait.
                while (wait := self.reflection.take(host)) > 0:
                    if wait > 10:
                        await context.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"peer {host} is over {self.reflection.rate:g} reflection requests/s",
                        )
                    await asyncio.sleep(wait)
                yield request

        return gen()

    # -- the interceptor -------------------------------------------------------------------

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if isinstance(method, bytes):
            method = method.decode(errors="replace")
        return self._wrap(handler, method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler as a request stream (a unary request is read as the stream's one
        message, within ``request_s``), counted against its peer for as long as it runs."""
        streaming_request, streaming_response = (
            handler.request_streaming,
            handler.response_streaming,
        )
        kind = f"{'stream' if streaming_request else 'unary'}_" + (
            "stream" if streaming_response else "unary"
        )
        inner = getattr(handler, kind)
        meter = method.startswith(REFLECTION_PREFIX)

        async def argument(requests: AsyncIterator[Any], context: Any, host: str) -> Any:
            """What ``inner`` takes: the one request, or the (checked) request stream."""
            if not streaming_request:
                return await self._first(requests, context, method)
            requests = self._decoded(requests, context, method)
            return self._metered(requests, context, host) if meter else requests

        async def generated(requests: AsyncIterator[Any], context: Any) -> Any:
            host = await self._enter(context)
            try:
                async for response in inner(await argument(requests, context, host), context):
                    yield response
            finally:
                self._leave(host)

        async def returned(requests: AsyncIterator[Any], context: Any) -> Any:
            host = await self._enter(context)
            try:  # a coroutine (or a response stream written with context.write)
                return await _result(inner(await argument(requests, context, host), context))
            finally:
                self._leave(host)

        kw = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if not streaming_response:
            return grpc.stream_unary_rpc_method_handler(returned, **kw)
        is_gen = inspect.isasyncgenfunction(inner) or inspect.isasyncgenfunction(
            getattr(inner, "__func__", None)
        )
        return grpc.stream_stream_rpc_method_handler(generated if is_gen else returned, **kw)


async def _result(value: Any) -> Any:
    """A behaviour's result, awaited where it is a coroutine (async handlers) and as it is
    where the handler is synchronous."""
    if inspect.isawaitable(value):
        return await value
    return value
