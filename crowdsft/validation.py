"""Content rules for contributions, shared by the node (checks before sending) and the
coordinator (checks before storing), so that both sides say the same thing about the same input.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from crowdsft.v1 import contribution_pb2

MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
MAX_LICENSE_CHARS = 256
MAX_LABELS = 32
MAX_LABEL_CHARS = 256


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
    prompt: str, response: str, system: str | None, limits: Limits, where: str = ""
) -> list[str]:
    """What is wrong with one example, as messages (empty when it is fine)."""
    problems = []
    for name, value in (("prompt", prompt), ("response", response), ("system", system)):
        if value is None:
            continue
        if not value.strip():
            if name != "system":
                problems.append(f"{where}{name} is empty")
            continue
        size = len(value.encode("utf-8"))
        if size > limits.max_field_bytes:
            problems.append(
                f"{where}{name} is {size} bytes; the limit is {limits.max_field_bytes} bytes"
            )
    return problems


def payload_problems(payload: contribution_pb2.ContributionPayload, limits: Limits) -> list[str]:
    """What is wrong with a contribution payload (everything but signature, time and nonce
    reuse), as messages (empty when it is fine)."""
    problems: list[str] = []
    n = len(payload.examples)
    if n == 0:
        problems.append("contribution has no examples")
    elif n > limits.max_examples_per_contribution:
        problems.append(
            f"contribution has {n} examples; the limit is {limits.max_examples_per_contribution}"
        )
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
    for key, value in meta.labels.items():
        if len(key) > MAX_LABEL_CHARS or len(value) > MAX_LABEL_CHARS:
            problems.append(
                f"metadata.labels[{key[:40]!r}] is longer than {MAX_LABEL_CHARS} characters"
            )
            break
    for i, ex in enumerate(payload.examples[: limits.max_examples_per_contribution]):
        system = ex.system if ex.HasField("system") else None
        problems += example_problems(ex.prompt, ex.response, system, limits, f"examples[{i}].")
    problems += repeated_examples(payload)
    return problems


def normalise(text: str) -> str:
    """Text as compared for duplicates: Unicode NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def example_fingerprint(prompt: str, response: str, system: str | None = None) -> bytes:
    """SHA-256 of an example's normalised fields: equal for examples that differ only in case,
    whitespace or Unicode form (what an exact copy with trivial edits looks like)."""
    parts = (normalise(system or ""), normalise(prompt), normalise(response))
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()


def fingerprints(payload: contribution_pb2.ContributionPayload) -> list[bytes]:
    """``example_fingerprint`` of every example of a contribution, in order."""
    return [
        example_fingerprint(e.prompt, e.response, e.system if e.HasField("system") else None)
        for e in payload.examples
    ]


def example_dicts(payload: contribution_pb2.ContributionPayload) -> list[dict[str, str]]:
    """A contribution's examples as dicts: ``prompt``, ``response`` and ``system`` if given."""
    return [
        {"prompt": e.prompt, "response": e.response}
        | ({"system": e.system} if e.HasField("system") else {})
        for e in payload.examples
    ]


def repeated_examples(payload: contribution_pb2.ContributionPayload) -> list[str]:
    """Problems for examples that repeat an earlier example of the same contribution."""
    first: dict[bytes, int] = {}
    problems = []
    for i, fp in enumerate(fingerprints(payload)):
        if fp in first:
            problems.append(f"examples[{i}] repeats examples[{first[fp]}]")
        else:
            first[fp] = i
    return problems


def examples_to_proto(examples: Sequence[Mapping[str, str]]) -> list[contribution_pb2.Example]:
    out = []
    for ex in examples:
        msg = contribution_pb2.Example(prompt=ex["prompt"], response=ex["response"])
        if ex.get("system") is not None:
            msg.system = ex["system"]
        out.append(msg)
    return out


def payload_examples(payload: bytes) -> list[dict[str, str]]:
    """The examples of a stored (signed) contribution payload, as dicts."""
    return example_dicts(contribution_pb2.ContributionPayload.FromString(payload))
