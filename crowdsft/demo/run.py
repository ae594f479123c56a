"""``crowdsft demo`` and ``crowdsft experiment single-vs-multi``: the whole system on a
seeded synthetic crowd, with the real SmolLM2 on this machine.

The demo starts a coordinator on loopback, runs one contributor node process per member of
the crowd (each with its own key, signing and submitting over gRPC), runs fine-tuning rounds,
trains the single-model baseline on the same pool, values every contributor, and writes the
report. The experiment repeats the multi-model tournament against the single model for
several seeds, without the network part.

Budget: every candidate, and the single model, trains for ``steps`` optimizer steps per
generation it stands for; the single model gets ``rounds * steps`` steps on the whole pool,
the same as the winning lineage's total. The tournament spends more compute in all (it also
trains the losing candidates); the figures say so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crowdsft.config import load_coordinator_config
from crowdsft.coordinator.server.scaffold import init_coordinator
from crowdsft.demo.crowd import Contributor, make_crowd, target_set
from crowdsft.errors import ConfigError

# Rounds choose winners on this many target prompts; as many others are held out, and every
# reported distance is measured on those.
SELECTION_PROMPTS = 6


@dataclass(frozen=True)
class DemoSettings:
    rounds: int = 3
    groups: int = 3
    seed: int = 0
    steps: int = 6
    learning_rate: float = 1e-2
    layers: int = 8
    batch_size: int = 8
    max_new_tokens: int = 32
    reward: str = "rank"
    examples_each: int = 8
    contributors_per_kind: int = 3


def _configure(path: Path, s: DemoSettings) -> None:
    from crowdsft.config import update_config_file

    update_config_file(
        path,
        {
            "evaluation": {"target_file": "target.jsonl", "max_new_tokens": s.max_new_tokens},
            "training": {
                "layers": s.layers,
                "max_steps": s.steps,
                "learning_rate": s.learning_rate,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "epochs": 100,
                "batch_size": s.batch_size,
                "max_length": 96,
            },
            "rounds": {"groups": s.groups, "reward": s.reward, "seed": s.seed},
            "rate_limit": {"contributions_per_s": 1000.0},
        },
    )


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def seeded_identity(seed: int, name: str) -> Any:
    """A contributor's key, derived from the seed and its name: the same crowd gets the same
    node ids (and so the same groups) on every run."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from crowdsft.keys import Identity

    secret = hashlib.sha256(f"crowdsft-demo/{seed}/{name}".encode()).digest()
    return Identity(Ed25519PrivateKey.from_private_bytes(secret))


def _spawn_nodes(crowd: list[Contributor], address: str, root: Path, seed: int) -> dict[str, str]:
    """One node process per contributor, each with its own key (derived from the seed),
    submitting its file over gRPC. Returns node id -> contributor name."""
    from crowdsft.keys import write_private_key

    procs = []
    for c in crowd:
        home = root / "nodes" / c.name
        home.mkdir(parents=True, exist_ok=True)
        data = home / "examples.jsonl"
        _write_jsonl(data, c.examples)
        ident = seeded_identity(seed, c.name)
        write_private_key(ident, home / "node.key", overwrite=True)
        (home / "id.json").write_text(json.dumps({"node_id": ident.node_id}))
        env = os.environ | {"CROWDSFT_HOME": str(home)}
        cli = [sys.executable, "-m", "crowdsft.cli", "-q"]
        script = (
            f"{' '.join(cli)} node submit --coordinator {address} --key {home / 'node.key'} "
            f"--no-progress --json {data} > {home / 'submit.json'}"
        )
        procs.append(
            (
                c,
                home,
                subprocess.Popen(
                    ["/bin/sh", "-c", script], env=env, stderr=subprocess.PIPE, text=True
                ),
            )
        )
    names = {}
    for c, home, p in procs:
        _, err = p.communicate(timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"node {c.name} failed: {err.strip()}")
        node_id = json.loads((home / "id.json").read_text())["node_id"]
        names[node_id] = f"{c.name}"
    return names


def _submit_direct(crowd: list[Contributor], coord: Any, seed: int) -> dict[str, str]:
    """Sign and store the crowd's contributions in process (no network): for experiments.
    Keys derive from the seed and the contributor's name, so the node ids (and with them the
    grouping) are the same on every run."""
    from crowdsft.envelope import sign_contribution

    names = {}
    for c in crowd:
        ident = seeded_identity(seed, c.name)
        names[ident.node_id] = c.name
        for ex in c.examples:
            coord.service.submit(
                sign_contribution(ident, [ex], coordinator=coord.identity.public_key)
            )
    return names


def run_demo(
    out: Path,
    s: DemoSettings,
    say: Callable[[str], None],
    via_grpc: bool = True,
    space_factory: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    from crowdsft.coordinator.report.build import build_report, distance_of
    from crowdsft.coordinator.rounds.runner import RoundRunner
    from crowdsft.coordinator.server.app import Coordinator
    from crowdsft.coordinator.store import queries
    from crowdsft.coordinator.training import lora as llm
    from crowdsft.coordinator.training.space import Candidate, build_llm_space

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous_run(out, say)
    config_path = init_coordinator(out / "coordinator", listen="127.0.0.1:0", force=True)
    _configure(config_path, s)
    # Held out: rounds choose their winners on the selection prompts (the coordinator's
    # target file); every distance reported below is measured on the other half, which no
    # choice has seen.
    prompts = target_set(n_prompts=2 * SELECTION_PROMPTS, seed=s.seed)
    target, reported = prompts[:SELECTION_PROMPTS], prompts[SELECTION_PROMPTS:]
    _write_jsonl(config_path.parent / "target.jsonl", target)
    config = load_coordinator_config(config_path)
    crowd = make_crowd(
        s.seed,
        {k: s.contributors_per_kind for k in ("expert-like", "noisy", "off-style", "spammer")},
        s.examples_each,
    )
    ev = config.evaluation.function
    with Coordinator(config) as coord:
        if via_grpc:
            say(
                f"coordinator on {coord.address}; {len(crowd)} contributor nodes signing and "
                "submitting over gRPC ..."
            )
            names = _spawn_nodes(crowd, coord.address, out, s.seed)
        else:
            names = _submit_direct(crowd, coord, s.seed)
        kinds = {nid: name.rsplit("-", 1)[0] for nid, name in names.items()}
        n_examples = queries.total_examples(coord.store)
        say(
            f"  {len(names)} nodes, {n_examples} signed examples stored "
            f"({time.perf_counter() - t0:.0f}s)"
        )
        if space_factory is None:
            say(f"loading {config.model.base} and the {config.evaluation.embedder} embedder ...")
            space = build_llm_space(config)
        else:
            space = space_factory(config)
        # Every candidate's training credits its examples in-run against the selection prompts
        # (what the credit reward pays from) and against the held-out prompts (the report's
        # grounded values, measured apart from anything that chose).
        space.credit_targets = list(target)
        space.heldout_credit_targets = list(reported)
        say("the base model (no fine-tuning) on the held-out prompts ...")
        base_model = held_out_distance(space, None, space.training, reported, config)
        say(f"  base model target distance {base_model:.4f} (held-out prompts)")
        say(f"single-model baseline: {s.rounds * s.steps} steps on the whole pool ...")
        pool = _round_data(coord.store, space, config)
        say(f"  {len(pool)} examples, the same the rounds can use (near-duplicates left out)")
        single = _single_model(space, pool, config, s, llm, reported)
        say(f"  single-model target distance {single:.4f} (held-out prompts)")
        runner = RoundRunner(config, coord.store, space, on_event=_progress(say))
        summaries = []
        for r in range(s.rounds):
            say(f"round {r + 1} of {s.rounds}:")
            summary = runner.run()
            summaries.append(summary)
            _print_round(summary, names, ev, say)
        verified = None
        if via_grpc:
            say("every node checks the ledger against its receipts (crowdsft node verify) ...")
            verified = _verify_nodes(crowd, coord.address, out)
            say(
                f"  {verified['ok']} of {len(crowd)} nodes verified: {verified['rounds']} signed, "
                f"hash-chained round records, {verified['proofs']} inclusion proofs, "
                "every points entry recomputed"
            )
            for problem in verified["problems"][:5]:
                say(f"  MISMATCH {problem}")
        lineage = runner.lineage()
        final = Candidate(tuple(lineage))
        multi_selection = distance_of(float(space.score([final])[0]), ev)
        space.materialise(final)
        multi = held_out_distance(space, None, space.training, reported, config)
        reduction = 100.0 * (single - multi) / single if single else 0.0
        points = queries.awarded_points(coord.store)
        by_kind: dict[str, list[float]] = {}
        for nid, kind in kinds.items():
            by_kind.setdefault(kind, []).append(points.get(nid, 0.0))
        mean_by_kind = {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}
        note = points_note(mean_by_kind, s.rounds)
        if note:
            say(note)
        say("valuing contributors and writing the report ...")
        report = build_report(
            config,
            coord.store,
            out / "report",
            space.embedder,
            [t["response"] for t in target],
            names=names,
            extra={
                "multi_model_distance": multi,
                "single_model_distance": single,
                "base_model_distance": base_model,
                "reduction_percent": reduction,
                "multi_model_distance_selection_set": multi_selection,
                "selection_set": len(target),
                "reported_set": len(reported),
                "rounds_run": s.rounds,
                "points_by_kind": ", ".join(f"{k} {v:.3g}" for k, v in mean_by_kind.items()),
                **({"points_note": note} if note else {}),
            },
            labels=REPORT_LABELS,
        )
    result = {
        "rounds": s.rounds,
        "groups": s.groups,
        "contributors": len(crowd),
        "examples": int(n_examples),
        "multi_model_distance": multi,
        "single_model_distance": single,
        "base_model_distance": base_model,
        "reduction_percent": reduction,
        "multi_model_distance_selection_set": multi_selection,
        "selection_set": len(target),
        "reported_set": len(reported),
        "pearson_points_shapley": report["pearson_points_shapley"],
        "pearson_points_grounded": report["pearson_points_grounded"],
        "spearman_points_grounded": report["spearman_points_grounded"],
        "valuation_method": report["valuation_method"],
        "grounded_method": report["grounded_method"],
        "grounded_on": report["grounded_on"],
        "mean_points_by_kind": mean_by_kind,
        "points_note": note,
        "report_path": report["report_path"],
        "seconds": round(time.perf_counter() - t0, 1),
        "winners": [sm.winner for sm in summaries],
        "nodes_verified_ledger": verified["ok"] if verified else None,
    }
    return result


# The demo's figures in the report, in words (held out: on prompts no choice saw).
REPORT_LABELS = {
    "multi_model_distance": "the tournament's model: target distance on the held-out prompts",
    "single_model_distance": "one fine-tune on all the data: target distance, held out",
    "base_model_distance": "the base model, not fine-tuned: target distance, held out",
    "reduction_percent": "how much closer the tournament's model is than the one fine-tune",
    "multi_model_distance_selection_set": (
        "the tournament's model on the selection prompts (which chose the winners)"
    ),
    "selection_set": "selection prompts (winners chosen on these)",
    "reported_set": "held-out prompts (every distance above, unless it says otherwise)",
    "rounds_run": "rounds",
    "points_by_kind": "mean points by kind of contributor",
    "points_note": "note on the points",
}

LOW_QUALITY = ("noisy", "off-style", "spammer")


def points_note(mean_by_kind: dict[str, float], rounds: int) -> str | None:
    """A sentence when a low-quality kind of contributor earned more points on average than
    the expert-like ones (None otherwise)."""
    good = mean_by_kind.get("expert-like")
    if good is None:
        return None
    ahead = [
        (k, v) for k, v in mean_by_kind.items() if k in LOW_QUALITY and v > good + 1e-9 * (1 + good)
    ]  # strictly ahead: a tie (4.33 each, to rounding) is not out-earning
    if not ahead:
        return None
    who = " and ".join(f"{k} contributors {v:.3g}" for k, v in ahead)
    return (
        f"In this run the points do not reward quality: {who} points on average, against "
        f"{good:.3g} for expert-like ones. After {rounds} round(s) a contributor's points "
        "depend mostly on the group it was drawn into (the report's Rounds table lists them)."
    )


DEMO_PARTS = ("coordinator", "nodes", "report")


def _clear_previous_run(out: Path, say: Callable[[str], None]) -> None:
    """A demo starts from nothing: remove what an earlier run left in ``out`` (its coordinator
    store, node states and report), never anything else there."""
    old = [out / p for p in DEMO_PARTS if (out / p).exists()]
    if not old:
        return
    if (out / "coordinator").exists() and not (out / "coordinator" / "coordinator.toml").exists():
        raise ConfigError(
            f"{out / 'coordinator'} exists but is not a demo's coordinator; "
            "choose another --out folder"
        )
    say(f"replacing the previous run in {out}")
    for p in old:
        shutil.rmtree(p)


def _verify_nodes(crowd: list[Contributor], address: str, root: Path) -> dict[str, Any]:
    """Run ``crowdsft node verify`` in every node's home, all at once."""
    procs = []
    for c in crowd:
        home = root / "nodes" / c.name
        cmd = [
            sys.executable,
            "-m",
            "crowdsft.cli",
            "-q",
            "node",
            "verify",
            "--coordinator",
            address,
            "--key",
            str(home / "node.key"),
            "--json",
        ]
        env = os.environ | {"CROWDSFT_HOME": str(home)}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    summary: dict[str, Any] = {"ok": 0, "rounds": 0, "proofs": 0, "problems": []}
    for c, p in zip(crowd, procs, strict=True):
        out, _ = p.communicate(timeout=300)
        try:
            data = json.loads(out)
        except ValueError:
            summary["problems"].append(f"{c.name}: node verify printed no report")
            continue
        summary["ok"] += bool(data["ok"])
        summary["rounds"] = max(summary["rounds"], data["rounds"])
        summary["proofs"] += data["proofs_checked"]
        summary["problems"] += [f"{c.name}: {p['message']}" for p in data["problems"]]
    return summary


def _round_data(store: Any, space: Any, config: Any) -> list[dict[str, str]]:
    """The examples that rounds will train on: every stored contribution except those that
    the planner flags as near-duplicates (the same pure check, same embedder and threshold),
    so that the single-model baseline and the tournament see the same data."""
    from crowdsft.coordinator.rounds import copies
    from crowdsft.coordinator.store import queries
    from crowdsft.validation import payload_examples, training_order

    rows = queries.unflagged_contributions(store)
    flagged: set[int] = set()
    threshold = config.admission.near_duplicate_threshold
    if threshold > 0:
        found = copies.flag_rows(
            rows,
            queries.never_used_seqs(store),
            copies.EmbeddingCache(space.embed),
            threshold,
        )
        flagged = {copy.seq for copy, _, _ in found}
    # in node order, each node's in the order rounds train on them: the store's order
    # follows the uploads' arrival, which would make the baseline vary from run to run
    by_node: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        if r.seq not in flagged:
            by_node.setdefault(r.node_id, []).extend(payload_examples(r.payload))
    return [e for n in sorted(by_node) for e in training_order(by_node[n])]


def held_out_distance(
    space: Any, adapter: Any, training: Any, prompts: list[dict[str, str]], config: Any
) -> float:
    """The distance of the space's current model (with ``adapter``, if any) on held-out
    ``prompts`` (dicts with ``prompt`` and the expert ``response``): the same generation
    settings and evaluation as the rounds, other prompts."""
    from crowdsft.coordinator.report.build import distance_of
    from crowdsft.coordinator.training.space import answer_and_score

    score, _ = answer_and_score(
        space.model,
        space.tokenizer,
        adapter,
        training,
        [{"prompt": p["prompt"]} for p in prompts],
        space.generation,
        space.embedder,
        space.evaluation,
        space.embedder.embed([p["response"] for p in prompts]),
    )
    return distance_of(score, config.evaluation.function)


def _single_model(
    space: Any,
    pool: list[dict[str, str]],
    config: Any,
    s: DemoSettings,
    llm: Any,
    reported: list[dict[str, str]],
) -> float:
    """Train one adapter on the whole pool from the base model (the space's model before
    any round has changed it) and measure it on the held-out prompts."""
    if space.chain:
        raise RuntimeError("the single-model baseline must train from the untouched base")
    cfg = dataclasses.replace(config.training, max_steps=s.rounds * s.steps, seed=s.seed)
    result = llm.fit(space.model, space.tokenizer, pool, None, cfg)
    return held_out_distance(space, result.adapter, cfg, reported, config)


def _progress(say: Callable[[str], None]) -> Callable[[str, dict[str, Any]], None]:
    started: dict[str, float] = {}

    def event(kind: str, info: dict[str, Any]) -> None:
        if kind == "candidate_training":
            started["t"] = time.perf_counter()
            who = (
                "the consolidated candidate"
                if info.get("consolidated")
                else f"group {info['group']}'s candidate"
            )
            say(f"  training {who} ({info['members']} contributors) ...")
        elif kind == "candidate_trained":
            say(f"    done in {time.perf_counter() - started.get('t', time.perf_counter()):.0f}s")
        elif kind == "candidate_scored":
            who = (
                "the consolidated candidate"
                if info.get("consolidated")
                else f"group {info['group']}'s candidate"
            )
            say(f"  scored {who}")

    return event


def _print_round(summary: Any, names: dict[str, str], ev: str, say: Callable[[str], None]) -> None:
    from crowdsft.coordinator.report.build import distance_of

    # Groups and ranks count from 0 everywhere (the ledger's indices; rank 0 is the winner).
    say(f"  {'group':6} {'distance':>9}  {'rank':>4}  members   (distance: lower is better)")
    say(f"  {'base':6} {distance_of(summary.base_score, ev):9.4f}")
    for g, members in enumerate(summary.groups):
        mark = "*" if g == summary.winner else " "
        rank = str(summary.ranking.index(g)) if summary.ranking else "-"
        who = ", ".join(names.get(m, m[:8]) for m in members)
        say(f"  {mark}{g:<5} {distance_of(summary.scores[g], ev):9.4f}  {rank:>4}  {who}")
    if summary.consolidated is not None:  # every contributor's data, at its points' weight
        n = len(summary.groups)
        mark = "*" if summary.consolidated_won else " "
        rank = str(summary.ranking.index(n)) if summary.ranking else "-"
        say(
            f"  {mark}{'all':<5} {distance_of(summary.scores[n], ev):9.4f}  {rank:>4}  "
            f"the consolidated candidate: all {len(summary.consolidated)} contributors"
        )
    if not summary.updated:
        say("  no candidate beat the current model: nothing changed this round")


def run_experiment(
    seeds: list[int], s: DemoSettings, out: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """The paper's LLM experiment on open models: for each seed, a fresh synthetic pool, the
    multi-model tournament (``s.rounds`` generations of ``s.groups`` candidates, the winner's
    data retired after each) against one model fine-tuned on the whole pool. The base model
    is loaded once and copied for every seed."""
    import copy

    from crowdsft.coordinator.training.space import LLMSpace, build_llm_space
    from crowdsft.datafiles import read_records

    cache: dict[str, Any] = {}

    def factory(config: Any) -> Any:
        if "space" not in cache:
            say(f"loading {config.model.base} and the {config.evaluation.embedder} embedder ...")
            space = build_llm_space(config)
            cache["space"], cache["model"] = space, copy.deepcopy(space.model)
            return space
        first = cache["space"]
        records = read_records(config.target_path)
        return LLMSpace(
            copy.deepcopy(cache["model"]),
            first.tokenizer,
            first.embedder,
            [],
            [{"prompt": r.prompt} for r in records],
            [r.response for r in records],
            first.evaluation,
            config.training,
            config.adapter_dir,
            first.generation,
        )

    runs = []
    for seed in seeds:
        say(f"seed {seed}:")
        r = run_demo(
            out / f"seed-{seed}",
            dataclasses.replace(s, seed=seed),
            say,
            via_grpc=False,
            space_factory=factory,
        )
        runs.append(
            {
                k: r[k]
                for k in (
                    "multi_model_distance",
                    "single_model_distance",
                    "reduction_percent",
                    "pearson_points_shapley",
                )
            }
            | {"seed": seed}
        )
        say(
            f"  seed {seed}: multi {r['multi_model_distance']:.4f}, single "
            f"{r['single_model_distance']:.4f}, reduction {r['reduction_percent']:.1f}%"
        )
    return {
        "seeds": runs,
        "mean_reduction_percent": float(np.mean([r["reduction_percent"] for r in runs])),
        "mean_multi_model_distance": float(np.mean([r["multi_model_distance"] for r in runs])),
        "mean_single_model_distance": float(np.mean([r["single_model_distance"] for r in runs])),
        "budget": (
            f"each candidate and each generation of the single model trains {s.steps} steps; "
            f"the single model gets {s.rounds * s.steps} steps on the whole pool, the winning "
            f"lineage {s.rounds * s.steps} in all; the tournament also trains "
            f"{s.rounds * (s.groups - 1)} losing candidates"
        ),
    }
