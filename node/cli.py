"""``crowdsft node ...``: the contributor's commands."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from crowdsft.console import echo_json, progress_bar
from crowdsft.errors import InputError, KeyFileError
from crowdsft.keys import DEFAULT_PASSPHRASE_ENV


def _key_option(f):
    from crowdsft.node.state import default_key_path

    f = click.option(
        "--passphrase-env",
        default=DEFAULT_PASSPHRASE_ENV,
        show_default=True,
        metavar="NAME",
        help="Environment variable holding the key's passphrase (if the key is encrypted).",
    )(f)
    return click.option(
        "--key",
        "key_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=default_key_path,
        show_default="$CROWDSFT_HOME/node.key",
        help="The node's private key (PKCS8 PEM).",
    )(f)


def _remember(ctx: click.Context, param: click.Parameter, value):
    ctx.meta[f"crowdsft.{param.name}"] = value
    return value


def _coordinator_option(f):
    """--coordinator plus the TLS options every command that connects shares (they go to
    ``ctx.meta``; ``_client`` reads them)."""
    path = click.Path(exists=True, dir_okay=False, path_type=Path)
    options: list[tuple[str, dict[str, Any]]] = [
        (
            "--tls",
            dict(
                is_flag=True,
                envvar="CROWDSFT_TLS",
                help="Connect over TLS, trusting the system's CA roots (implied by --tls-ca).",
            ),
        ),
        (
            "--tls-ca",
            dict(
                type=path,
                envvar="CROWDSFT_TLS_CA",
                help="Connect over TLS, trusting this certificate (PEM): the coordinator's "
                "self-signed certificate, or the CA that issued it.",
            ),
        ),
        (
            "--tls-cert",
            dict(
                type=path,
                envvar="CROWDSFT_TLS_CERT",
                help="Client certificate (PEM), for coordinators that ask for mutual TLS.",
            ),
        ),
        (
            "--tls-key",
            dict(type=path, envvar="CROWDSFT_TLS_KEY", help="The client certificate's key."),
        ),
        (
            "--tls-server-name",
            dict(
                metavar="NAME",
                help="Name to check in the coordinator's certificate, when it differs "
                "from the host in --coordinator.",
            ),
        ),
    ]
    for name, kw in reversed(options):
        f = click.option(name, expose_value=False, callback=_remember, **kw)(f)
    return click.option(
        "--coordinator",
        "address",
        required=True,
        metavar="HOST:PORT",
        envvar="CROWDSFT_COORDINATOR",
        show_envvar=True,
        help="Address of the coordinator.",
    )(f)


def _client(address: str, **kw):
    """A client for ``address`` with the TLS settings of the current command line."""
    from crowdsft.node.client import CoordinatorClient, TLSClient

    meta = click.get_current_context().meta
    ca, cert, key = (meta.get(f"crowdsft.tls_{k}") for k in ("ca", "cert", "key"))
    server_name = meta.get("crowdsft.tls_server_name")
    tls = None
    if meta.get("crowdsft.tls") or ca or cert or key or server_name:
        tls = TLSClient.from_files(ca, cert, key, server_name)
    return CoordinatorClient(address, tls=tls, **kw)


def _load(key_path: Path, passphrase_env: str):
    from crowdsft.keys import load_private_key, passphrase_from_env

    return load_private_key(key_path, passphrase_from_env(passphrase_env))


@click.group()
def node() -> None:
    """Contributor commands: keys, submitting examples, status."""


@node.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the key [default: $CROWDSFT_HOME/node.key].",
)
@click.option(
    "--encrypt",
    is_flag=True,
    help="Encrypt the key with the passphrase in the --passphrase-env variable.",
)
@click.option("--passphrase-env", default=DEFAULT_PASSPHRASE_ENV, show_default=True, metavar="NAME")
@click.option("--force", is_flag=True, help="Replace an existing key file (its identity is lost).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def keygen(
    out: Path | None, encrypt: bool, passphrase_env: str, force: bool, as_json: bool
) -> None:
    """Create a node identity: an Ed25519 key (mode 0600), and print its node id.

    With --encrypt, or whenever the passphrase variable is set, the key is encrypted.
    """
    from crowdsft.keys import Identity, passphrase_from_env, write_private_key
    from crowdsft.node.state import default_key_path

    path = out or default_key_path()
    passphrase = passphrase_from_env(passphrase_env)
    if encrypt and not passphrase:
        raise KeyFileError(f"--encrypt needs a passphrase in ${passphrase_env}")
    identity = Identity.generate()
    write_private_key(identity, path, passphrase, overwrite=force)
    if as_json:
        echo_json(
            {
                "node_id": identity.node_id,
                "key": str(path),
                "encrypted": bool(passphrase),
                "public_key": identity.public_key.hex(),
            }
        )
        return
    click.echo(f"node id:    {identity.node_id}")
    click.echo(f"public key: {identity.public_key.hex()}")
    click.echo(f"key file:   {path} ({'encrypted' if passphrase else 'not encrypted'}, mode 0600)")


@node.command()
@_coordinator_option
@_key_option
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "parquet", "datasets"]),
    help="The file's format [default: by its extension: .csv/.tsv, .parquet, a folder saved "
    "with Hugging Face datasets' save_to_disk; JSONL otherwise].",
)
@click.option(
    "--examples-per-contribution",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Examples signed together as one contribution.",
)
@click.option("--license", "license_", default="", help="Licence you grant for these examples.")
@click.option("--consent", is_flag=True, help="Consent to the use of these examples for training.")
@click.option(
    "--trust-new-coordinator-key",
    is_flag=True,
    help="Accept a coordinator key different from the one pinned for this address.",
)
@click.option("--no-progress", is_flag=True, help="Do not show a progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def submit(
    address: str,
    key_path: Path,
    passphrase_env: str,
    file: Path,
    fmt: str | None,
    examples_per_contribution: int,
    license_: str,
    consent: bool,
    trust_new_coordinator_key: bool,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Sign and submit the examples in FILE to the coordinator.

    FILE is JSONL (each line {"prompt": ..., "response": ...}, optional "system" and
    "history", or {"messages": [...]} in chat format, a whole conversation allowed: training
    learns its last answer), CSV or Parquet with those columns, or a folder saved with
    Hugging Face datasets. Every line or row is checked before anything is sent.
    Submitting the same file again sends nothing new; an interrupted upload resumes where it
    stopped.
    """
    from crowdsft.datafiles import read_records
    from crowdsft.node.state import NodeState
    from crowdsft.node.submit import Metadata, upload

    identity = _load(key_path, passphrase_env)
    records = read_records(file, format=fmt)
    chunks = -(-len(records) // examples_per_contribution)
    with (
        _client(address) as client,
        NodeState.for_node(identity.node_id) as state,
        progress_bar(
            chunks, f"submitting {file.name}", enabled=not (no_progress or as_json)
        ) as bar,
    ):
        report = upload(
            client,
            identity,
            state,
            records,
            source_name=file.name,
            examples_per_contribution=examples_per_contribution,
            metadata=Metadata(license=license_, consent=consent),
            trust_new_key=trust_new_coordinator_key,
            progress=bar,
        )
    if as_json:
        echo_json(report.as_dict())
    else:
        click.echo(
            f"{report.accepted} accepted, {report.already_submitted} already submitted, "
            f"{report.acknowledged_again} acknowledged again, {len(report.failures)} failed "
            f"({report.contributions} contributions, {report.examples} examples; "
            f"node {identity.node_id})"
        )
        for f in report.failures:
            click.secho(f"  {f.source}: {f.status}: {f.message}", err=True, fg="red")
    if report.failures:
        raise InputError(f"{len(report.failures)} contribution(s) were rejected")


@node.command()
@_coordinator_option
@_key_option
@click.option("--name", default="", help="A display name the operator sees.")
@click.option(
    "--invite",
    default="",
    metavar="TOKEN",
    envvar="CROWDSFT_INVITE",
    help="Invite token from the operator (for coordinators admitting by invitation).",
)
def register(address: str, key_path: Path, passphrase_env: str, name: str, invite: str) -> None:
    """Register this node with the coordinator.

    Submitting registers a node too, except where the coordinator admits by invitation:
    register once with --invite first.
    """

    identity = _load(key_path, passphrase_env)
    with _client(address) as client:
        resp = client.register(identity, name, invite.strip())
    if resp.newly_registered:
        state = "registered"
    elif name.strip():  # the coordinator sets the name of a node it knows (RegisterNode)
        state = f"already registered; its display name is now {name.strip()!r}"
    else:
        state = "already registered"
    click.echo(f"node {resp.node_id} {state} at {address}")


@node.command()
@_coordinator_option
@_key_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(address: str, key_path: Path, passphrase_env: str, as_json: bool) -> None:
    """This node's standing at the coordinator: contributions, examples, points."""
    from crowdsft.node.state import NodeState
    from crowdsft.node.watch import participation_dicts

    identity = _load(key_path, passphrase_env)
    with _client(address) as client:
        st = client.status(identity)
        info = client.info()
    with NodeState.for_node(identity.node_id) as state:
        local = len(state.receipts(info.public_key))
    data = {
        "node_id": st.node_id,
        "registered": st.registered,
        "contributions": st.contributions,
        "examples": st.examples,
        "points": st.points,
        "receipts_held": local,
        "registered_at": (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.registered_at_ms / 1000))
            if st.registered
            else None
        ),
    }
    data["rounds"] = participation_dicts(st)
    if as_json:
        echo_json(data)
        return
    for k, v in data.items():
        if k != "rounds":
            click.echo(f"{k + ':':16}{v}")
    for r in data["rounds"]:
        rank = (
            "no update" if r["rank"] is None else ("won" if r["rank"] == 0 else f"rank {r['rank']}")
        )
        click.echo(
            f"  round {r['round_id']}: group {r['group']}, {rank}, points "
            f"{r['points_before']:g} -> {r['points_after']:g}"
        )


@node.command()
@_coordinator_option
@click.option(
    "--after",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Only rounds after this round id.",
)
@click.option(
    "--count",
    default=0,
    type=click.IntRange(0),
    help="Stop after this many events (0: until interrupted).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
def watch(address: str, after: int, count: int, as_json: bool) -> None:
    """Follow the coordinator's fine-tuning rounds live."""
    from crowdsft.console import note
    from crowdsft.node.watch import follow_rounds

    seen = 0
    with _client(address) as client:
        for ev in follow_rounds(client, after, on_status=note):
            _show_event(ev, as_json)
            seen += 1
            if count and seen >= count:
                return


def _show_event(ev, as_json: bool) -> None:
    import json as jsonlib

    from crowdsft.node.watch import event_dict

    info = event_dict(ev)
    if as_json:
        click.echo(jsonlib.dumps(info))
    elif ev.kind == "planned":
        click.echo(
            f"round {ev.round_id}: {ev.contributors} contributors in {ev.groups} groups, training"
        )
    else:
        if ev.evaluation in ("l2", "l1"):  # negated distances: shown as distances
            shown = ", ".join(f"{-x:.4f}" for x in ev.scores)
            scores = f"distances [{shown}] (lower is better; the base {-ev.base_score:.4f})"
        else:
            shown = ", ".join(f"{x:.4f}" for x in ev.scores)
            scores = f"scores [{shown}] (higher is better; the base {ev.base_score:.4f})"
        if not ev.updated:
            result = "no candidate beat the current model"
        elif ev.winner == ev.groups:  # the index after the groups': the consolidated one
            result = "the consolidated candidate (everyone's data) won"
        else:
            result = f"group {ev.winner} won"
        click.echo(f"round {ev.round_id}: finished, {scores}, {result}")


@node.command()
@_coordinator_option
@_key_option
@click.option(
    "--trust-new-coordinator-key",
    is_flag=True,
    help="Accept a coordinator key different from the one pinned for this address.",
)
@click.option(
    "--peer",
    "peers",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A ledger head another node wrote with `crowdsft node head` (or a published one): "
    "a different record at the same round is a fork. Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def verify(
    address: str,
    key_path: Path,
    passphrase_env: str,
    trust_new_coordinator_key: bool,
    peers: tuple[Path, ...],
    as_json: bool,
) -> None:
    """Check the coordinator's ledger against this node's receipts and memory.

    Checks every record's signature and hash link, recomputes every points entry with the
    reward rule the record names, proves each receipted contribution's inclusion in the rounds
    that used it, and compares the points the coordinator reports. Then compares the ledger
    with the last head this node verified (a shorter ledger is a rollback, another record at
    that round a fork) and with other nodes' heads (--peer); the coordinator's signed records
    that prove a rollback or fork are kept (`crowdsft node evidence`). Exits 1 on any mismatch,
    4 when nothing mismatched but something could not be checked here (a reward rule from a
    plugin that is not installed: the message names the package).
    """
    from crowdsft.envelope import now_ms
    from crowdsft.errors import UncheckedError, VerificationError
    from crowdsft.node.state import NodeState
    from crowdsft.node.verify import held_receipts, verify_node

    heads = [_read_head(p) for p in peers]
    identity = _load(key_path, passphrase_env)
    with _client(address) as client, NodeState.for_node(identity.node_id) as state:
        key = client.info().public_key
        state.pin(address, key, now_ms(), trust_new_coordinator_key)
        result = verify_node(
            client, identity, key, held_receipts(state, key), state, heads, now_ms()
        )
    if as_json:
        echo_json(result.as_dict())
    else:
        click.echo(
            f"ledger: {result.ledger.rounds} round record(s) from coordinator "
            f"{key.hex()[:16]}…, head {result.ledger.head[:16]}… (nodes that see the same "
            "head see the same history)"
        )
        click.echo(
            f"contributions: {result.receipts} receipted, {result.included} used in rounds "
            f"({result.proofs} inclusion proofs checked), "
            f"{result.receipts - result.included - result.flagged} not used yet"
            + (
                f", {result.flagged} flagged as near-duplicates of earlier data"
                if result.flagged
                else ""
            )
        )
        click.echo(
            f"points: {result.points_recomputed:.6g} by the ledger, "
            f"{result.points_reported:.6g} reported by the coordinator"
        )
        remembered = (
            f"it extends round {result.remembered_round}, the head this node verified before"
            if result.remembered_round is not None
            else "first verification: its head is remembered from now on"
        )
        tree = (
            f"; signed tree head over {result.tree_size} record(s) consistent with the last"
            if result.tree_size is not None
            else ""
        )
        click.echo(
            f"history: {remembered}{tree}"
            + (f"; {result.peers_checked} peer head(s) compared" if peers else "")
        )
        if result.evidence_kept:
            click.secho(
                f"  the coordinator's signed records proving it are kept: "
                f"crowdsft node evidence --coordinator {address}",
                fg="red",
                err=True,
            )
        for p in result.mismatches:
            click.secho(f"  MISMATCH {p}", fg="red", err=True)
        for p in result.unchecked:
            click.secho(f"  CANNOT CHECK {p}", fg="yellow", err=True)
        if result.ok:
            click.secho("verified: everything checks out", fg="green")
    if result.mismatches:
        raise VerificationError(f"{len(result.mismatches)} mismatch(es) found")
    if result.unchecked:
        raise UncheckedError(
            f"no mismatch, but {len(result.unchecked)} round(s) could not be checked here "
            "(see above for what to install)"
        )


def _read_head(path: Path):
    from crowdsft.errors import InputError
    from crowdsft.ledger import SignedHead

    try:
        return SignedHead.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: {exc}") from None


@node.command()
@_coordinator_option
@_key_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the head here (else print it).",
)
def head(address: str, key_path: Path, passphrase_env: str, out: Path | None) -> None:
    """The last ledger head this node verified, to share with other nodes.

    A head is the coordinator's signed record of a round; since each record names the hash of
    the one before, it commits the coordinator to the whole history up to there. Another node
    passes the file to `crowdsft node verify --peer FILE`: if the coordinator shows it a
    different record for that round, each of you holds half the proof. Run `node verify`
    first: only a verified head is remembered.
    """
    from crowdsft.errors import InputError
    from crowdsft.node.state import NodeState

    identity = _load(key_path, passphrase_env)
    with NodeState.for_node(identity.node_id) as state:
        key = state.pinned_key(address)
        found = state.ledger_head(key) if key is not None else None
    if found is None:
        raise InputError(
            f"this node has verified no ledger of the coordinator at {address} yet: run "
            f"crowdsft node verify --coordinator {address}"
        )
    text = json.dumps(found.as_dict(), indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"wrote the head of round {found.round_id} to {out}")


@node.command()
@_coordinator_option
@_key_option
def evidence(address: str, key_path: Path, passphrase_env: str) -> None:
    """The proof kept against the coordinator at this address, as JSON: signed records of a
    round it no longer shows (rollback) or two signed records of one round (fork). Anyone can
    check both signatures with the coordinator's public key."""
    from crowdsft.node.state import NodeState

    identity = _load(key_path, passphrase_env)
    with NodeState.for_node(identity.node_id) as state:
        key = state.pinned_key(address)
        found = state.evidence(key) if key is not None else []
    echo_json(
        {"coordinator": address, "coordinator_key": key.hex() if key else None, "evidence": found}
    )
