"""Content rules for contributions, shared by the node (checks before sending) and the
coordinator (checks before storing), so that both sides say the same thing about the same input.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from crowdsft.v1 import contribution_pb2

_Example = TypeVar("_Example", bound=Mapping[str, Any])

MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
MAX_LICENSE_CHARS = 256
MAX_LABELS = 32
MAX_LABEL_CHARS = 256
# Earlier turns of a conversation one example may carry (each turn: a user message and the
# assistant's answer). A protocol constant, like the label limits: not configurable.
MAX_HISTORY_TURNS = 64
# Unicode's stream-safe text format allows at most 30 non-starters (combining marks) in a row.
# Longer runs make normalisation quadratic (canonical reordering sorts each run), so they are
# refused before anything is normalised.
MAX_COMBINING_RUN = 30
# What an error message lists at most: a few problems, and a bounded length.
MAX_LISTED_PROBLEMS = 5
MAX_MESSAGE_CHARS = 1024


def _non_starter(ch: str) -> bool:
    """A combining mark, or a character whose compatibility decomposition begins with one
    (U+0F73, U+FF9E, ...: class 0 themselves, non-starters once normalised)."""
    if unicodedata.combining(ch):
        return True
    if not unicodedata.decomposition(ch):
        return False
    return bool(unicodedata.combining(unicodedata.normalize("NFKD", ch)[0]))


@functools.cache
def _combining_run() -> re.Pattern[str]:
    """A pattern for more than ``MAX_COMBINING_RUN`` non-starters in a row (built once, on
    first use, from this Python's Unicode database)."""
    ranges: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if _non_starter(chr(cp)):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1] = (ranges[-1][0], cp)
            else:
                ranges.append((cp, cp))
    cls = "".join(
        re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
        for a, b in ranges
    )
    return re.compile(f"[{cls}]{{{MAX_COMBINING_RUN + 1},}}")


# Every combining mark lies at U+0300 or above: only runs of such characters can hold a long
# run of marks, and this simple pattern finds them much faster than the exact one scans.
_CANDIDATES = re.compile(f"[\u0300-\U0010ffff]{{{MAX_COMBINING_RUN + 1},}}")


def _char_class(cps: list[int]) -> str:
    ranges: list[tuple[int, int]] = []
    for cp in cps:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    return "".join(
        re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
        for a, b in ranges
    )


@functools.cache
def _expanders() -> tuple[re.Pattern[str], tuple[tuple[int, re.Pattern[str]], ...]]:
    """Characters whose full compatibility decomposition (NFKD) is longer than one character
    (U+FDFA: 18), as one pattern for all and one pattern per number of characters added
    (built once, on first use)."""
    extra: dict[int, list[int]] = {}
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        if unicodedata.decomposition(ch):
            n = len(unicodedata.normalize("NFKD", ch))
            if n > 1:
                extra.setdefault(n - 1, []).append(cp)
    everything = sorted(cp for cps in extra.values() for cp in cps)
    by_extra = tuple((k, re.compile(f"[{_char_class(cps)}]")) for k, cps in sorted(extra.items()))
    return re.compile(f"[{_char_class(everything)}]"), by_extra


def normalised_length(text: str) -> int:
    """An upper bound on the length of ``text`` under Unicode NFKC, found without normalising
    (a few pattern scans: a small fraction of normalisation's cost on text built to expand).
    NFKC decomposes every character (NFKD: each character's decomposition, reordered, so the
    lengths add up) and then composes, which only shortens: the sum of the characters' NFKD
    lengths bounds it. (Hangul syllables decompose algorithmically and recompose: counted as
    one.) Normalising a field that expands far would cost the server up to 18 times its size
    in work and memory; fields are refused on this bound first. Case folding, applied after,
    adds at most 3 characters per character: bounded work once this bound is."""
    if text.isascii():
        return len(text)
    anything, by_extra = _expanders()
    if anything.search(text) is None:
        return len(text)
    return len(text) + sum(k * len(p.findall(text)) for k, p in by_extra)


def has_long_combining_run(text: str) -> bool:
    """Whether ``text`` holds more than ``MAX_COMBINING_RUN`` combining marks in a row."""
    if text.isascii():
        return False
    return any(_combining_run().search(m.group()) for m in _CANDIDATES.finditer(text))


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe for a log line or a table cell: control and format characters (newlines,
    escape codes, bidirectional overrides) escaped, and cut at ``limit`` characters."""
    out = "".join(
        ch
        if ch == " " or unicodedata.category(ch)[0] not in "CZ"
        else ch.encode("unicode_escape").decode("ascii")
        for ch in text[:limit]
    )
    return out + ("…" if len(text) > limit else "")


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds control or format characters or line/paragraph separators."""
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text)


def summarise(problems: Sequence[str], what: str = "") -> str:
    """Problems as one message of bounded size: the first few, and how many more."""
    shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    if more > 0:
        shown += f"; and {more} more problem{'s' if more > 1 else ''}"
    text = f"{what}{shown}"
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return text


def turn_counts(payload: contribution_pb2.ContributionPayload) -> list[str]:
    """Examples with more earlier turns than the protocol allows: checked first, in constant
    time per example, so that a payload of a million empty turns costs no more work than
    its parsing."""
    return [
        f"examples[{i}].history has {len(ex.history)} turns; the limit is {MAX_HISTORY_TURNS}"
        for i, ex in enumerate(payload.examples)
        if len(ex.history) > MAX_HISTORY_TURNS
    ][:MAX_LISTED_PROBLEMS]


def structure_problems(payload: contribution_pb2.ContributionPayload) -> list[str]:
    """What no schema-level check may pass: too many turns (first, cheaply), then fields the
    schema does not know."""
    return turn_counts(payload) or unknown_fields(payload)


def unknown_fields(message: Message, where: str = "payload") -> list[str]:
    """Fields the schema does not know, in ``message`` and the messages inside it (stored
    verbatim, they would escape every limit)."""
    found = []
    unknown = UnknownFieldSet(message)
    if len(unknown):
        numbers = sorted({unknown[i].field_number for i in range(len(unknown))})
        found.append(f"{where} has fields this protocol does not define (numbers {numbers[:5]})")
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        repeated = field.is_repeated
        for i, item in enumerate(value if repeated else [value]):
            name = f"{where}.{field.name}" + (f"[{i}]" if repeated else "")
            found += unknown_fields(item, name)
            if len(found) > MAX_LISTED_PROBLEMS:
                return found
    return found


@dataclass(frozen=True)
class Limits:
    """Size limits on contributions. The coordinator's config sets them; nodes learn them from
    ``GetCoordinatorInfo``."""

    max_examples_per_contribution: int = 64
    max_field_bytes: int = 32_768
    max_message_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_examples_per_contribution", "max_field_bytes", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


def example_problems(
    prompt: str,
    response: str,
    system: str | None,
    limits: Limits,
    where: str = "",
    history: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """What is wrong with one example, as messages (empty when it is fine). ``history``: the
    conversation's earlier turns, (user, assistant) pairs, oldest first."""
    if len(history) > MAX_HISTORY_TURNS:
        return [f"{where}history has {len(history)} turns; the limit is {MAX_HISTORY_TURNS}"]
    problems = []
    fields: list[tuple[str, str | None]] = [("system", system)]
    for i, (user, assistant) in enumerate(history):
        fields += [(f"history[{i}].user", user), (f"history[{i}].assistant", assistant)]
    fields += [("prompt", prompt), ("response", response)]
    for name, value in fields:
        if value is None:
            continue
        size = len(value.encode("utf-8"))
        if size > limits.max_field_bytes:  # also a blank system prompt: every field is bounded
            problems.append(
                f"{where}{name} is {size} bytes; the limit is {limits.max_field_bytes} bytes"
            )
            continue
        if not value.strip():
            if name != "system":
                problems.append(f"{where}{name} is empty")
            continue
        if has_long_combining_run(value):
            problems.append(
                f"{where}{name} has more than {MAX_COMBINING_RUN} combining marks in a row "
                "(Unicode's stream-safe limit)"
            )
            continue
        expanded = normalised_length(value)
        if expanded > limits.max_field_bytes:
            problems.append(
                f"{where}{name} grows to {expanded} characters under Unicode NFKC; the limit "
                f"is {limits.max_field_bytes}"
            )
    return problems


def count_field(data: bytes, number: int, stop_after: int, max_tags: int | None = None) -> int:
    """How many times top-level field ``number`` occurs in protobuf wire bytes, counting no
    further than ``stop_after`` and reading at most ``max_tags`` tags (default: a few more
    than ``stop_after``; a message that needs more is past any sane size, and counts as
    ``stop_after``). Malformed bytes count as what was read so far (the parser will say what
    is wrong); groups (deprecated wire types) count as ``stop_after``. Reads tags and skips
    values: no message is built."""
    i, n, count = 0, len(data), 0
    tags = 0
    most_tags = max_tags if max_tags is not None else stop_after + 16

    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while i < n:
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value, i
            shift += 7
            if shift > 63:
                break
        raise ValueError("bad varint")

    try:
        while i < n and count < stop_after:
            tags += 1
            if tags > most_tags:
                return stop_after
            tag, i = varint(i)
            field, wire = tag >> 3, tag & 7
            if field == number:
                count += 1
            if wire == 0:
                _, i = varint(i)
            elif wire == 1:
                i += 8
            elif wire == 2:
                length, i = varint(i)
                i += length
            elif wire == 5:
                i += 4
            else:
                return stop_after  # groups: no field of these messages uses them
    except ValueError:
        pass
    return count


def payload_problems(payload: contribution_pb2.ContributionPayload, limits: Limits) -> list[str]:
    """What is wrong with a contribution payload (everything but signature, time and nonce
    reuse), as messages (empty when it is fine)."""
    return check_payload(payload, limits).problems


@dataclass(frozen=True)
class CheckedPayload:
    problems: list[str]
    fingerprints: list[bytes]  # one per example; empty when there are problems


def check_payload(payload: contribution_pb2.ContributionPayload, limits: Limits) -> CheckedPayload:
    """Check a contribution payload, cheapest checks first: counts and sizes, then combining
    marks, and only for a payload that passed those, normalisation (each example once: its
    fingerprint serves the repeat check here and the coordinator's copy check)."""
    problems: list[str] = []
    n = len(payload.examples)
    if n == 0:
        problems.append("contribution has no examples")
    elif n > limits.max_examples_per_contribution:
        problems.append(
            f"contribution has {n} examples; the limit is {limits.max_examples_per_contribution}"
        )
        return CheckedPayload(problems, [])  # nothing per example is looked at
    if not MIN_NONCE_BYTES <= len(payload.nonce) <= MAX_NONCE_BYTES:
        problems.append(
            f"nonce has {len(payload.nonce)} bytes; it must have {MIN_NONCE_BYTES} to "
            f"{MAX_NONCE_BYTES}"
        )
    if payload.timestamp_ms <= 0:
        problems.append("timestamp_ms is missing")
    meta = payload.metadata
    if len(meta.license) > MAX_LICENSE_CHARS:
        problems.append(f"metadata.license is longer than {MAX_LICENSE_CHARS} characters")
    if len(meta.labels) > MAX_LABELS:
        problems.append(
            f"metadata.labels has {len(meta.labels)} entries; the limit is {MAX_LABELS}"
        )
    else:
        for key, value in meta.labels.items():
            if len(key) > MAX_LABEL_CHARS or len(value) > MAX_LABEL_CHARS:
                problems.append(
                    f"metadata.labels[{key[:40]!r}] is longer than {MAX_LABEL_CHARS} characters"
                )
                break
    for i, ex in enumerate(payload.examples):
        if len(ex.history) > MAX_HISTORY_TURNS:
            problems += turn_counts(payload)
            break
        system = ex.system if ex.HasField("system") else None
        problems += example_problems(
            ex.prompt, ex.response, system, limits, f"examples[{i}].", _turns(ex)
        )
        if len(problems) > MAX_LISTED_PROBLEMS:
            break  # enough to say what is wrong; the rest is not worth the work
    if problems:
        return CheckedPayload(problems, [])
    fps = fingerprints(payload)
    first: dict[bytes, int] = {}
    for i, fp in enumerate(fps):
        if fp in first:
            problems.append(f"examples[{i}] repeats examples[{first[fp]}]")
        else:
            first[fp] = i
    return CheckedPayload(problems, [] if problems else fps)


def normalise(text: str) -> str:
    """Text as compared for duplicates: Unicode NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def example_fingerprint(
    prompt: str,
    response: str,
    system: str | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> bytes:
    """SHA-256 of an example's normalised fields: equal for examples that differ only in case,
    whitespace or Unicode form (what an exact copy with trivial edits looks like). The earlier
    turns of a conversation count too; a single-turn example's fingerprint has none."""
    parts = [normalise(system or ""), normalise(prompt), normalise(response)]
    parts += [normalise(text) for turn in history for text in turn]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()


def _turns(example: contribution_pb2.Example) -> list[tuple[str, str]]:
    return [(t.user, t.assistant) for t in example.history]


def fingerprints(payload: contribution_pb2.ContributionPayload) -> list[bytes]:
    """``example_fingerprint`` of every example of a contribution, in order."""
    return [
        example_fingerprint(
            e.prompt, e.response, e.system if e.HasField("system") else None, _turns(e)
        )
        for e in payload.examples
    ]


def history_pairs(example: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The earlier turns of an example dict (its ``history``), as (user, assistant) pairs."""
    return [(t["user"], t["assistant"]) for t in example.get("history") or ()]


def example_dicts(payload: contribution_pb2.ContributionPayload) -> list[dict[str, Any]]:
    """A contribution's examples as dicts: ``prompt``, ``response``, and ``system`` and
    ``history`` (a list of ``{"user", "assistant"}`` dicts, oldest first) where given."""
    return [
        {"prompt": e.prompt, "response": e.response}
        | ({"system": e.system} if e.HasField("system") else {})
        | (
            {"history": [{"user": u, "assistant": a} for u, a in _turns(e)]}
            if len(e.history)
            else {}
        )
        for e in payload.examples
    ]


def examples_to_proto(examples: Sequence[Mapping[str, Any]]) -> list[contribution_pb2.Example]:
    out = []
    for ex in examples:
        msg = contribution_pb2.Example(prompt=ex["prompt"], response=ex["response"])
        if ex.get("system") is not None:
            msg.system = ex["system"]
        for user, assistant in history_pairs(ex):
            msg.history.add(user=user, assistant=assistant)
        out.append(msg)
    return out


def payload_examples(payload: bytes) -> list[dict[str, Any]]:
    """The examples of a stored (signed) contribution payload, as dicts."""
    return example_dicts(contribution_pb2.ContributionPayload.FromString(payload))


def training_order(examples: Sequence[_Example]) -> list[_Example]:
    """A contributor's examples in the order a round trains on them: sorted by the SHA-256 of
    their exact fields. Fine-tuning depends on order, and neither the order in which a node's
    contributions arrived (its upload stream may commit them out of file order) nor how it
    batched examples into contributions may change a round's result."""

    def key(e: _Example) -> tuple[bytes, str]:
        fields = [e.get("system", "\x00"), e["prompt"], e["response"]]
        fields += [text for turn in history_pairs(e) for text in turn]
        digest = hashlib.sha256("\x1f".join(fields).encode("utf-8")).digest()
        # the digest joins fields that may hold the separator: distinct examples can tie,
        # and then the whole example decides
        return digest, json.dumps(e, sort_keys=True, ensure_ascii=False)

    return sorted(examples, key=key)
