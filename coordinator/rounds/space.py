"""What the round runner needs of a model space, and how it names a model (no torch needed to
talk about one). ``training.space.LLMSpace`` is the real space; ``crowdsft.testing.standin``
a model-free one for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from crowdsft.tournament import ModelSpace


@dataclass(frozen=True)
class Candidate:
    """A model: the base with the adapters of ``chain`` merged in order, plus ``adapter`` on
    top (None: the model of ``chain`` itself)."""

    chain: tuple[str, ...] = ()
    adapter: str | None = None

    @property
    def lineage(self) -> tuple[str, ...]:
        return self.chain + ((self.adapter,) if self.adapter else ())


class RoundSpace(ModelSpace, Protocol):
    """A ``tournament.ModelSpace`` over ``Candidate`` models whose data the runner sets each
    round (one list of example dicts per contributor, in the order of the round's groups)."""

    def set_data(self, data: Sequence[Sequence[dict[str, str]]]) -> None: ...

    def training_info(self, adapter: str) -> dict[str, Any]:
        """What training this adapter took (steps, tokens, losses, seed), for the store."""
        ...
