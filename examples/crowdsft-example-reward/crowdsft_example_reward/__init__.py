"""An example Crowd-SFT plugin: a reward rule registered through the ``crowdsft`` entry point.

``winner-takes-all``: the members of the winning group get ``prize`` points, everyone else
nothing. Use it by name: ``crowdsft simulate --reward winner-takes-all`` (or ``reward =
"winner-takes-all"`` in a coordinator's config).
"""

from __future__ import annotations

import numpy as np

from crowdsft import hookimpl
from crowdsft.plugins.reward import Reward, RoundOutcome


class WinnerTakesAll(Reward):
    """Members of the winning group get ``prize`` points; the others get nothing."""

    def __init__(self, prize: float = 1.0) -> None:
        if prize <= 0:
            raise ValueError("prize must be positive")
        self.prize = prize

    def update(self, points: np.ndarray, outcome: RoundOutcome) -> np.ndarray:
        new = points.astype(float, copy=True)
        new[outcome.groups[int(outcome.order[0])]] += self.prize
        return new


@hookimpl
def crowdsft_register_reward(register):
    register("winner-takes-all", WinnerTakesAll)
