"""The HTTP server of ``[metrics] listen``: uvicorn on a thread of its own, beside the
coordinator's gRPC server."""

from __future__ import annotations

import threading
import time
from typing import Any

from crowdsft.config import CoordinatorConfig, parse_hostport
from crowdsft.errors import ConfigError

from ..server.metrics import Metrics
from ..store.db import Store
from .app import create_app


class WebServer:
    """``start()`` serves the app on ``listen`` (port 0: any free port, see ``address``);
    ``stop()`` ends it."""

    def __init__(
        self,
        config: CoordinatorConfig,
        store: Store,
        metrics: Metrics | None = None,
        listen: str | None = None,
    ) -> None:
        try:
            import uvicorn
        except ImportError:
            raise ConfigError(
                'the live page and metrics need the "monitor" extra: '
                "pip install 'crowd-sft[monitor]'"
            ) from None
        from .guard import guarded_protocol, quiet_noisy_loggers

        host, port = parse_hostport(listen or config.metrics.listen)
        m = config.metrics
        quiet_noisy_loggers()
        self._config = uvicorn.Config(
            create_app(config, store, metrics),
            host=host.strip("[]"),
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http=guarded_protocol(m.header_timeout_s, m.max_connections),
            limit_concurrency=m.max_connections,
            timeout_keep_alive=5,
            backlog=min(2048, 4 * m.max_connections),
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self.address = ""

    def start(self, timeout: float = 30) -> WebServer:
        self._thread = threading.Thread(target=self._server.run, name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise ConfigError(
                    f"cannot serve HTTP on {self._config.host}:{self._config.port} "
                    "(address in use?)"
                )
            if time.monotonic() > deadline:
                raise ConfigError("the HTTP server did not start in time")
            time.sleep(0.02)
        sockets: list[Any] = [s for srv in self._server.servers for s in srv.sockets]
        host, port = sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
