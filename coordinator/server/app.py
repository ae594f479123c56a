"""Assemble and run a coordinator: store, identity, service, gRPC server, health checking."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from crowdsft.config import CoordinatorConfig
from crowdsft.errors import ConfigError
from crowdsft.keys import Identity, load_private_key, passphrase_from_env
from crowdsft.v1 import coordinator_pb2, coordinator_pb2_grpc

from ..store.db import Store
from . import memory
from .heavy import HeavyLane
from .metrics import Metrics
from .service import CoordinatorService, prune_nonces
from .servicer import CoordinatorServicer
from .transport import PeerCalls

logger = logging.getLogger(__name__)

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name


def server_options(config: CoordinatorConfig) -> list[tuple[str, int]]:
    """Message limits, keepalive and connection lifetimes for the gRPC server."""
    s = config.server
    max_bytes = config.protocol.max_message_bytes
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.so_reuseport", 0),
        # Calls one connection may have open at once (HTTP/2 streams): a client that opens
        # more waits on its side, instead of queueing them all in the server.
        ("grpc.max_concurrent_streams", s.max_streams_per_connection),
        ("grpc.keepalive_time_ms", ms(s.keepalive_s)),
        ("grpc.keepalive_timeout_ms", ms(min(20.0, s.keepalive_s))),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(min(10.0, s.keepalive_s))),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", ms(s.max_connection_idle_s)),
        ("grpc.max_connection_age_ms", ms(s.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(60.0)),
        ("grpc.max_allowed_incoming_connections", connection_limit(s.max_connections)),
    ]


def connection_limit(wanted: int) -> int:
    """``server.max_connections``, lowered to leave room under the process's open-file limit
    (the store, the logs, the HTTP side and the heavy lane need descriptors too)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, int(soft) - 256))


def server_credentials(config: CoordinatorConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config (None: plaintext). With a client CA, mutual TLS: every
    node must present a certificate that CA issued."""
    s = config.server
    if s.tls_cert_file is None or s.tls_key_file is None:
        return None

    def read(p, what: str) -> bytes:
        path = config.resolve(p)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the TLS {what} {path}: {exc.strerror}") from None

    pair = (read(s.tls_key_file, "key"), read(s.tls_cert_file, "certificate"))
    client_ca = read(s.tls_client_ca_file, "client CA") if s.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def exposure_warnings(config: CoordinatorConfig, address: str) -> list[str]:
    """What an operator should hear before the first node connects: a plaintext listener on
    an address other nodes can reach, and invite tokens that would cross it in clear."""
    import ipaddress

    s = config.server
    if s.tls_cert_file is not None:
        return []
    host = address.rpartition(":")[0].strip("[]")
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False  # a host name: assume it is reachable
    if local:
        return []
    out = [
        f"serving plaintext on {address}, which other machines can reach: contributions, "
        "receipts and node keys' signatures travel unencrypted and can be read or tampered "
        "with on the way; give the coordinator a TLS certificate (coordinator init --tls, "
        "or server.tls_cert_file and tls_key_file)"
    ]
    if config.admission.policy == "invite":
        out.append(
            "admission is by invitation and the listener is plaintext: invite tokens cross "
            "the network in clear, where anyone who sees one can register with it first"
        )
    return out


def load_identity(config: CoordinatorConfig) -> Identity:
    return load_private_key(config.key_path, passphrase_from_env(config.identity.passphrase_env))


def check_free(listen: str) -> None:
    """ConfigError, in one line, where ``listen`` (HOST:PORT) cannot be bound: the port is in
    use, the address is not this machine's, or the port needs privileges. As gRPC binds
    every address a name resolves to and succeeds where any of them binds, this refuses only
    where none does. Port 0 (any free port), ports out of range and names that do not
    resolve are left to gRPC."""
    import errno
    import socket

    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return
    host = host.strip("[]")
    try:
        found = socket.getaddrinfo(
            host or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return
    failures: list[OSError] = []
    for family, kind, proto, _, address in found:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                probe.bind(address)
            return  # one address binds: gRPC will serve there
        except OSError as exc:
            failures.append(exc)
    if not failures:
        return
    codes = {exc.errno for exc in failures}
    if errno.EADDRINUSE in codes:
        why = "the port is in use (another coordinator, or another program, holds it)"
    elif errno.EACCES in codes:
        why = "ports below 1024 need privileges"
    elif codes <= {errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}:
        why = "the address is not one of this machine's"
    else:
        why = failures[0].strerror or str(failures[0])
    raise ConfigError(
        f"cannot listen on {listen}: {why}; choose another with --listen or server.listen"
    )


class Coordinator:
    """A running coordinator: the store, the service, and a ``grpc.aio`` server on an event
    loop of its own thread, so that ``start()``/``stop()`` are plain calls. Waiting on clients
    costs no thread; store and signature work runs on a pool of ``server.max_workers``."""

    def __init__(self, config: CoordinatorConfig, identity: Identity | None = None) -> None:
        self.config = config
        self.identity = identity or load_identity(config)
        self.store = Store(config.db_path, max_batch=config.storage.max_batch)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="coordinator-loop", daemon=True
        )
        self._thread.start()
        self._executor = futures.ThreadPoolExecutor(
            max_workers=config.server.max_workers, thread_name_prefix="coordinator-worker"
        )
        try:
            pruned = prune_nonces(self.store, config.protocol.timestamp_window_s)
            if pruned:
                logger.info("forgot %d expired nonces", pruned)
            self.service = CoordinatorService(config, self.identity, self.store)
            # Prometheus metrics, where [metrics] listen will serve them (coordinator.web)
            self.metrics = Metrics(self.store, config.db_path) if config.metrics.listen else None
            self.heavy: HeavyLane | None = None
            if config.server.heavy_envelope_bytes:
                self.heavy = HeavyLane(max_waiting=max(2, config.server.max_workers // 4))
                self.service.ingest.heavy = self.heavy
                self.service.ingest.heavy_bytes = config.server.heavy_envelope_bytes
            self.port = self._in_loop(self._build())
        except BaseException:
            self._shutdown_loop()
            self.store.close()
            raise
        host = config.server.listen.rpartition(":")[0]
        self.address = f"{host}:{self.port}"
        self._stopped = threading.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.store.on_writable = self._writable

    def _in_loop(self, coro: Any, timeout: float | None = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _build(self) -> int:
        config = self.config
        self.peer_calls = PeerCalls(
            config.server.max_calls_per_peer,
            config.server.request_s,
            reflection_per_s=config.server.reflection_per_s,
            reflection_burst=5 * config.server.reflection_per_s,
        )
        self.server = grpc.aio.server(
            interceptors=[self.peer_calls],
            options=server_options(config),
            maximum_concurrent_rpcs=config.server.max_concurrent_streams,
        )
        self._servicer = CoordinatorServicer(self.service, config.server, self._executor)
        self._servicer.metrics = self.metrics
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(self._servicer, self.server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        # Server reflection: generic gRPC tools (grpcurl, grpcui, Postman) list and call the
        # API without the .proto files.
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        check_free(config.server.listen)  # before gRPC's core logs its own bind failure
        try:
            credentials = server_credentials(config)
            if credentials is None:
                port = self.server.add_insecure_port(config.server.listen)
            else:
                port = self.server.add_secure_port(config.server.listen, credentials)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {config.server.listen}: {exc}") from None
        if port == 0:
            raise ConfigError(f"cannot listen on {config.server.listen} (address in use?)")
        return port

    async def _start(self) -> None:
        memory.fix_mmap_threshold()
        await self.server.start()
        await self._set_health(True)
        self._tasks.append(asyncio.ensure_future(self._prune_nonces()))
        self._tasks.append(asyncio.ensure_future(self._trim_memory()))

    async def _trim_memory(self, every_s: float = 10.0) -> None:
        """Give freed memory back to the system now and then (see ``memory``)."""
        while True:
            await asyncio.sleep(every_s)
            await asyncio.get_running_loop().run_in_executor(self._executor, memory.trim)

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    def _writable(self, ok: bool) -> None:
        """From the store's writer: a full disk turns health NOT_SERVING until writes succeed."""
        if not self._stopped.is_set():
            asyncio.run_coroutine_threadsafe(self._set_health(ok), self._loop)

    async def _prune_nonces(self) -> None:
        """Forget expired nonces while serving (they would be rejected by their time anyway)."""
        window = self.config.protocol.timestamp_window_s
        while True:
            await asyncio.sleep(max(0.5, window / 2))
            try:
                pruned = await asyncio.get_running_loop().run_in_executor(
                    self._executor, prune_nonces, self.store, window
                )
            except Exception as exc:  # the store is closing
                logger.debug("nonce pruning: %s", exc)
                continue
            if pruned:
                logger.debug("forgot %d expired nonces", pruned)

    def start(self) -> Coordinator:
        self._in_loop(self._start())
        s = self.config.server
        logger.info(
            "coordinator %s serving on %s%s (store %s, admission %s)",
            self.identity.node_id,
            self.address,
            " over mutual TLS"
            if s.tls_client_ca_file
            else " over TLS"
            if s.tls_cert_file
            else " (plaintext)",
            self.config.db_path,
            self.config.admission.policy,
        )
        for warning in exposure_warnings(self.config, self.address):
            logger.warning("%s", warning)
        return self

    async def _stop(self, grace: float) -> None:
        for task in self._tasks:
            task.cancel()
        await self._health.enter_graceful_shutdown()
        self._servicer.stopping.set()
        await self.server.stop(grace)
        self._servicer.feed.close()
        current = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t is not current]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let in-flight ones finish within ``grace`` seconds, commit what is
        queued, close the store. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.server.grace_s if grace is None else grace
        try:
            self._in_loop(self._stop(grace), timeout=grace + 30)
        finally:
            self._executor.shutdown(wait=True, cancel_futures=True)
            if self.heavy is not None:
                self.heavy.close()
            self.store.close()  # answers what is queued while the loop can still hear it
            self._shutdown_loop()
        c = self.service.counters
        logger.info(
            "coordinator stopped (accepted %d, duplicates %d, rejected %d this run)",
            c.accepted,
            c.duplicates,
            c.rejected,
        )

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def wait(self, stop: threading.Event, report_every_s: float = 30.0) -> None:
        """Block until ``stop`` is set, logging ingest activity now and then."""
        last = (0, 0, 0)
        while not stop.wait(report_every_s):
            c = self.service.counters
            now = (c.accepted, c.duplicates, c.rejected)
            if now != last:
                logger.info("ingest: %d accepted, %d duplicates, %d rejected since start", *now)
                last = now

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


def wait_ready(address: str, timeout: float = 10.0) -> None:
    """Block until the coordinator at ``address`` reports SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"coordinator at {address} not ready after {timeout}s")
            time.sleep(0.05)
