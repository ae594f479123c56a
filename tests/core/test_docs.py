"""The README and docs/ stay true: every relative link and anchor resolves, every
`crowdsft ...` command they show names a real command with real options, and every
`python script.py --flag` names a script that exists and takes that flag. (The commands'
behaviour is tested where each command is; this catches a page left behind by a rename.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from crowdsft.cli import main

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    # a target cut by a line break renders as text, and the check below would not see it
    cut = re.findall(r"\]\(([^)\s]*)\n", text)
    assert not cut, f"{page.name}: link targets broken across lines: {cut}"
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no heading with that anchor in {where.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def _command_lines(page: Path) -> list[str]:
    """Every shell line of a fenced block (continuations joined) and every inline code span
    that runs crowdsft or a Python script."""
    text = page.read_text(encoding="utf-8")
    out = []
    for lang, body in FENCE.findall(text):
        if lang not in ("", "bash", "sh", "console"):
            continue
        out += body.replace("\\\n", " ").splitlines()
    out += INLINE.findall(FENCE.sub("", text))
    return out


def _segments(line: str) -> list[list[str]]:
    """The commands of a shell line, as tokens (comments dropped, split at && | ;)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    segments, current = [], []
    for tok in tokens:
        if tok in ("&&", "||", "|", ";"):
            segments.append(current)
            current = []
        else:
            current.append(tok)
    segments.append(current)
    return [s for s in segments if s]


def _crowdsft_calls(page: Path) -> list[list[str]]:
    calls = []
    for line in _command_lines(page):
        for seg in _segments(line):
            exe = seg[0].rsplit("/", 1)[-1]
            if exe == "crowdsft" and len(seg) > 1:
                calls.append(seg[1:])
    return calls


def _options(cmd: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for p in cmd.params:
        if isinstance(p, click.Option):
            names |= set(p.opts) | set(p.secondary_opts)
    return names


def check_call(args: list[str]) -> str | None:
    """None where ``crowdsft ARGS`` names real commands and options; else what is wrong."""
    cmd: click.Command = main
    path = ["crowdsft"]
    rest = [a.strip("[]") for a in args]
    while rest:
        tok = rest.pop(0)
        if not tok or tok in ("...", "…"):
            continue
        if tok.startswith("-") and len(tok) > 1:
            name = tok.split("=", 1)[0]
            if re.fullmatch(r"-[a-zA-Z]{2,}", name):  # -vv: short flags together
                name = next((f"-{c}" for c in name[1:] if f"-{c}" not in _options(cmd)), "-h")
            if name not in _options(cmd):
                return f"{' '.join(path)} has no option {name}"
            continue
        if isinstance(cmd, click.Group) and not any(
            isinstance(p, click.Argument) for p in cmd.params
        ):
            sub = cmd.commands.get(tok) if hasattr(cmd, "commands") else None
            if sub is None:
                ctx = click.Context(cmd)
                sub = cmd.get_command(ctx, tok)
            if sub is None:
                return f"{' '.join(path)} has no command {tok!r}"
            cmd, path = sub, [*path, tok]
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_crowdsft_command_shown_exists_with_its_options(page):
    wrong = sorted({problem for call in _crowdsft_calls(page) if (problem := check_call(call))})
    assert not wrong, f"{page.name}: " + "; ".join(wrong)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_script_shown_exists_and_takes_its_flags(page):
    wrong = set()
    for line in _command_lines(page):
        for seg in _segments(line):
            exe = seg[0].rsplit("/", 1)[-1]
            if not exe.startswith("python") or len(seg) < 2 or not seg[1].endswith(".py"):
                continue
            script = ROOT / seg[1]
            if not script.is_file():
                wrong.add(f"{seg[1]}: no such script")
                continue
            source = script.read_text(encoding="utf-8")
            for tok in seg[2:]:
                flag = tok.strip("[]").split("=", 1)[0]
                if flag.startswith("--") and f'"{flag}"' not in source:
                    wrong.add(f"{seg[1]} takes no {flag}")
    assert not wrong, f"{page.name}: " + "; ".join(sorted(wrong))


def test_the_checker_catches_a_stale_command():
    assert check_call(["node", "submit", "--coordinator", "HOST:PORT", "x.jsonl"]) is None
    assert check_call(["-q", "demo", "--json"]) is None
    assert "no option --cordinator" in check_call(["node", "submit", "--cordinator", "x"])
    assert "no command 'sumbit'" in check_call(["node", "sumbit"])
    assert slug("The paper's LLM experiment, on its own data, held out") == (
        "the-papers-llm-experiment-on-its-own-data-held-out"
    )
