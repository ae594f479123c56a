"""Reading contributors' JSONL files into examples, with every problem reported by line number.

Two record shapes are accepted, one JSON object per line:

* ``{"prompt": "...", "response": "...", "system": "..."}`` (``system`` optional);
* ``{"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
  {"role": "assistant", "content": "..."}]}`` (chat format; one optional system message, then
  one user turn and one assistant turn).

Blank lines are skipped. Nothing is sent while any line is bad.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from crowdsft.errors import InputError
from crowdsft.validation import Limits, example_problems

MAX_REPORTED = 20


@dataclass(frozen=True)
class Record:
    line: int
    prompt: str
    response: str
    system: str | None = None

    def as_dict(self) -> dict[str, str]:
        d = {"prompt": self.prompt, "response": self.response}
        if self.system is not None:
            d["system"] = self.system
        return d


def _from_messages(messages: object) -> tuple[str, str, str | None]:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    system = None
    turns = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if m["role"] == "system":
            if i != 0:
                raise ValueError("a system message may only come first")
            system = m["content"]
        elif m["role"] in ("user", "assistant"):
            turns.append((m["role"], m["content"]))
        else:
            raise ValueError(f"messages[{i}] has unknown role {m['role']!r}")
    if [r for r, _ in turns] != ["user", "assistant"]:
        if len(turns) > 2:
            raise ValueError(
                "multi-turn conversations are not supported yet: give one user turn and one "
                "assistant turn"
            )
        raise ValueError("messages must hold one user turn followed by one assistant turn")
    return turns[0][1], turns[1][1], system


def parse_record(line: str) -> tuple[str, str, str | None]:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("a record must be a JSON object")
    if "messages" in obj:
        extra = set(obj) - {"messages"}
        if extra:
            raise ValueError(f"unexpected keys beside 'messages': {', '.join(sorted(extra))}")
        return _from_messages(obj["messages"])
    extra = set(obj) - {"prompt", "response", "system"}
    if extra:
        raise ValueError(f"unexpected keys: {', '.join(sorted(extra))}")
    for key in ("prompt", "response"):
        if key not in obj:
            raise ValueError(f'missing "{key}" (or give "messages" in chat format)')
    for key in ("prompt", "response", "system"):
        if key in obj and not isinstance(obj[key], str):
            raise ValueError(f'"{key}" must be a string')
    return obj["prompt"], obj["response"], obj.get("system")


def read_records(path: Path, limits: Limits | None = None) -> list[Record]:
    """Every record of a JSONL file, or InputError listing the bad lines (all of them checked)."""
    limits = limits or Limits()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    records: list[Record] = []
    problems: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt, response, system = parse_record(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {n}: not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        except ValueError as exc:
            problems.append(f"line {n}: {exc}")
            continue
        bad = example_problems(prompt, response, system, limits)
        if bad:
            problems.extend(f"line {n}: {p}" for p in bad)
            continue
        records.append(Record(n, prompt, response, system))
    if problems:
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise InputError(
            f"{path}: {len(problems)} problem(s); nothing was sent:\n  " + "\n  ".join(shown) + tail
        )
    if not records:
        raise InputError(f"{path} holds no records")
    return records
