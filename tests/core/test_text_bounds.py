"""Bounded text work: combining-mark runs, wire-level counting, capped messages."""

from __future__ import annotations

from crowdsft.v1 import contribution_pb2
from crowdsft.validation import (
    count_field,
    has_long_combining_run,
    printable,
    summarise,
    unknown_fields,
)


def test_combining_runs_include_characters_that_decompose_into_marks():
    assert has_long_combining_run("e" + "\u0301\u0316" * 16)
    assert not has_long_combining_run("e" + "\u0301" * 30)  # the stream-safe limit itself
    # Class 0 themselves, but their compatibility decompositions are combining marks: a run
    # of them makes NFKC as quadratic as marks do.
    assert has_long_combining_run("\u0f73\uff9e" * 16)
    assert not has_long_combining_run("élève " * 1000 + "日本語" * 1000)


def test_examples_are_counted_on_the_wire_without_parsing():
    one = contribution_pb2.Example(prompt="a", response="b")
    payload = contribution_pb2.ContributionPayload(
        examples=[one] * 100, nonce=b"n" * 16, timestamp_ms=1
    ).SerializeToString()
    assert count_field(payload, 1, 65) == 65  # stops at the limit
    small = contribution_pb2.ContributionPayload(examples=[one] * 3).SerializeToString()
    assert count_field(small, 1, 65) == 3
    # Many tags of other fields cost nothing more than a few beyond the limit.
    junk = b"".join(b"\x10\x01" for _ in range(100_000))  # field 2, varint, repeated
    assert count_field(junk, 1, 65) == 65
    # A group (a deprecated wire type no field of ours uses) counts as over the limit.
    assert count_field(b"\x0b\x0c", 1, 65) == 65


def test_messages_are_summarised_and_printable():
    text = summarise([f"problem {i}" for i in range(100)])
    assert text.endswith("and 95 more problems") and len(text) < 200
    assert len(summarise(["x" * 5000])) <= 1024
    assert printable("eve\n\x1b[31m") == "eve\\n\\x1b[31m"


def test_unknown_fields_are_found_in_nested_messages():
    ex = contribution_pb2.Example(prompt="p", response="r").SerializeToString() + b"\x98\x06\x01"
    payload = contribution_pb2.ContributionPayload.FromString(
        b"\x0a" + bytes([len(ex)]) + ex + b"\xa0\x06\x02"
    )
    found = unknown_fields(payload)
    assert len(found) == 2 and "examples[0]" in found[1]


def test_a_blank_system_prompt_is_bounded_like_every_field():
    from crowdsft.validation import Limits, example_problems

    limits = Limits(max_field_bytes=100)
    assert example_problems("p", "r", " " * 100, limits) == []  # blank: no system prompt
    (problem,) = example_problems("p", "r", " " * 101, limits)
    assert problem == "system is 101 bytes; the limit is 100 bytes"


def test_too_many_turns_are_refused_before_any_turn_is_looked_at():
    """The turn limit is checked first, in constant time per example: a payload of many
    (here malformed) turns is refused for their number, never walked turn by turn."""
    from crowdsft.v1 import contribution_pb2
    from crowdsft.validation import MAX_HISTORY_TURNS, Limits, check_payload, structure_problems

    bad_turn = contribution_pb2.Turn(user="u", assistant="a")
    bad_turn.MergeFromString(b"\x18\x01")  # field 3: unknown to the schema
    example = contribution_pb2.Example(prompt="p", response="r")
    example.history.extend([bad_turn] * (10 * MAX_HISTORY_TURNS))
    payload = contribution_pb2.ContributionPayload(
        examples=[example], nonce=bytes(16), timestamp_ms=1
    )
    assert structure_problems(payload) == [
        f"examples[0].history has {10 * MAX_HISTORY_TURNS} turns; the limit is 64"
    ]
    assert check_payload(payload, Limits()).problems == structure_problems(payload)
    sent = payload.examples[0]
    sent.ClearField("history")
    sent.history.append(bad_turn)  # one turn: now the unknown field is found
    assert "payload.examples[0].history[0] has fields" in structure_problems(payload)[0]


def test_the_nfkc_length_is_bounded_without_normalising():
    import unicodedata

    from crowdsft.validation import normalised_length

    for text in (
        "plain ascii",
        "\ufdfa" * 10,  # 18 characters each under NFKC
        "élève ﬁne ㍻ ⑴ 日本語 " * 20,
        "e\u0301 " * 50,  # composes: NFKC is shorter, the bound is not below it
        "\u01d8\u0323" * 20,  # reordering blocks recomposition: NFKC keeps 3 of each
        "한국어 텍스트 " * 10,  # Hangul decomposes and recomposes
    ):
        assert normalised_length(text) >= len(unicodedata.normalize("NFKC", text))
    assert normalised_length("\ufdfa" * 10) == 180
    assert normalised_length("élève ﬁne") >= len(unicodedata.normalize("NFKC", "élève ﬁne"))
    assert normalised_length("plain ascii") == len("plain ascii")


def test_a_field_that_expands_past_the_limit_is_refused_before_normalising(monkeypatch):
    """Before: a 224 KB contribution of U+FDFA (18 times longer under NFKC) cost ~110 ms of
    the serving process's CPU, 4 MB of it seconds. Now the expansion is counted first."""
    import crowdsft.validation as validation
    from crowdsft.validation import Limits, check_payload

    def forbidden(text):
        raise AssertionError("normalised a text that should have been refused first")

    monkeypatch.setattr(validation, "normalise", forbidden)
    limits = Limits(max_field_bytes=32_768)
    field = "\ufdfa" * 10_000  # 30 KB of UTF-8, under the byte limit; 180,000 under NFKC
    payload = contribution_pb2.ContributionPayload(
        examples=[contribution_pb2.Example(prompt="p", response=field)] * 7,
        nonce=b"n" * 16,
        timestamp_ms=1,
    )
    problems = check_payload(payload, limits).problems
    assert problems and "grows to 180000 characters under Unicode NFKC" in problems[0]
    # an honest field of the same byte size is not refused for it
    monkeypatch.undo()
    honest = contribution_pb2.ContributionPayload(
        examples=[contribution_pb2.Example(prompt="p", response="日本語の文章。" * 1500)],
        nonce=b"n" * 16,
        timestamp_ms=1,
    )
    assert check_payload(honest, limits).problems == []
