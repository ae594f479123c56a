"""A model as the round engine names it (no torch needed to talk about one)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A model: the base with the adapters of ``chain`` merged in order, plus ``adapter`` on
    top (None: the model of ``chain`` itself)."""

    chain: tuple[str, ...] = ()
    adapter: str | None = None

    @property
    def lineage(self) -> tuple[str, ...]:
        return self.chain + ((self.adapter,) if self.adapter else ())
