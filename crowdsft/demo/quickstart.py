"""``crowdsft quickstart``: a coordinator on loopback, a fresh node key, a bundled example file
submitted over gRPC, and the signed receipts printed. Everything lives in a temporary folder
unless ``--workdir`` names one."""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path

import click

from crowdsft.console import echo_json


def example_file() -> Path:
    return Path(str(resources.files("crowdsft") / "data" / "examples.jsonl"))


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the coordinator folder and node key here instead of a temporary folder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the receipts and stats as JSON.")
def quickstart(workdir: Path | None, as_json: bool) -> None:
    """Start a coordinator on loopback and submit a bundled example file from a new node key."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="crowdsft-quickstart-") as tmp:
            run_quickstart(Path(tmp), as_json)
    else:
        run_quickstart(workdir, as_json)


def run_quickstart(workdir: Path, as_json: bool) -> dict:
    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.server.app import Coordinator
    from crowdsft.coordinator.server.scaffold import init_coordinator
    from crowdsft.coordinator.store.queries import stats
    from crowdsft.datafiles import read_records
    from crowdsft.keys import Identity, write_private_key
    from crowdsft.node.client import CoordinatorClient
    from crowdsft.node.state import NodeState
    from crowdsft.node.submit import upload

    say = (lambda *a, **k: None) if as_json else click.echo
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = init_coordinator(workdir / "coordinator", listen="127.0.0.1:0", force=True)
    config = load_coordinator_config(config_path)
    identity = Identity.generate()
    key_path = workdir / "node.key"
    write_private_key(identity, key_path, overwrite=True)
    examples = example_file()
    records = read_records(examples)
    say(f"1. coordinator initialised in {config_path.parent}")
    with Coordinator(config) as coord:
        say(
            f"2. coordinator serving on {coord.address} "
            f"(key {coord.identity.public_key.hex()[:16]}...)"
        )
        say(f"3. new node key {key_path}, node id {identity.node_id}")
        say(f"4. submitting {len(records)} examples from {examples.name} over gRPC")
        with (
            CoordinatorClient(coord.address) as client,
            NodeState(workdir / "node-state.sqlite3") as st,
        ):
            report = upload(client, identity, st, records, source_name=examples.name)
            again = upload(client, identity, st, records, source_name=examples.name)
            status = client.status(identity)
        summary = stats(coord.store.reader())
    say("5. receipts (each signed by the coordinator and verified by the node):")
    for r in report.receipts:
        say(
            f"   {r['source']:18} contribution {r['contribution_id'][:16]}...  "
            f"accepted_at_ms={r['accepted_at_ms']}  examples={r['examples']}  signature: verified"
        )
    say(
        f"6. submitting the same file again: {again.accepted} new, "
        f"{again.already_submitted} already submitted (idempotent)"
    )
    say(
        f"7. node status: {status.contributions} contributions, {status.examples} examples, "
        f"{status.points:g} points (points come with fine-tuning rounds)"
    )
    say(
        f"   coordinator stats: {summary['nodes']} node(s), {summary['contributions']} "
        f"contributions, {summary['examples']} examples"
    )
    result = {
        "coordinator_dir": str(config_path.parent),
        "node_id": identity.node_id,
        "receipts": report.receipts,
        "resubmitted_new": again.accepted,
        "stats": {k: summary[k] for k in ("nodes", "contributions", "examples")},
    }
    if as_json:
        echo_json(result)
    return result
