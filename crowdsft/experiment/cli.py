"""``crowdsft experiment paper-llm`` and ``crowdsft experiment fit-goemotions``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from crowdsft.console import echo_json
from crowdsft.experiment.paper_llm import PaperSettings

DATA_HELP = "The paper-llm data folder (shared/data/paper-llm)."


data_option = click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help=DATA_HELP,
)
DEFAULTS = PaperSettings()  # one source for the options' defaults


@click.command("paper-llm")
@data_option
@click.option(
    "--targets",
    default=None,
    help="Comma-separated emotions, or N for N spread over the 28 (default: all 28).",
)
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1))
@click.option(
    "--first-seed",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Seeds run are first-seed .. first-seed + seeds - 1 (to split seeds across machines "
    "or processes, each with its own --out).",
)
@click.option(
    "--answers",
    default=None,
    type=click.IntRange(2),
    help="Answers per model in each set (selection, reported). [default: 50; 4 with --quick]",
)
@click.option(
    "--max-new-tokens",
    default=None,
    type=click.IntRange(1),
    help="Longest answer, in tokens. [default: 20; 8 with --quick]",
)
@click.option(
    "--schedule",
    default=DEFAULTS.schedule,
    show_default=True,
    type=click.Choice(["ours", "paper"]),
    help="ours: --epochs per fine-tune, every remaining comment in a segment. paper: the "
    "paper's schedule: each fine-tune's epochs by the hosted API's rule (3, or min(25, "
    "100 // n) for n < 34 comments; --epochs is ignored) and segments of len(remaining) // 3 "
    "comments (33, 22, 15), the rest kept for later generations.",
)
@click.option(
    "--epochs",
    default=DEFAULTS.epochs,
    show_default=True,
    type=click.IntRange(1),
    help="Epochs per fine-tune under --schedule ours.",
)
@click.option(
    "--batch-size", default=DEFAULTS.batch_size, show_default=True, type=click.IntRange(1)
)
@click.option(
    "--learning-rate",
    default=DEFAULTS.learning_rate,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
)
@click.option(
    "--layers",
    default=DEFAULTS.layers or 0,
    show_default=True,
    type=click.IntRange(0),
    help="LoRA on the last N transformer layers only (the backward pass stops there: much "
    "cheaper on a CPU); 0: every layer.",
)
@click.option("--embedder", default="goemotions", show_default=True)
@click.option("--model", "model_spec", default="smollm2", show_default=True)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16"]),
    help="The language model's precision. auto: bfloat16 on a GPU and on a CPU with native "
    "bf16 (AMX or AVX512-BF16: about twice as fast there), float32 elsewhere. Rows record it "
    "and --resume reuses only rows of the same precision.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="A tiny random model instead of SmolLM2, 3 targets unless --targets, short answers: "
    "checks the machinery in seconds, its distances mean nothing.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also append each target-seed's result to this JSONL file as it finishes.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="With --out: reuse the target-seeds already in that file from a run with the same "
    "settings, model, embedder and data (its rows' run_key); run only the rest.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def paper_llm(
    data: Path,
    targets: str | None,
    seeds: int,
    first_seed: int,
    answers: int | None,
    max_new_tokens: int | None,
    schedule: str,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    layers: int | None,
    embedder: str,
    model_spec: str,
    device: str,
    dtype: str,
    quick: bool,
    out: Path | None,
    resume: bool,
    as_json: bool,
) -> None:
    """The paper's LLM experiment on its own data: per target emotion, single models on the
    nearest 33/66/100 pool comments against a 3-generation tournament of 3 candidates, every
    reported distance on held-out answers (and the paper's same-sample way beside it)."""
    from crowdsft.experiment import data as paper_data
    from crowdsft.experiment.paper_llm import (
        device_and_precision,
        read_done,
        run,
        run_key,
        table,
    )

    def say(line: str) -> None:
        click.echo(line, err=True)

    if resume and out is None:
        raise click.UsageError("--resume needs --out (the file to resume from)")
    records = paper_data.load(data)
    chosen = paper_data.select_targets(records, targets if targets else (3 if quick else None))
    settings = PaperSettings(
        answers=answers or (4 if quick else DEFAULTS.answers),
        max_new_tokens=max_new_tokens or (8 if quick else DEFAULTS.max_new_tokens),
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        layers=layers or None,
        schedule=schedule,
    )

    done: dict = {}
    if resume and out is not None:
        precision = str(device_and_precision(device, dtype)[1]).removeprefix("torch.")
        key = run_key(settings, model_spec, embedder, records.digest(), quick, precision)
        done, skipped = read_done(out, key)
        say(
            f"resuming from {out}: {len(done)} target-seeds reusable"
            + (f", {skipped} rows from other settings passed over" if skipped else "")
        )

    def on_row(row: dict) -> None:
        if out is not None:
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    result = run(
        records,
        chosen,
        list(range(first_seed, first_seed + seeds)),
        settings,
        model_spec=model_spec,
        embedder_name=embedder,
        device=device,
        dtype=dtype,
        quick=quick,
        say=say,
        on_row=on_row,
        done=done,
    )
    if as_json:
        echo_json(result)
        return
    for line in table(result):
        click.echo(line)


@click.command("fit-goemotions")
@data_option
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the weights (the package ships plugins/data/goemotions.safetensors).",
)
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--limit", default=None, type=click.IntRange(1), help="Fit on N texts only (for a test)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the fidelity report as JSON.")
def fit_goemotions(
    data: Path, out: Path, epochs: int, seed: int, limit: int | None, as_json: bool
) -> None:
    """Refit the `goemotions` embedder (LoRA on all-MiniLM-L6-v2 and a 28-label head) on the
    paper's records, and report its fidelity on the answers held out of the fit."""
    from crowdsft.experiment import data as paper_data
    from crowdsft.experiment.fit import FitSettings
    from crowdsft.experiment.fit import fit_goemotions as fit

    def say(line: str) -> None:
        click.echo(line, err=True)

    report = fit(
        paper_data.load(data), out, FitSettings(epochs=epochs, seed=seed, limit=limit), say
    )
    if as_json:
        echo_json(report)
        return
    for line in fidelity_lines(report):
        click.echo(line)


def fidelity_lines(report: dict) -> list[str]:
    d = report["distances"]
    return [
        f"held-out answers: {report['held_out_answers']} (never seen by the fit)",
        f"mean L2 error per answer: {report['mean_l2_error']:.4f}",
        f"per-label Pearson: mean {report['per_label_pearson_mean']:.3f}, "
        f"lowest {report['per_label_pearson_min']:.3f}",
        *(
            f"per-emotion {arm} distance vs the classifier's ({v['targets']} emotions): "
            f"Pearson {v['pearson']:.3f}, mean absolute error {v['mae']:.4f}"
            for arm, v in d.items()
        ),
        f"weights: {report['weights']} ({report['seconds']:.0f}s)",
    ]


def _fractions(value: str) -> list[float]:
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of fractions") from None
    if not out or any(not 0.0 <= f < 1.0 for f in out) or len(set(out)) != len(out):
        raise click.BadParameter("bad fractions are distinct numbers in [0, 1), e.g. 0,0.3,0.5")
    return sorted(out)


@click.command("crowd")
@data_option
@click.option(
    "--targets",
    default=None,
    help="Comma-separated emotions, or N for N spread over the 28 (default: 8; 1 with --quick).",
)
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(1))
@click.option(
    "--first-seed",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Seeds run are first-seed .. first-seed + seeds - 1.",
)
@click.option(
    "--bad-fractions",
    default="0,0.3,0.5",
    show_default=True,
    help="Fractions of bad contributors in the crowd, comma-separated.",
)
@click.option("--rounds", default=None, type=click.IntRange(1), help="Rounds per crowd. [3]")
@click.option(
    "--answers",
    default=None,
    type=click.IntRange(2),
    help="Sampled answers per model in each set (selection, reported). [50; 4 with --quick]",
)
@click.option(
    "--learning-rate", default=None, type=click.FloatRange(0, min_open=True), help="[6e-3]"
)
@click.option(
    "--layers",
    default=None,
    type=click.IntRange(0),
    help="LoRA on the last N layers; 0: every layer. [8]",
)
@click.option("--batch-size", default=None, type=click.IntRange(1), help="[4]")
@click.option(
    "--consolidate-every",
    default=None,
    type=click.IntRange(0),
    help="rounds.consolidate_every for the tournament (default: the product's default).",
)
@click.option(
    "--reward",
    default=None,
    help="rounds.reward the rounds are decided with (default: the product's default). Every "
    "rule's AUC is reported either way, from the same rounds.",
)
@click.option(
    "--credit-targets",
    default=None,
    type=click.IntRange(0),
    help="In-run credit against this many target comments in every candidate's training, "
    "for the credit rule's points (0: none, no credit AUC). [10]",
)
@click.option("--model", "model_spec", default="smollm2", show_default=True)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@click.option(
    "--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16"])
)
@click.option(
    "--via-grpc",
    is_flag=True,
    help="Contributors are node processes that sign and submit over gRPC, and every node "
    "verifies the ledger at the end (slower; the figures are the same).",
)
@click.option(
    "--quick",
    is_flag=True,
    help="A tiny random model and a hashed-trigram embedder, one target, short answers: "
    "checks the machinery in seconds; its distances mean nothing.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also append each row (target, seed, fraction) to this JSONL file as it finishes.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="With --out: reuse the rows already in that file from a run with the same settings, "
    "model and data; run only the rest.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def crowd(
    data: Path,
    targets: str | None,
    seeds: int,
    first_seed: int,
    bad_fractions: str,
    rounds: int | None,
    answers: int | None,
    learning_rate: float | None,
    layers: int | None,
    batch_size: int | None,
    consolidate_every: int | None,
    reward: str | None,
    credit_targets: int | None,
    model_spec: str,
    device: str,
    dtype: str,
    via_grpc: bool,
    quick: bool,
    out: Path | None,
    resume: bool,
    as_json: bool,
) -> None:
    """A crowd with bad contributors on the paper's real text, through the product's round
    engine: per target emotion, honest contributors of 10 comments from its pool and bad ones
    from the farthest emotions' pools, at each bad fraction. Arms: the tournament (the
    product's defaults), single-all (one fine-tune on everything), single-clean (the honest
    data only: the oracle), the base model; every distance on answers no choice saw; and
    how well each reward rule's points separate honest from bad contributors (AUC)."""
    from crowdsft.experiment import crowd as experiment
    from crowdsft.experiment import data as paper_data
    from crowdsft.experiment.paper_llm import device_and_precision
    from crowdsft.plugins.manager import get_plugins

    def say(line: str) -> None:
        click.echo(line, err=True)

    if resume and out is None:
        raise click.UsageError("--resume needs --out (the file to resume from)")
    fractions = _fractions(bad_fractions)
    if reward is not None:
        get_plugins().get("reward", reward)  # an unknown rule is refused before any work
    records = paper_data.load(data)
    chosen = paper_data.select_targets(records, targets if targets else (1 if quick else 8))
    base = experiment.CrowdSettings()
    if quick:
        base = dataclasses.replace(
            base, answers=4, max_new_tokens=8, per_contributor=25, rounds=2, credit_targets=2
        )
    settings = experiment.settings_with(
        base,
        rounds=rounds,
        answers=answers,
        learning_rate=learning_rate,
        layers=None if layers is None else (layers or 0),
        batch_size=batch_size,
        consolidate_every=consolidate_every,
        reward=reward,
        credit_targets=credit_targets,
    )
    if layers == 0:
        settings = dataclasses.replace(settings, layers=None)
    done: dict = {}
    if resume and out is not None:
        precision = str(device_and_precision(device, dtype)[1]).removeprefix("torch.")
        key = experiment.run_key(settings, model_spec, records.digest(), precision, quick)
        done, skipped = experiment.read_done(out, key)
        say(
            f"resuming from {out}: {len(done)} rows reusable"
            + (f", {skipped} rows from other settings passed over" if skipped else "")
        )

    def on_row(row: dict) -> None:
        if out is not None:
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    result = experiment.run(
        records,
        chosen,
        list(range(first_seed, first_seed + seeds)),
        fractions,
        settings,
        model_spec=model_spec,
        device=device,
        dtype=dtype,
        quick=quick,
        say=say,
        on_row=on_row,
        done=done,
        via_grpc=via_grpc,
    )
    if as_json:
        echo_json(result)
        return
    for line in experiment.table(result):
        click.echo(line)
