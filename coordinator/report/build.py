"""The coordinator's report: rounds, candidates, points, and how points track Shapley values
in the embedding game, as a self-contained HTML page (PNGs embedded, and also written
beside it) and a ``report.json``.

The embedding game (PAPER.md's utility, in the LLM space): each contributor is the mean
embedding of the responses it contributed; the target is the mean embedding of the expert
responses; ``v(S) = f(mean of the members' vectors, target)`` with the configured
evaluation function, and ``v(∅) = f(0, target)``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crowdsft.config import CoordinatorConfig
from crowdsft.plots import pyplot, save
from crowdsft.plugins.manager import Plugins, get_plugins
from crowdsft.plugins.valuation import CentroidGame
from crowdsft.stats import pearson, spearman
from crowdsft.validation import payload_examples

from ..store import queries
from ..store.db import Store


def distance_of(score: float, evaluation: str) -> float:
    """A score as a distance where the evaluation is a negated distance (l2, l1)."""
    return -score if evaluation in ("l2", "l1") else score


def contributor_vectors(store: Store, embedder: Any) -> tuple[list[str], np.ndarray]:
    """Each node's mean response embedding, over everything it contributed."""
    texts: dict[str, list[str]] = {}
    for row in queries.all_contributions(store):
        texts.setdefault(row.node_id, []).extend(
            e["response"] for e in payload_examples(row.payload)
        )
    nodes = sorted(texts)
    vectors = (
        np.stack([embedder.embed(texts[n]).mean(axis=0) for n in nodes])
        if nodes
        else (np.zeros((0, 0)))
    )
    return nodes, vectors


@dataclass(frozen=True)
class Valued:
    """Contributors' Shapley values in the embedding game, with their standard errors and
    covariance (None where the method gives no error estimate)."""

    nodes: list[str]
    values: np.ndarray
    stderr: np.ndarray
    covariance: np.ndarray | None

    def value(self, node: str) -> float | None:
        return float(self.values[self.nodes.index(node)]) if node in self.nodes else None

    def error(self, node: str) -> float | None:
        if node not in self.nodes:
            return None
        e = float(self.stderr[self.nodes.index(node)])
        return None if math.isnan(e) else e


def shapley_of_contributors(
    config: CoordinatorConfig,
    store: Store,
    embedder: Any,
    target_texts: Sequence[str],
    plugins: Plugins | None = None,
) -> Valued:
    """Each contributor's Shapley value in the embedding game, with its error."""
    plugins = plugins or get_plugins()
    nodes, vectors = contributor_vectors(store, embedder)
    if len(nodes) < 2:
        zeros = np.zeros(len(nodes))
        return Valued(nodes, zeros, zeros, np.zeros((len(nodes), len(nodes))))
    target = embedder.embed(list(target_texts)).mean(axis=0)
    game = CentroidGame(vectors, target, plugins.create("evaluation", config.evaluation.function))
    method = config.valuation.build(config.rounds.valuation, plugins)
    result = method(game, np.random.default_rng([config.rounds.seed, 99]))
    return Valued(nodes, result.values, result.stderr, result.covariance)


REPORT_FIELDS = (
    "evaluation",
    "rounds",
    "distance_per_round",
    "contributors",
    "valuation_method",
    "unresolved_pairs",
    "pearson_points_shapley",
    "spearman_points_shapley",
    "grounded_method",
    "grounded_on",
    "grounded_note",
    "pearson_points_grounded",
    "spearman_points_grounded",
)


def in_run_values(store: Store) -> tuple[dict[str, float], str] | None:
    """Grounded values from in-run credit: each node's credit summed over the rounds whose
    winner its data trained (the winning lineage); nodes only in losing groups, or in rounds
    that kept the old model, get 0. With the credit the rounds measured against held-out
    prompts (``member_credit_heldout``) where they did, else against the target. Returns
    the values and which prompts they were measured on (``held-out`` or ``target``); None
    when the rounds recorded no credit (they ran without ``credit_targets``)."""
    rounds = queries.finished_rounds(store)
    trained = [c.training for r in rounds for c in r.candidates]
    if not any("member_credit" in t for t in trained):
        return None
    heldout = all("member_credit_heldout" in t for t in trained if "member_credit" in t)
    key = "member_credit_heldout" if heldout else "member_credit"
    values: dict[str, float] = {}
    for r in rounds:
        for n in (n for g in r.groups for n in g):
            values.setdefault(n, 0.0)
        if not r.updated or r.winner is None:
            continue  # the old model was kept: nobody's data trained the lineage
        cand = next((c for c in r.candidates if c.group == r.winner), None)
        credit = cand.training.get(key) if cand is not None else None
        if credit is None:
            continue
        members = (
            r.consolidated["members"]
            if r.consolidated is not None and r.consolidated_won
            else r.groups[r.winner]
        )
        for n, c in zip(members, credit, strict=True):
            values[n] = values.get(n, 0.0) + float(c)
    return values, ("held-out" if heldout else "target")


def unresolved_pairs(valued: Valued, z: float = 1.96) -> list[tuple[str, str]] | None:
    """Pairs of contributors whose order the valuation does not settle: the difference of
    their values is within ``z`` standard errors of that difference, taken from the
    estimates' covariance (they share permutations, so they are correlated). Exact values
    leave only (near-)ties. None where the method gives no error estimate. Each pair is
    tested on its own at about 95%: with many pairs, some settled-looking orders are still
    chance."""
    if valued.covariance is None:
        return None
    v, cov = valued.values, valued.covariance
    scale = max(float(np.ptp(v)), 1e-300) if len(v) else 1.0
    order = sorted(range(len(v)), key=lambda i: -v[i])
    out = []
    for a_i, a in enumerate(order):
        for b in order[a_i + 1 :]:
            var = max(cov[a, a] + cov[b, b] - 2 * cov[a, b], 0.0)
            if abs(v[a] - v[b]) <= z * math.sqrt(var) + 1e-12 * scale:
                out.append((valued.nodes[a], valued.nodes[b]))
    return out


def build_report(
    config: CoordinatorConfig,
    store: Store,
    out: Path,
    embedder: Any,
    target_texts: Sequence[str],
    names: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``out/index.html``, ``out/report.json`` and the PNG plots; return the data.
    ``names``: node id -> name to show (default: the display names nodes registered, else
    the start of the node id). ``extra``: more figures for the page and report.json, shown
    under ``labels`` (key -> words; default: the key with spaces)."""
    clash = sorted(set(extra or {}) & set(REPORT_FIELDS))
    if clash:
        raise ValueError(f"extra report fields would replace the report's own: {clash}")
    out.mkdir(parents=True, exist_ok=True)
    names = _distinct(names or queries.display_names(store))
    ev = config.evaluation.function
    history = [r.as_dict() for r in queries.finished_rounds(store)]
    points = queries.awarded_points(store)
    valued = shapley_of_contributors(config, store, embedder, target_texts)
    shapley = {n: float(v) for n, v in zip(valued.nodes, valued.values, strict=True)}
    common = sorted(set(points) & set(shapley))
    p_vec = np.array([points[n] for n in common])
    s_vec = np.array([shapley[n] for n in common])
    corr = pearson(p_vec, s_vec) if len(common) > 2 else math.nan
    rho = spearman(p_vec, s_vec) if len(common) > 2 else math.nan
    found = in_run_values(store)
    grounded, grounded_on = found if found is not None else (None, None)
    g_corr = g_rho = math.nan
    if grounded is not None:
        both = sorted(set(points) & set(grounded))
        if len(both) > 2:
            pg = np.array([points[n] for n in both])
            gv = np.array([grounded[n] for n in both])
            g_corr, g_rho = pearson(pg, gv), spearman(pg, gv)
    # A rule that pays from the credit against the target, compared with that same credit,
    # is compared with itself: no figure. Held-out prompts (valuation.heldout_file) give one.
    circular = grounded_on == "target" and bool(
        getattr(get_plugins().create("reward", config.rounds.reward), "needs_credit", False)
    )
    if circular:
        g_corr = g_rho = math.nan
    data: dict[str, Any] = {
        "evaluation": ev,
        "rounds": history,
        "distance_per_round": [
            {
                "round_id": r["round_id"],
                "base": distance_of(r["base_score"], ev),
                "winner": distance_of(
                    r["candidates"][r["winner"]]["score"] if r["updated"] else r["base_score"], ev
                ),
                "candidates": [distance_of(c["score"], ev) for c in r["candidates"]],
                # the group whose candidate became the model (None: the base was kept;
                # len(groups): the consolidated candidate)
                "winner_group": r["winner"] if r["updated"] else None,
                "consolidated": r["consolidated"] is not None,
                # who trained each candidate, by name (the consolidated one: everyone)
                "members": [[names.get(n, n[:8]) for n in g] for g in r["groups"]],
            }
            for r in history
        ],
        "contributors": [
            {
                "node_id": n,
                "name": names.get(n, n[:8]),
                "points": points.get(n, 0.0),
                "shapley": shapley.get(n),
                "shapley_stderr": valued.error(n),
                "grounded": None if grounded is None else grounded.get(n),
            }
            for n in sorted(points, key=lambda n: -points.get(n, 0.0))
        ],
        "valuation_method": config.valuation_method,
        # pairs whose order the valuation does not settle (95%): points should not be read
        # as ranking them either way
        "unresolved_pairs": (
            None if (pairs := unresolved_pairs(valued)) is None else [list(p) for p in pairs]
        ),
        "pearson_points_shapley": None if math.isnan(corr) else corr,
        "spearman_points_shapley": None if math.isnan(rho) else rho,
        # points against values grounded in the fine-tuning itself (in-run credit of the
        # winning lineage's training), where the rounds recorded it
        "grounded_method": None if grounded is None else "in-run",
        # the prompts the grounded values were measured on: "held-out" (no choice saw them)
        # or "target" (the coordinator's own target: the credit reward pays from it too)
        "grounded_on": grounded_on,
        # why there is no Pearson with the grounded values, where there is none
        "grounded_note": (
            "the reward pays from the same in-run credit: set valuation.heldout_file for a "
            "comparison on prompts that no choice saw"
            if circular
            else None
        ),
        "pearson_points_grounded": None if math.isnan(g_corr) else g_corr,
        "spearman_points_grounded": None if math.isnan(g_rho) else g_rho,
    }
    assert set(data) == set(REPORT_FIELDS), sorted(set(data) ^ set(REPORT_FIELDS))
    data.update(extra or {})
    (out / "report.json").write_text(json.dumps(data, indent=2))
    pngs = _plots(data, out)
    (out / "index.html").write_text(_html(data, pngs, labels or {}))
    data["report_path"] = str(out / "index.html")
    return data


def _distinct(names: dict[str, str]) -> dict[str, str]:
    """Names as shown: one that several nodes registered gets the start of each node id
    (two "alice"s are two contributors, not one bar)."""
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {n: f"{name} ({n[:6]})" if counts[name] > 1 else name for n, name in names.items()}


def _plain(text: str) -> str:
    """A name as matplotlib shows it literally ("$" starts its maths mode)."""
    return text.replace("$", r"\$")


def _pairs_line(pairs: list[list[str]] | None) -> str:
    if pairs is None:
        return "The valuation method gives no error estimate: the order of close values is unknown."
    n = len(pairs)
    return (
        f"{n} pair{'' if n == 1 else 's'} of contributors whose order the Shapley estimate "
        "does not settle at 95% (listed in report.json as unresolved_pairs)."
    )


def _fmt(v: Any) -> str:
    """A figure as people read it: integers as they are, other numbers to 4 significant
    digits (3 decimals for correlations), percentages with a %."""
    if isinstance(v, bool) or v is None:
        return "n/a" if v is None else ("yes" if v else "no")
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _integer_rounds(ax: Any, xs: Sequence[int]) -> None:
    """Round numbers on the x axis: each round marked where there are few (one round is
    not a stretch from 0.96 to 1.04), whole numbers where there are many."""
    from matplotlib.ticker import MaxNLocator

    if xs and len(xs) <= 15:
        ax.set_xticks(list(xs))
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plots(data: dict[str, Any], out: Path) -> dict[str, Path]:
    plt = pyplot()
    paths: dict[str, Path] = {}
    rounds = data["distance_per_round"]
    xs = [r["round_id"] for r in rounds]

    fig, ax = plt.subplots(figsize=(6, 4))
    if rounds:
        ax.plot(
            [0, *xs],
            [rounds[0]["base"], *[r["winner"] for r in rounds]],
            marker="o",
            label="current model (round 0: the base model)",
        )
        if "single_model_distance" in data:
            ax.axhline(
                data["single_model_distance"], color="grey", ls="--", label="single-model baseline"
            )
        ax.legend()
    ax.set(
        xlabel="round",
        ylabel="target distance (lower is better)",
        title="Target distance per round",
    )
    _integer_rounds(ax, [0, *xs] if xs else [])
    paths["distance"] = save(fig, out / "distance_per_round.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    labelled: set[str] = set()

    def label(text: str) -> str | None:
        if text in labelled:
            return None
        labelled.add(text)
        return text

    for r in rounds:
        won = r.get("winner_group")
        others = [d for g, d in enumerate(r["candidates"]) if g != won]
        x = r["round_id"]
        ax.scatter([x] * len(others), others, color="tab:blue", label=label("candidate"))
        if won is not None:
            ax.scatter(
                [x],
                [r["candidates"][won]],
                color="tab:green",
                marker="*",
                s=160,
                label=label("winner"),
            )
        ax.scatter(
            [x],
            [r["base"]],
            color="grey",
            marker="_",
            s=300,
            label=label("base (the round's starting model)"),
        )
    ax.set(xlabel="round", ylabel="target distance (lower is better)", title="Candidates per round")
    _integer_rounds(ax, xs)
    if rounds:
        ax.legend(fontsize=8)
    paths["candidates"] = save(fig, out / "candidates_per_round.png")

    contributors = data["contributors"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([_plain(c["name"]) for c in contributors], [c["points"] for c in contributors])
    ax.set(ylabel="points", title="Points per contributor")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    paths["points"] = save(fig, out / "points_per_contributor.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(c["shapley"], c["points"]) for c in contributors if c["shapley"] is not None]
    if pts:
        ax.scatter(*zip(*pts, strict=True))
    r = data["pearson_points_shapley"]
    ax.set(
        xlabel="Shapley value (embedding game)",
        ylabel="points",
        title=f"Points vs Shapley values (Pearson {r:.3f})"
        if r is not None
        else "Points vs Shapley values",
    )
    paths["shapley"] = save(fig, out / "points_vs_shapley.png")
    return paths


# The report's own figures, in the order and words the page shows them (the rest of the
# data is in tables; extras a caller adds, such as the demo's, follow these).
HEADLINE = (
    ("valuation_method", "valuation"),
    ("pearson_points_shapley", "Pearson(points, Shapley)"),
    ("spearman_points_shapley", "Spearman(points, Shapley)"),
    ("grounded_method", "grounded values"),
    ("grounded_on", "grounded on prompts"),
    ("pearson_points_grounded", "Pearson(points, grounded)"),
    ("spearman_points_grounded", "Spearman(points, grounded)"),
    ("grounded_note", "note"),
)


def _html(data: dict[str, Any], pngs: dict[str, Path], labels: dict[str, str]) -> str:
    esc = html.escape

    def img(key: str) -> str:
        b64 = base64.b64encode(pngs[key].read_bytes()).decode()
        return (
            f'<figure><img alt="{key}" src="data:image/png;base64,{b64}">'
            f'<figcaption><a href="{pngs[key].name}">{pngs[key].name}</a></figcaption></figure>'
        )

    def corr(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    def distance(d: float) -> str:
        return f"{d:.4f}"

    rows = []
    for r in data["distance_per_round"]:
        won = r.get("winner_group")
        cells = []
        last = len(r["candidates"]) - 1
        members = r.get("members") or []
        for g, d in enumerate(r["candidates"]):
            if r.get("consolidated") and g == last:
                who = "consolidated (everyone's data)"
            else:
                who = f"group {g}"
                if g < len(members):
                    who += f" ({', '.join(members[g])})"
            text = f"{esc(who)}: {distance(d)}"
            cells.append(f'<span class="win">{text} ★</span>' if g == won else text)
        if won is None:
            result = "base kept"
        elif r.get("consolidated") and won == last:
            result = "the consolidated candidate won"
        else:
            result = f"group {won} won"
        rows.append(
            f"<tr><td class=num>{r['round_id']}</td><td class=num>{distance(r['base'])}</td>"
            f"<td>{'<br>'.join(cells)}</td><td class=num>{distance(r['winner'])}</td>"
            f"<td>{result}</td></tr>"
        )

    def shap(c: dict[str, Any]) -> str:
        if c["shapley"] is None:
            return "n/a"
        se = c.get("shapley_stderr") or 0.0
        return f"{c['shapley']:.4f}" + (f" ± {1.96 * se:.4f}" if se else "")

    people = "".join(
        f"<tr><td>{esc(c['name'])}</td><td><code>{esc(c['node_id'][:16])}</code></td>"
        f"<td class=num>{c['points']:.2f}</td><td class=num>{shap(c)}</td>"
        + (f"<td class=num>{c['grounded']:.4g}</td>" if c.get("grounded") is not None else "")
        + "</tr>"
        for c in data["contributors"]
    )
    grounded_head = (
        f"<th>in-run credit ({esc(str(data.get('grounded_on')))} prompts)</th>"
        if data.get("grounded_method")
        else ""
    )
    headline = []
    for key, label in HEADLINE:
        v = data.get(key)
        if v is None:
            continue
        shown = corr(v) if key.startswith(("pearson", "spearman")) else _fmt(v)
        headline.append(f"<tr><th>{esc(label)}</th><td>{esc(shown)}</td></tr>")
    extras = []
    for key, v in data.items():
        if key in REPORT_FIELDS or not isinstance(v, int | float | str) or isinstance(v, bool):
            continue
        shown = _fmt(v)
        if key.endswith("_percent") and isinstance(v, int | float):
            shown = f"{v:.1f}%"
        label = labels.get(key, key.replace("_", " "))
        extras.append(f"<tr><th>{esc(label)}</th><td>{esc(shown)}</td></tr>")
    files = " · ".join(
        f'<a href="{name}">{name}</a>' for name in ["report.json", *(p.name for p in pngs.values())]
    )
    n_rounds, n_people = len(data["rounds"]), len(data["contributors"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Crowd-SFT report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2330;
max-width:1040px;margin:2em auto;padding:0 1em}}
h1{{font-size:22px}} h2{{font-size:17px;margin-top:1.8em}}
table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border-bottom:1px solid #dde2ea;padding:4px 12px 4px 0;text-align:left;vertical-align:top}}
th{{color:#5b6475;font-weight:600}} td.num{{text-align:right;font-variant-numeric:tabular-nums}}
.win{{color:#1f7a3d;font-weight:600}} .muted{{color:#5b6475}}
figure{{display:inline-block;width:48%;margin:1%}} figure img{{width:100%}}
figcaption{{font-size:12px;color:#5b6475}}
</style></head><body>
<h1>Crowd-SFT report</h1>
<p class=muted>{n_rounds} finished round(s), {n_people} contributor(s); target distances by
{esc(data["evaluation"])} (lower is better). Files: {files}</p>
<table>{"".join(headline)}{"".join(extras)}</table>
<h2>Plots</h2>
{img("distance")}{img("candidates")}{img("points")}{img("shapley")}
<h2>Rounds</h2>
<table><tr><th>round</th><th>base</th><th>candidates (★ winner)</th><th>after</th>
<th>result</th></tr>{"".join(rows)}</table>
<p class=muted>Base: the model the round started from. After: the model the round left.</p>
<h2>Contributors</h2>
<table><tr><th>name</th><th>node</th><th>points</th><th>Shapley (± 95%)</th>{grounded_head}</tr>
{people}</table>
<p>{_pairs_line(data.get("unresolved_pairs"))}</p>
</body></html>
"""
