"""``crowdsft coordinator ...``: the operator's commands."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import click

from crowdsft.console import echo_json
from crowdsft.errors import ConfigError

logger = logging.getLogger(__name__)


def _config_option(f):
    return click.option(
        "--config",
        "config_path",
        required=True,
        envvar="CROWDSFT_CONFIG",
        show_envvar=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="The coordinator.toml to use.",
    )(f)


@click.group()
def coordinator() -> None:
    """Operator commands: set up, serve, inspect."""


@coordinator.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--listen", default=None, metavar="HOST:PORT", help="Address to write into the config."
)
@click.option(
    "--force", is_flag=True, help="Overwrite an existing config (an existing key is kept)."
)
def init(directory: Path, listen: str | None, force: bool) -> None:
    """Create DIRECTORY with a coordinator key, a commented coordinator.toml and a data folder."""
    from crowdsft.config import load_coordinator_config, parse_hostport
    from crowdsft.coordinator.server import load_identity
    from crowdsft.coordinator.setup import init_coordinator

    if listen:
        parse_hostport(listen)
    config_path = init_coordinator(directory, listen=listen, force=force)
    config = load_coordinator_config(config_path)
    identity = load_identity(config)
    click.echo(f"config:          {config_path}")
    click.echo(f"key:             {config.key_path} (mode 0600)")
    click.echo(f"data:            {config.data_dir}")
    click.echo(f"coordinator key: {identity.public_key.hex()}")
    click.echo(f"next:            crowdsft coordinator serve --config {config_path}")


@coordinator.command()
@_config_option
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    help="Address to serve on (overrides server.listen in the config).",
)
def serve(config_path: Path, listen: str | None) -> None:
    """Serve nodes until interrupted (SIGINT or SIGTERM shut down cleanly)."""
    from crowdsft.config import load_coordinator_config, parse_hostport
    from crowdsft.coordinator.server import Coordinator

    config = load_coordinator_config(config_path)
    if listen:
        parse_hostport(listen)
        config = config.with_listen(listen)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    coord = Coordinator(config).start()
    auto = _auto_rounds(config, coord)
    click.echo(f"serving on {coord.address}; press Ctrl-C to stop", err=True)
    try:
        coord.wait(stop)
    finally:
        auto.close()
        coord.stop()


def _auto_rounds(config, coord):
    """Automatic rounds in the serving process, when the config asks for them."""
    from crowdsft.coordinator.autoround import AutoRounds

    state: dict = {}

    def run_round():
        from crowdsft.coordinator.llm_space import build_llm_space
        from crowdsft.coordinator.rounds import RoundRunner

        if "runner" not in state:
            state["runner"] = RoundRunner(config, coord.store, build_llm_space(config))
        summary = state["runner"].run()
        logger.info("automatic round %d done", summary.round_id)

    auto = AutoRounds(config, coord.store, run_round).start()
    if auto.enabled:
        r = config.rounds
        logger.info(
            "automatic rounds: after %s new contributions, every %ss",
            r.auto_after_contributions or "-",
            r.auto_interval_s or "-",
        )
    return auto


@coordinator.command()
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def stats(config_path: Path, as_json: bool) -> None:
    """Nodes, contributions, and examples per node (reads the store; the server may be running)."""
    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.service import stats as compute
    from crowdsft.coordinator.store import connect

    config = load_coordinator_config(config_path)
    if not config.db_path.exists():
        raise ConfigError(f"no store at {config.db_path}; has this coordinator served yet?")
    conn = connect(config.db_path, readonly=True)
    try:
        data = compute(conn)
    finally:
        conn.close()
    if as_json:
        echo_json(data)
        return
    click.echo(
        f"nodes: {data['nodes']}   contributions: {data['contributions']}   "
        f"examples: {data['examples']}"
    )
    if data["per_node"]:
        click.echo(
            f"{'node id':34}{'name':18}{'contributions':>14}{'examples':>10}{'points':>9}"
            "  registered"
        )
        for n in data["per_node"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(n["registered_at_ms"] / 1000))
            click.echo(
                f"{n['node_id']:34}{n['display_name'][:17]:18}{n['contributions']:>14}"
                f"{n['examples']:>10}{n['points']:>9g}  {when}"
            )


@coordinator.command("round")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print the round's result as JSON.")
def round_(config_path: Path, as_json: bool) -> None:
    """Run one fine-tuning round now (or finish an interrupted one).

    Groups the contributors with unconsumed data, fine-tunes one LoRA candidate per group
    from the current model, scores each against the target, selects the winner, awards
    points, and records everything in the store.
    """
    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.llm_space import build_llm_space
    from crowdsft.coordinator.rounds import RoundRunner
    from crowdsft.coordinator.store import Store

    config = load_coordinator_config(config_path)

    def event(kind: str, info: dict) -> None:
        if not as_json and kind in (
            "round_planned",
            "candidate_training",
            "candidate_scored",
            "round_resumed",
        ):
            detail = ", ".join(f"{k}={v}" for k, v in info.items() if k != "groups")
            click.echo(f"  {kind.replace('_', ' ')}: {detail}", err=True)

    space = build_llm_space(config, on_event=event)
    with Store(config.db_path, max_batch=config.storage.max_batch) as store:
        summary = RoundRunner(config, store, space, on_event=event).run()
    if as_json:
        echo_json(summary.as_dict())
        return
    click.echo(f"round {summary.round_id}: base score {summary.base_score:.4f}")
    for g, members in enumerate(summary.groups):
        mark = " <- winner" if g == summary.winner else ""
        click.echo(f"  group {g}: {len(members)} contributors, score {summary.scores[g]:.4f}{mark}")
    if not summary.updated:
        click.echo("  no candidate beat the current model; nothing changed")


def export_model(config, out: Path) -> dict:
    """Merge the current lineage into the base model and save it where
    ``AutoModelForCausalLM.from_pretrained(out)`` loads it. Returns what was written."""
    from crowdsft.coordinator import llm
    from crowdsft.coordinator.store import Store

    with Store(config.db_path) as store:
        lineage = [r[0] for r in store.query("SELECT adapter FROM lineage ORDER BY position")]
    device, dtype = llm.device_and_dtype("cpu")
    model, tokenizer = llm.load_base_model(config.model.base, device, dtype)
    for digest in lineage:
        model = llm.merge_adapter(
            model, llm.load_adapter(config.adapter_dir, digest), config.training
        )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"out": str(out), "base": config.model.base, "lineage": lineage}


@coordinator.command()
@_config_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the merged model.",
)
def export(config_path: Path, out: Path) -> None:
    """Write the current best model, merged, as a Hugging Face model folder."""
    from crowdsft.config import load_coordinator_config

    info = export_model(load_coordinator_config(config_path), out)
    click.echo(
        f"wrote {info['out']}: {info['base']} with {len(info['lineage'])} winning "
        "adapter(s) merged in"
    )
    click.echo(f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")


@coordinator.command()
@_config_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for index.html, report.json and the PNG plots.",
)
def report(config_path: Path, out: Path) -> None:
    """Write an HTML report of the rounds, points and Shapley values, with report.json."""
    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.report import build_report
    from crowdsft.coordinator.store import Store
    from crowdsft.node.records import read_records
    from crowdsft.plugins.manager import get_plugins

    config = load_coordinator_config(config_path)
    if config.target_path is None:
        raise ConfigError("the report needs evaluation.target_file in the config")
    targets = [r.response for r in read_records(config.target_path)]
    embedder = get_plugins().create("embedder", config.evaluation.embedder)
    with Store(config.db_path) as store:
        data = build_report(config, store, out, embedder, targets)
    r = data["pearson_points_shapley"]
    click.echo(
        f"{len(data['rounds'])} rounds, {len(data['contributors'])} contributors, "
        f"Pearson(points, Shapley) {'n/a' if r is None else f'{r:.3f}'}"
    )
    click.echo(f"wrote {data['report_path']} and {out / 'report.json'}")
