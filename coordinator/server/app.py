"""Assemble and run a coordinator: store, identity, service, gRPC server, health checking."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from crowdsft.config import CoordinatorConfig
from crowdsft.errors import ConfigError
from crowdsft.keys import Identity, load_private_key, passphrase_from_env
from crowdsft.v1 import coordinator_pb2, coordinator_pb2_grpc

from ..store.db import Store
from .service import CoordinatorService, prune_nonces
from .servicer import CoordinatorServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name


def create_server(
    config: CoordinatorConfig, service: CoordinatorService
) -> tuple[grpc.Server, int, health.HealthServicer, CoordinatorServicer]:
    """An unstarted server bound to ``config.server.listen`` and the port it bound."""
    max_bytes = config.protocol.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.server.max_workers, thread_name_prefix="grpc-worker"
        ),
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=config.server.max_concurrent_streams,
    )
    servicer = CoordinatorServicer(service)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        credentials = server_credentials(config)
        if credentials is None:
            port = server.add_insecure_port(config.server.listen)
        else:
            port = server.add_secure_port(config.server.listen, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {config.server.listen}: {exc}") from None
    if port == 0:
        raise ConfigError(f"cannot listen on {config.server.listen} (address in use?)")
    return server, port, health_servicer, servicer


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


def load_identity(config: CoordinatorConfig) -> Identity:
    return load_private_key(config.key_path, passphrase_from_env(config.identity.passphrase_env))


class Coordinator:
    """A running coordinator. ``start()`` serves; ``stop()`` drains calls and closes the store."""

    def __init__(self, config: CoordinatorConfig, identity: Identity | None = None) -> None:
        self.config = config
        self.identity = identity or load_identity(config)
        self.store = Store(config.db_path, max_batch=config.storage.max_batch)
        try:
            pruned = prune_nonces(self.store, config.protocol.timestamp_window_s)
            if pruned:
                logger.info("forgot %d expired nonces", pruned)
            self.service = CoordinatorService(config, self.identity, self.store)
            self.server, self.port, self._health, self._servicer = create_server(
                config, self.service
            )
        except BaseException:
            self.store.close()
            raise
        host = config.server.listen.rpartition(":")[0]
        self.address = f"{host}:{self.port}"
        self._stopped = threading.Event()

    def start(self) -> Coordinator:
        self.server.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
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
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let in-flight ones finish within ``grace`` seconds, commit what is
        queued, close the store. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.server.grace_s if grace is None else grace
        self._health.enter_graceful_shutdown()
        self._servicer.stopping.set()
        self.server.stop(grace).wait()
        self.store.close()
        c = self.service.counters
        logger.info(
            "coordinator stopped (accepted %d, duplicates %d, rejected %d this run)",
            c.accepted,
            c.duplicates,
            c.rejected,
        )

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
