"""Every hook of Crowd-SFT, in one module.

Three kinds of hook:

* **Registry hooks** (``crowdsft_register_*``) take a ``register`` callback and return nothing.
  A plugin calls ``register(name, factory)`` once per strategy it offers; ``factory(**options)``
  builds the strategy. The coordinator's config (or a command-line flag) picks a strategy by
  name, so two plugins never fight over one hook.
* **Check hooks** fan out to every plugin: ``crowdsft_validate_contribution`` returns a
  rejection reason or None.
* **Event hooks** observe: ``crowdsft_round_finished``.

Hooks only grow by new arguments (an implementation may take a subset); none is ever renamed
or removed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from crowdsft.tournament import RoundRecord

hookspec = pluggy.HookspecMarker("crowdsft")
hookimpl = pluggy.HookimplMarker("crowdsft")

Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def crowdsft_register_grouping(register: Register) -> None:
    """Register grouping strategies (``plugins.grouping.Grouping`` factories): how contributors
    are split into groups each round."""


@hookspec
def crowdsft_register_evaluation(register: Register) -> None:
    """Register evaluation functions (``plugins.evaluation.Evaluation`` factories): how close a
    candidate is to the target, higher is better."""


@hookspec
def crowdsft_register_selection(register: Register) -> None:
    """Register selection strategies (``plugins.selection.Selection`` factories): which
    candidate wins a round, and the ranking of the groups."""


@hookspec
def crowdsft_register_reward(register: Register) -> None:
    """Register reward rules (``plugins.reward.Reward`` factories): the points every
    contributor holds after a round."""


@hookspec
def crowdsft_register_influence(register: Register) -> None:
    """Register influence rules (``plugins.influence.Influence`` factories): how much each
    member's data weighs inside its group's candidate, from its points."""


@hookspec
def crowdsft_register_valuation(register: Register) -> None:
    """Register valuation methods (``plugins.valuation.Valuation`` factories): Shapley-value
    estimators for a cooperative game over the contributors."""


@hookspec
def crowdsft_register_embedder(register: Register) -> None:
    """Register embedders (``plugins.embedding.Embedder`` factories): the text embedding in
    which an LLM candidate's generations are compared with the target."""


@hookspec
def crowdsft_register_admission(register: Register) -> None:
    """Register admission policies (``plugins.admission.AdmissionPolicy`` factories, built
    with ``config``, ``base_dir`` and ``store``): who may register and submit."""


@hookspec
def crowdsft_validate_contribution(node_id: str, examples: Sequence[dict[str, Any]]) -> str | None:
    """Check a contribution before it is stored. Return a reason to reject it, or None.

    ``examples`` are dicts with ``prompt``, ``response`` (strings) and optionally ``system``
    (a string) and ``history`` (a conversation's earlier turns, oldest first: a list of
    ``{"user": str, "assistant": str}`` dicts). Every plugin is asked; any reason rejects the
    contribution with INVALID_ARGUMENT.
    """


@hookspec
def crowdsft_round_finished(record: RoundRecord) -> None:
    """Observe a finished round: its groups (``record.group_nodes``: node ids per group in
    the coordinator), scores, winner and everyone's points before and after."""
