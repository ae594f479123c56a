"""``crowdsft demo`` and ``crowdsft experiment``."""

from __future__ import annotations

from pathlib import Path

import click

from crowdsft.console import echo_json


@click.command()
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1))
@click.option("--groups", default=3, show_default=True, type=click.IntRange(2))
@click.option(
    "--steps",
    default=6,
    show_default=True,
    type=click.IntRange(1),
    help="LoRA optimizer steps per candidate.",
)
@click.option(
    "--learning-rate",
    default=1e-2,
    show_default=True,
    type=click.FloatRange(0, None, min_open=True),
    help="LoRA learning rate.",
)
@click.option("--reward", default="rank", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("crowdsft-demo"),
    show_default=True,
    help="Folder for the coordinator, the nodes and the report.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final figures as JSON.")
def demo(
    rounds: int,
    groups: int,
    steps: int,
    learning_rate: float,
    reward: str,
    seed: int,
    out: Path,
    as_json: bool,
) -> None:
    """The whole system on this machine: a coordinator on loopback, a crowd of contributor
    nodes of mixed quality submitting signed examples over gRPC, fine-tuning rounds with the
    real SmolLM2, the single-model baseline, and a report."""
    from crowdsft.demo.run import DemoSettings, run_demo

    def say(line: str) -> None:
        click.echo(line, err=as_json)

    settings = DemoSettings(
        rounds=rounds,
        groups=groups,
        steps=steps,
        reward=reward,
        seed=seed,
        learning_rate=learning_rate,
    )
    result = run_demo(out, settings, say)
    if as_json:
        echo_json(result)
        return
    click.echo("")
    click.echo(
        f"distances on {result['reported_set']} held-out prompts (winners were chosen on "
        f"{result['selection_set']} others; lower is better):"
    )
    click.echo(f"multi-model (tournament) target distance: {result['multi_model_distance']:.4f}")
    click.echo(f"single-model baseline target distance:    {result['single_model_distance']:.4f}")
    click.echo(f"base model (not fine-tuned) distance:     {result['base_model_distance']:.4f}")
    click.echo(f"reduction:                                {result['reduction_percent']:.1f}%")
    pearson = result["pearson_points_shapley"]
    click.echo(
        f"Pearson(points, Shapley, embedding game): "
        f"{'n/a' if pearson is None else f'{pearson:.3f}'}"
    )
    grounded = result["pearson_points_grounded"]
    click.echo(
        f"Pearson(points, held-out in-run credit):  "
        f"{'n/a' if grounded is None else f'{grounded:.3f}'}"
    )
    kinds = ", ".join(f"{k} {v:g}" for k, v in result["mean_points_by_kind"].items())
    click.echo(f"mean points by kind of contributor:       {kinds}")
    if result.get("points_note"):
        click.echo(result["points_note"])
    click.echo(
        f"ledger verified by each node:             {result['nodes_verified_ledger']} of "
        f"{result['contributors']} nodes"
    )
    click.echo(f"report: {result['report_path']}  ({result['seconds']:.0f}s in all)")


@click.group()
def experiment() -> None:
    """Experiments from the paper, on open models."""


@experiment.command("single-vs-multi")
@click.option(
    "--seeds",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="How many seeds (pools) to run: 0, 1, ...",
)
@click.option(
    "--rounds",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="Generations of the tournament.",
)
@click.option(
    "--groups",
    default=3,
    show_default=True,
    type=click.IntRange(2),
    help="Candidates per generation.",
)
@click.option("--steps", default=6, show_default=True, type=click.IntRange(1))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("crowdsft-experiment"),
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def single_vs_multi(
    seeds: int, rounds: int, groups: int, steps: int, out: Path, as_json: bool
) -> None:
    """Single-model SFT on the whole pool versus the multi-model tournament, same pool."""
    from crowdsft.demo.run import DemoSettings, run_experiment

    def say(line: str) -> None:
        click.echo(line, err=True)

    result = run_experiment(
        list(range(seeds)), DemoSettings(rounds=rounds, groups=groups, steps=steps), out, say
    )
    if as_json:
        echo_json(result)
        return
    click.echo(f"{'seed':>4} {'single':>9} {'multi':>9} {'reduction':>10}")
    for r in result["seeds"]:
        click.echo(
            f"{r['seed']:>4} {r['single_model_distance']:9.4f} "
            f"{r['multi_model_distance']:9.4f} {r['reduction_percent']:9.1f}%"
        )
    click.echo(
        f"mean {result['mean_single_model_distance']:9.4f} "
        f"{result['mean_multi_model_distance']:9.4f} "
        f"{result['mean_reduction_percent']:9.1f}%"
    )
    click.echo(f"budget: {result['budget']}")
