"""Reading contributors' JSONL files into examples, with every problem reported by line number.

Two record shapes are accepted, one JSON object per line:

* ``{"prompt": "...", "response": "...", "system": "..."}`` (``system`` optional; a
  conversation's earlier turns may come as ``"history": [{"user": "...", "assistant": "..."}]``,
  oldest first);
* ``{"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
  {"role": "assistant", "content": "..."}, ...]}`` (chat format: one optional system message
  first, then user and assistant turns in alternation, starting with the user and ending with
  the assistant). The last assistant turn is the response that training teaches; the turns
  before the last user turn are its context.

Blank lines are skipped. Nothing is sent while any line is bad.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from crowdsft.errors import InputError
from crowdsft.validation import Limits, example_problems

MAX_REPORTED = 20


Turns = tuple[tuple[str, str], ...]  # a conversation's earlier (user, assistant) turns


@dataclass(frozen=True)
class Record:
    line: int
    prompt: str
    response: str
    system: str | None = None
    history: Turns = ()

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": self.prompt, "response": self.response}
        if self.system is not None:
            d["system"] = self.system
        if self.history:
            d["history"] = [{"user": u, "assistant": a} for u, a in self.history]
        return d


Parsed = tuple[str, str, str | None, Turns]  # prompt, response, system, history


@dataclass(frozen=True)
class NotJSON:
    """A table cell that should hold JSON (``messages``, ``history``) and does not."""

    error: str


def _listed(value: object, keys: tuple[str, str]) -> object:
    """A list of dicts as a table's nested column may store it: a dict of equal-length
    lists (Hugging Face ``Sequence`` features) becomes a list of dicts; anything else is
    returned as it is."""
    if isinstance(value, dict) and set(value) == set(keys):
        columns = [value[k] for k in keys]
        if all(isinstance(c, list) for c in columns) and len({len(c) for c in columns}) == 1:
            return [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)]
    return value


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def _from_messages(messages: object) -> Parsed:
    messages = _listed(messages, ("role", "content"))
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    system = None
    texts: list[str] = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
        role = m["role"]
        if role == "system":
            if i != 0:
                raise ValueError(f"messages[{i}] is a system message; only the first may be one")
            system = m["content"]
        elif role in ("user", "assistant"):
            expected = "user" if len(texts) % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(
                    f"messages[{i}] is {_a(role)} turn where {_a(expected)} turn belongs: "
                    "user and assistant turns alternate, starting with the user"
                )
            texts.append(m["content"])
        else:
            raise ValueError(
                f"messages[{i}] has unknown role {role!r} (roles: system, user, assistant)"
            )
    if not texts or len(texts) % 2:
        raise ValueError(
            "messages must end with an assistant turn (the response to learn)"
            if texts
            else "messages hold no user turn"
        )
    pairs = tuple(zip(texts[0::2], texts[1::2], strict=True))
    (prompt, response), history = pairs[-1], pairs[:-1]
    return prompt, response, system, history


def _from_history(value: object) -> Turns:
    value = _listed(value, ("user", "assistant"))
    if not isinstance(value, list):
        raise ValueError('"history" must be a list of {"user": ..., "assistant": ...} objects')
    turns = []
    for i, t in enumerate(value):
        if (
            not isinstance(t, dict)
            or set(t) != {"user", "assistant"}
            or not all(isinstance(v, str) for v in t.values())
        ):
            raise ValueError(
                f"history[{i}] must be an object with exactly the string keys 'user' and "
                "'assistant'"
            )
        turns.append((t["user"], t["assistant"]))
    return tuple(turns)


def parse_record(line: str) -> Parsed:
    return parse_object(json.loads(line))


# Column names other tools use for our two fields: named in the error, so that a user with a
# file in another tool's shape learns what to rename.
SYNONYMS = {
    "response": ("answer", "completion", "output", "target", "reply"),
    "prompt": ("question", "instruction", "input", "query"),
}


def _rename_hint(extra: set[str], keys: set[str]) -> str:
    renames = [
        f'"{other}" to "{ours}"'
        for ours, others in SYNONYMS.items()
        if ours not in keys
        for other in others
        if other in extra
    ]
    return f" (rename {' and '.join(renames)})" if renames else ""


def parse_object(obj: object) -> Parsed:
    """(prompt, response, system, history) of one record (a dict of either shape), or
    ValueError."""
    if not isinstance(obj, dict):
        raise ValueError("a record must be a JSON object")
    for key, value in obj.items():
        if isinstance(value, NotJSON):
            raise ValueError(f'the "{key}" cell is not valid JSON: {value.error}')
    if "messages" in obj:
        extra = set(obj) - {"messages"}
        if extra:
            raise ValueError(f"unexpected keys beside 'messages': {', '.join(sorted(extra))}")
        return _from_messages(obj["messages"])
    extra = set(obj) - {"prompt", "response", "system", "history"}
    if extra:
        hint = _rename_hint(extra, set(obj))
        raise ValueError(f"unexpected keys: {', '.join(sorted(extra))}{hint}")
    for key in ("prompt", "response"):
        if key not in obj:
            raise ValueError(f'missing "{key}" (or give "messages" in chat format)')
    for key in ("prompt", "response", "system"):
        if key in obj and not isinstance(obj[key], str):
            raise ValueError(f'"{key}" must be a string')
    history = _from_history(obj["history"]) if "history" in obj else ()
    return obj["prompt"], obj["response"], obj.get("system"), history


Parse = Callable[[], Parsed]


def _collect(
    entries: Iterable[tuple[int, str, Parse]],
    limits: Limits,
    heading: Callable[[int], str],
    empty: str,
) -> list[Record]:
    """Every entry parsed and checked (``(number, label, parse)``), or InputError listing each
    bad one by its label under ``heading(count)``; ``empty`` when there is none at all."""
    records: list[Record] = []
    problems: list[str] = []
    for number, where, parse in entries:
        try:
            prompt, response, system, history = parse()
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        bad = example_problems(prompt, response, system, limits, history=history)
        if bad:
            problems.extend(f"{where}: {p}" for p in bad)
            continue
        records.append(Record(number, prompt, response, system, history))
    if problems:
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise InputError(heading(len(problems)) + "\n  " + "\n  ".join(shown) + tail)
    if not records:
        raise InputError(empty)
    return records


def table_cells(row: dict[str, object]) -> dict[str, object]:
    """A row whose cells are text (a CSV file's, or ``csv.DictReader`` rows handed to the
    SDK) as a record: an empty ``system`` or ``history`` cell is none (no system prompt, a
    single-turn example), and a ``messages`` or ``history`` cell given as text is JSON."""
    out = dict(row)
    for key in ("system", "history"):
        if out.get(key) == "":
            del out[key]
    for key in ("messages", "history"):
        if isinstance(out.get(key), str):
            try:
                out[key] = json.loads(str(out[key]))
            except json.JSONDecodeError as exc:
                out[key] = NotJSON(exc.msg)
    return out


def _sdk_row(obj: object) -> object:
    """An SDK item as a record: a row of text cells only (what ``csv.DictReader`` gives) is
    read as the CSV reader reads its rows (``table_cells``); any other dict as it is."""
    if not isinstance(obj, Mapping):
        return obj
    row = dict(obj)
    if all(isinstance(v, str) for v in row.values()):
        return table_cells(row)
    return row


def records_from_dicts(
    items: Iterable[Mapping[str, Any]], name: str = "examples", limits: Limits | None = None
) -> list[Record]:
    """Records from dicts of either shape (the SDK's input), or InputError listing every
    bad item by its index (``examples[3]: ...``); ``Record.line`` is the index + 1."""
    return _collect(
        (
            (
                i + 1,
                f"{name}[{i}]",
                partial(parse_object, _sdk_row(obj)),
            )
            for i, obj in enumerate(items)
        ),
        limits or Limits(),
        lambda n: f"{n} problem(s) in {name}; nothing was sent:",
        f"{name}: no examples given",
    )


FORMATS = ("jsonl", "csv", "parquet", "datasets")


def detect_format(path: Path) -> str:
    """The format of ``path`` by its extension (a folder: a Hugging Face dataset saved with
    ``save_to_disk``); JSONL otherwise."""
    path = Path(path)
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "jsonl"


def _table_rows(path: Path, fmt: str) -> Iterator[object]:
    """The rows of a CSV file, a Parquet file or a saved Hugging Face dataset, as dicts (a
    ``messages`` or ``history`` cell of a CSV file is JSON text)."""
    if fmt == "csv":
        import csv

        try:
            # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not a header
            with open(path, encoding="utf-8-sig", newline="") as fh:
                dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
                for row in csv.DictReader(fh, dialect=dialect):
                    out: dict[str, object] = {k: v for k, v in row.items() if k is not None}
                    if None in row:
                        out["(extra cells)"] = row[None]
                    yield table_cells(out)
        except UnicodeDecodeError as exc:
            raise InputError(f"{path} is not UTF-8 text ({exc.reason})") from None
        return
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(
                'reading Parquet needs the "data" extra: pip install "crowd-sft[data]"'
            ) from None
        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
        yield from _without_nulls(table.to_pylist())
        return
    try:
        import datasets
    except ImportError:
        raise InputError(
            'reading a saved Hugging Face dataset needs the "data" extra: '
            'pip install "crowd-sft[data]"'
        ) from None
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise InputError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise InputError(
                f"{path} holds the splits {', '.join(data)}: give the folder of one of them"
            )
        data = next(iter(data.values()))
    yield from _without_nulls(data)


def _without_nulls(rows: Iterable[dict]) -> Iterator[dict]:
    for row in rows:  # a table has every column in every row: a null is an absent value
        yield {k: v for k, v in row.items() if v is not None}


def read_records(
    path: Path, limits: Limits | None = None, format: str | None = None
) -> list[Record]:
    """Every record of a file (JSONL, CSV, Parquet, or a saved Hugging Face dataset; see
    ``detect_format``), or InputError listing the bad lines or rows (all of them checked)."""
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: {', '.join(FORMATS)}")
    entries: Iterable[tuple[int, str, Parse]]
    if fmt == "jsonl":
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not a record
        except FileNotFoundError:
            raise InputError(f"no such file: {path}") from None
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        if text.lstrip().startswith("["):
            raise InputError(
                f"{path} holds a JSON array; crowdsft reads JSON Lines, one object per line "
                f"(convert it with: jq -c '.[]' {path} > {path.with_suffix('.jsonl')})"
            )
        entries = (
            (n, f"line {n}", partial(parse_record, line))
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip()
        )
    else:
        if not path.exists():
            raise InputError(f"no such file: {path}")
        entries = (
            (n, f"row {n}", partial(parse_object, row))
            for n, row in enumerate(_table_rows(path, fmt), 1)
        )
    return _collect(
        entries,
        limits or Limits(),
        lambda k: f"{path}: {k} problem(s); nothing was sent:",
        f"{path} holds no records",
    )
