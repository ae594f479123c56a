"""Following the coordinator's rounds live (``node watch``, ``Node.watch``): reconnecting
through coordinator restarts and connection recycling, never showing an event twice."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any

import grpc

from crowdsft.errors import CoordinatorError

from .client import CoordinatorClient


def follow_rounds(
    client: CoordinatorClient,
    after: int = 0,
    on_status: Callable[[str], None] | None = None,
) -> Generator[Any, None, None]:
    """Round events (``crowdsft.v1.RoundEvent``: planned, then finished) after round
    ``after``, as they happen, until the caller stops iterating. The coordinator closes old
    connections now and then (``server.max_connection_age_s``) and may restart: the stream
    is reopened after the last event seen, with backoff; CoordinatorError when it stays
    unreachable or refuses. ``on_status`` hears, in words, when the stream is open and
    waiting, when it was lost and when it is reopened."""
    status = on_status or (lambda line: None)
    cursor = {"planned": after, "finished": after}
    reconnects = 0
    lost = False
    address = client.address
    while True:
        stream = client.watch_rounds(min(cursor.values()), timeout=None)
        opened = time.monotonic()
        try:
            # the coordinator sends its headers when the stream opens (an older one with
            # the first event): then the node is connected and waiting
            stream.initial_metadata()
            if not stream.done():
                status(
                    f"{'reconnected' if lost else 'connected'} to {address}; waiting for "
                    f"{'the next round' if cursor['planned'] or cursor['finished'] else 'a round'}"
                )
            for ev in stream:
                if ev.round_id <= cursor[ev.kind]:
                    continue  # shown before the reconnect
                cursor[ev.kind] = ev.round_id
                reconnects = 0
                try:
                    yield ev
                except GeneratorExit:
                    getattr(stream, "cancel", lambda: None)()  # a grpc call: end it now
                    raise
            # The coordinator ended the stream (it shut down): reconnect as below.
            failure = ("UNAVAILABLE", "the coordinator closed the stream")
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.CANCELLED:
                return
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise CoordinatorError(
                    f"watching {address} failed: {code.name}: {err.details()}", code.name
                ) from None
            failure = (code.name, err.details())
        if time.monotonic() - opened > 30:
            reconnects = 0  # a stream that lived a while ended: a fresh start, not a retry
        if reconnects >= client.backoff.attempts:
            raise CoordinatorError(
                f"watching {address} failed: {failure[0]}: {failure[1]}", failure[0]
            )
        delay = client.backoff.delay(reconnects)
        status(
            f"lost the stream ({failure[0]}: {failure[1]}); reconnecting in {delay:.1f} s "
            f"(try {reconnects + 1} of {client.backoff.attempts})"
        )
        lost = True
        time.sleep(delay)
        reconnects += 1


def event_dict(ev: Any) -> dict[str, Any]:
    """A round event as plain data (``node watch --json``, ``Node.watch``): ``round_id``,
    ``kind``, ``groups``, ``contributors``; finished events add ``scores``, ``base_score``,
    ``updated``, ``winner``, ``evaluation`` and, where the evaluation is a negated distance
    (l2, l1), ``distances`` and ``base_distance`` (lower is better)."""
    info: dict[str, Any] = {
        "round_id": ev.round_id,
        "kind": ev.kind,
        "groups": ev.groups,
        "contributors": ev.contributors,
    }
    if ev.kind == "finished":
        info |= {
            "scores": list(ev.scores),
            "base_score": ev.base_score,
            "updated": ev.updated,
            "winner": ev.winner,
            "evaluation": ev.evaluation,
        }
        if ev.evaluation in ("l2", "l1"):
            info |= {"distances": [-x for x in ev.scores], "base_distance": -ev.base_score}
    return info


def participation_dicts(status: Any) -> list[dict[str, Any]]:
    """The rounds of a ``NodeStatus`` as plain data (``node status --json``, ``Node.status``):
    ``round_id``, ``group``, ``rank`` (None where the round ranked no group of it) and the
    node's points before and after."""
    return [
        {
            "round_id": r.round_id,
            "group": r.group,
            "rank": r.rank if r.HasField("rank") else None,
            "points_before": r.points_before,
            "points_after": r.points_after,
        }
        for r in status.rounds
    ]
