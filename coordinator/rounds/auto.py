"""Automatic rounds while the coordinator serves: after N new contributions, or every so many
seconds while there is new data (``[rounds] auto_after_contributions`` / ``auto_interval_s``).

The model is loaded on the first round, in a background thread, so serving starts at once.
A round that fails is logged and tried again at the next trigger; an interrupted round is
resumed by the next one (see ``rounds.RoundRunner``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from crowdsft.config import CoordinatorConfig
from crowdsft.errors import CrowdSFTError

from ..store.db import Store
from ..store.queries import contributions_since_last_plan
from .runner import NotEnoughContributors

logger = logging.getLogger(__name__)

POLL_S = 2.0


def new_contributions(store: Store) -> int:
    """Contributions accepted after the last round was planned (all of them before any)."""
    return contributions_since_last_plan(store)


def due(config: CoordinatorConfig, fresh: int, since_last_s: float) -> bool:
    r = config.rounds
    if fresh <= 0:
        return False
    if r.auto_after_contributions and fresh >= r.auto_after_contributions:
        return True
    return bool(r.auto_interval_s and since_last_s >= r.auto_interval_s)


class AutoRounds:
    def __init__(
        self,
        config: CoordinatorConfig,
        store: Store,
        run_round: Callable[[], Any],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.store = store
        self.run_round = run_round
        self.clock = clock
        self.last = clock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="auto-rounds", daemon=True)

    @property
    def enabled(self) -> bool:
        r = self.config.rounds
        return bool(r.auto_after_contributions or r.auto_interval_s)

    def start(self) -> AutoRounds:
        if self.enabled:
            self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def tick(self) -> bool:
        """Run a round if one is due; True when a round ran."""
        if not due(self.config, new_contributions(self.store), self.clock() - self.last):
            return False
        self.last = self.clock()
        try:
            self.run_round()
        except NotEnoughContributors as exc:
            logger.info("automatic round skipped: %s", exc)
            return False
        except CrowdSFTError as exc:  # a failing plugin, a changed rule: one line says it
            logger.error("automatic round failed (it will be retried): %s", exc)
            if exc.__cause__ is not None:  # the plugin's own traceback, with -vv
                logger.debug("caused by", exc_info=exc.__cause__)
            return False
        except Exception:
            logger.exception("automatic round failed; it will be retried")
            return False
        return True

    def _loop(self) -> None:
        while not self.stop.wait(POLL_S):
            self.tick()
