"""The HTTP app (Starlette, served by uvicorn on ``[metrics] listen``): ``/metrics`` for
Prometheus, the live page at ``/`` (with ``/nodes/{id}`` and ``/rounds/{id}``), the JSON
behind it under ``/api/``, and the last report's files under ``/report/``. Read-only: no
route changes anything."""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

from crowdsft.config import CoordinatorConfig

from ..server.metrics import Metrics
from ..store.db import Store
from . import data
from .guard import Guard

NODE_ID = re.compile(r"^[0-9a-f]{16,128}$")
TEMPLATES = Path(__file__).parent / "templates"


def _when(ms: int | None) -> str:
    if ms is None:
        return ""
    t = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def create_app(config: CoordinatorConfig, store: Store, metrics: Metrics | None = None) -> Any:
    """The ASGI app over ``store``; ``metrics``: served at ``/metrics`` where given."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape())
    env.filters["when"] = _when
    env.filters["num"] = _num
    env.filters["short"] = lambda s, n=12: "" if s is None else str(s)[:n]

    def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(name).render(**context)
        return HTMLResponse(html, status_code=status)

    def node_id_of(request: Request) -> str:
        node_id = request.path_params["node_id"].lower()
        if not NODE_ID.match(node_id):
            raise HTTPException(400, "a node id is lowercase hex")
        return node_id

    def round_id_of(request: Request) -> int:
        try:
            round_id = int(request.path_params["round_id"])
        except ValueError:
            raise HTTPException(400, "a round id is a number") from None
        if not 0 < round_id < 2**63:  # what the store can hold; past it no round exists
            raise HTTPException(404, f"no round {request.path_params['round_id'][:40]}")
        return round_id

    published = config.metrics.publish == "nodes"
    PRIVATE = (
        "node standings are private (docs/protocol.md 6.3): a node sees its own with "
        '`crowdsft node status`; the operator may publish them (metrics.publish = "nodes")'
    )

    def page_of(request: Request) -> tuple[int, int]:
        """``?limit=`` (1..500, default metrics.page_size) and ``?offset=`` (>= 0)."""
        try:
            limit = int(request.query_params.get("limit", config.metrics.page_size))
            offset = int(request.query_params.get("offset", 0))
        except ValueError:
            raise HTTPException(400, "limit and offset are numbers") from None
        if not 1 <= limit <= 500 or not 0 <= offset < 2**62:
            raise HTTPException(400, "limit is 1 to 500 and offset at least 0")
        return limit, offset

    def index(request: Request) -> HTMLResponse:
        node = request.query_params.get("node", "").strip().lower()
        if node:
            return RedirectResponse(f"/nodes/{node}", status_code=303)  # type: ignore[return-value]
        report = data.last_report(config)
        plots = sorted(p.name for p in data.report_dir(config).glob("*.png")) if report else []
        return page(
            "index.html",
            overview=data.overview(store, config),
            leaderboard=data.leaderboard(store, config, limit=config.metrics.page_size)
            if published
            else None,
            standings=data.standings(store),
            rounds=data.rounds(store, config, limit=20),
            report=report,
            plots=plots,
            metrics=metrics is not None,
        )

    def node_page(request: Request) -> HTMLResponse:
        node_id = node_id_of(request)
        if not published:
            return page("missing.html", 403, what=f"node {node_id}", why=PRIVATE)
        found = data.node(store, config, node_id)
        if found is None:
            return page("missing.html", 404, what=f"node {node_id}")
        return page("node.html", node=found)

    def round_page(request: Request) -> HTMLResponse:
        round_id = round_id_of(request)
        found = data.round_detail(store, config, round_id)
        if found is None:
            return page("missing.html", 404, what=f"round {round_id}")
        return page("round.html", round=found, evaluation=config.evaluation.function)

    def api(fn: Any, private: bool = False, total: Any = None) -> Any:
        def endpoint(request: Request) -> JSONResponse:
            if private and not published:
                return JSONResponse({"error": PRIVATE}, status_code=403)
            result = fn(request)
            if result is None:
                return JSONResponse({"error": "not found"}, status_code=404)
            headers = {"x-total-count": str(total())} if total is not None else None
            return JSONResponse(result, headers=headers)

        return endpoint

    def leaderboard_page(request: Request) -> Any:
        limit, offset = page_of(request)
        return data.leaderboard(store, config, limit=limit, offset=offset)

    def rounds_page(request: Request) -> Any:
        limit, offset = page_of(request)
        return data.rounds(store, config, limit=limit, offset=offset)

    def nodes_total() -> int:
        return int(store.query("SELECT COUNT(*) FROM nodes")[0][0])

    report_files = StaticFiles(directory=data.report_dir(config), check_dir=False)

    async def report(scope: Any, receive: Any, send: Any) -> None:
        """The last report's files; 404 (not an error) before a report exists."""
        if not data.report_dir(config).is_dir():
            response = JSONResponse({"error": "no report yet"}, status_code=404)
            await response(scope, receive, send)
            return
        await report_files(scope, receive, send)

    routes = [
        Route("/", index),
        Route("/nodes/{node_id}", node_page),
        Route("/rounds/{round_id}", round_page),
        Route("/api/overview", api(lambda r: data.overview(store, config))),
        Route("/api/leaderboard", api(leaderboard_page, private=True, total=nodes_total)),
        Route("/api/standings", api(lambda r: data.standings(store))),
        Route("/api/rounds", api(rounds_page, total=lambda: data.round_count(store))),
        Route(
            "/api/rounds/{round_id}",
            api(lambda r: data.round_detail(store, config, round_id_of(r))),
        ),
        Route(
            "/api/nodes/{node_id}",
            api(lambda r: data.node(store, config, node_id_of(r)), private=True),
        ),
        Route("/api/ledger/head", api(lambda r: data.ledger_head(store) or {})),
        Mount("/report", app=report, name="report"),
    ]
    if metrics is not None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        def scrape(request: Request) -> Response:
            body = generate_latest(metrics.registry)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        routes.append(Route("/metrics", scrape))

    def failed(request: Request, exc: Exception) -> JSONResponse:
        # the answer to an error; Guard logs it (one line, no traceback)
        return JSONResponse({"error": "internal error (logged on the coordinator)"}, 500)

    return Guard(
        Starlette(routes=routes, exception_handlers={Exception: failed}),
        requests_per_s=config.metrics.requests_per_s,
        burst=4 * config.metrics.requests_per_s,
    )
