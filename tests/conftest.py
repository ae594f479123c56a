"""Shared fixtures: keypairs, an in-process coordinator on port 0, clients."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crowdsft.config import CoordinatorConfig, check_strategies, load_coordinator_config
from crowdsft.coordinator.server.app import Coordinator
from crowdsft.coordinator.server.scaffold import init_coordinator
from crowdsft.keys import Identity
from crowdsft.node.client import Backoff, CoordinatorClient

# Ray token authentication off in every Ray these tests start or join: a process that has
# started a local Ray with it on refuses workers of a cluster without it (and `ray start`
# turns it on only where a token file happens to exist), so one setting for all of them.
os.environ["RAY_AUTH_MODE"] = "disabled"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests need CUDA: skipped, with the reason, where torch sees no GPU."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    try:
        import torch

        available = torch.cuda.is_available()
    except ImportError:
        available = False
    if not available:
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
        for item in gpu:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node state and default keys go to a per-test folder, never the user's home."""
    monkeypatch.setenv("CROWDSFT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CROWDSFT_KEY_PASSPHRASE", raising=False)
    monkeypatch.delenv("CROWDSFT_COORDINATOR", raising=False)


@pytest.fixture
def identity() -> Identity:
    return Identity.generate()


class Harness:
    """A coordinator in this process, on 127.0.0.1:0, that tests can restart."""

    def __init__(self, root: Path, **overrides: dict[str, Any]) -> None:
        path = init_coordinator(root, listen="127.0.0.1:0", force=True)
        config = load_coordinator_config(path)
        for section, values in overrides.items():
            config = dataclasses.replace(
                config, **{section: dataclasses.replace(getattr(config, section), **values)}
            )
        check_strategies(config)  # as loading the file would
        self.config: CoordinatorConfig = config
        self.coordinator: Coordinator | None = None
        self.start()

    def start(self) -> Coordinator:
        self.coordinator = Coordinator(self.config).start()
        return self.coordinator

    def stop(self, grace: float = 0) -> None:
        if self.coordinator is not None:
            self.coordinator.stop(grace)
            self.coordinator = None

    def restart(self, same_port: bool = False) -> Coordinator:
        if same_port:
            self.config = self.config.with_listen(self.address)
        self.stop()
        return self.start()

    @property
    def address(self) -> str:
        assert self.coordinator is not None
        return self.coordinator.address

    @property
    def public_key(self) -> bytes:
        assert self.coordinator is not None
        return self.coordinator.identity.public_key

    def client(self, **kw: Any) -> CoordinatorClient:
        kw.setdefault("timeout", 10)
        kw.setdefault("backoff", Backoff(base=0.01, cap=0.2, attempts=5))
        return CoordinatorClient(self.address, **kw)

    def contribution_ids(self) -> list[bytes]:
        from crowdsft.coordinator.store.db import connect

        conn = connect(self.config.db_path, readonly=True)
        try:
            return [r[0] for r in conn.execute("SELECT id FROM contributions")]
        finally:
            conn.close()

    def counts(self) -> dict[str, int]:
        """Rows in every table that a request could write to."""
        from crowdsft.coordinator.store.db import connect

        conn = connect(self.config.db_path, readonly=True)
        try:
            return {
                t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("nodes", "contributions", "nonces")
            }
        finally:
            conn.close()


@pytest.fixture
def make_coordinator(tmp_path: Path) -> Iterator[Any]:
    harnesses: list[Harness] = []

    def make(**overrides: dict[str, Any]) -> Harness:
        h = Harness(tmp_path / f"coordinator{len(harnesses)}", **overrides)
        harnesses.append(h)
        return h

    try:
        yield make
    finally:
        for h in harnesses:
            h.stop()


@pytest.fixture
def record_winner() -> Any:
    """``record(coord, digest)``: the store holds a finished round 1 whose winning adapter
    (``digest``, saved in the adapter folder) is the model's lineage, as `coordinator
    export` reads it, without running a round."""

    def record(coord: Any, digest: str) -> None:
        coord.coordinator.store.write(
            lambda conn: (
                conn.execute(
                    "INSERT INTO rounds(round_id, status, seed, started_ms, strategies, "
                    "base_lineage, groups, weights) VALUES (1, 'finished', 0, 0, '{}', '[]', "
                    "'[]', '[]')"
                ),
                conn.execute(
                    "INSERT INTO lineage(position, adapter, round_id) VALUES (0, ?, 1)", (digest,)
                ),
            )
        )

    return record


@pytest.fixture
def coord(make_coordinator: Any) -> Harness:
    return make_coordinator()


@pytest.fixture(scope="session")
def synthetic_movielens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MovieLens-shaped folder (40 users, 60 movies, 5 genres), seeded, so that
    simulations can run in tests without the real data set."""
    import numpy as np

    d = tmp_path_factory.mktemp("movielens")
    rng = np.random.default_rng(0)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance"]
    lines = ["movieId,title,genres"]
    for m in range(1, 61):
        picked = rng.choice(genres, size=rng.integers(1, 3), replace=False)
        lines.append(f"{m},Movie {m},{'|'.join(picked)}")
    (d / "movies.csv").write_text("\n".join(lines) + "\n")
    rows = ["userId,movieId,rating,timestamp"]
    for u in range(1, 41):
        for m in rng.choice(np.arange(1, 61), size=15, replace=False):
            rows.append(f"{u},{m},{rng.integers(1, 11) / 2},0")
    (d / "ratings.csv").write_text("\n".join(rows) + "\n")
    return d
