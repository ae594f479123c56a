"""``crowdsft plugins ...``: what strategies are installed."""

from __future__ import annotations

import click

from crowdsft.console import echo_json


@click.group()
def plugins() -> None:
    """Inspect plugins and the strategies they register."""


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the strategies as JSON.")
def list_(as_json: bool) -> None:
    """Every registered strategy by kind, with the plugin, package and version it came
    from; then any plugin that failed to load or conflicts with another, and warnings."""
    from crowdsft.plugins.manager import KINDS, get_plugins

    plugins = get_plugins()
    registry = plugins.registry()

    def package(plugin: str) -> str:
        info = plugins.info(plugin)
        return f"{info.package} {info.version}" if info else "registered in code"

    if as_json:
        echo_json(
            {
                kind: [
                    {
                        "name": s.name,
                        "plugin": s.plugin,
                        "package": package(s.plugin),
                        "summary": s.summary,
                    }
                    for s in sorted(registry[kind].values(), key=lambda s: s.name)
                ]
                for kind in KINDS
            }
            | {
                "problems": [
                    {
                        "kind": p.kind,
                        "plugin": p.plugin,
                        "package": p.package,
                        "where": p.where,
                        "message": p.message,
                    }
                    for p in plugins.problems
                ]
            }
        )
        return
    for kind in KINDS:
        click.echo(f"{kind}:")
        for s in sorted(registry[kind].values(), key=lambda s: s.name):
            click.echo(f"  {s.name:16} {s.plugin:28} {package(s.plugin):22} {s.summary}")
    problems = plugins.problems
    if problems:
        click.echo(f"problems ({len(problems)}):")
        for p in problems:
            click.echo(f"  {p.line()}")


@click.command()
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option(
    "--embedder",
    "name",
    default="minilm",
    show_default=True,
    help="A registered embedder (crowdsft plugins list).",
)
@click.option(
    "--out",
    type=click.File("w", encoding="utf-8", atomic=True),
    default="-",
    help="Where to write the lines (default: standard output).",
)
@click.option("--batch", default=256, show_default=True, type=click.IntRange(1))
def embed(file, name: str, out, batch: int) -> None:
    """Add a `vector` field to every line of a JSONL FILE (`-` for standard input) that has a
    `text` field, computed by the embedder NAME: for inspecting targets and answers in the
    space that rounds compare them in."""
    import json

    from crowdsft.errors import ConfigError
    from crowdsft.plugins.manager import get_plugins

    rows = []
    for n, line in enumerate(file, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file.name}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ConfigError(f"{file.name}:{n}: needs a string field 'text'")
        rows.append(row)
    embedder = get_plugins().create("embedder", name)
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        vectors = embedder.embed([r["text"] for r in chunk])
        for row, vec in zip(chunk, vectors, strict=True):
            row["vector"] = [round(float(x), 6) for x in vec]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
