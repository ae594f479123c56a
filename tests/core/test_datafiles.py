import json

import pytest

from crowdsft.datafiles import read_records
from crowdsft.errors import InputError
from crowdsft.validation import Limits


def _write(tmp_path, lines):
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_both_formats(tmp_path):
    p = _write(
        tmp_path,
        [
            json.dumps({"prompt": "a", "response": "b"}),
            "",
            json.dumps({"prompt": "c", "response": "d", "system": "s"}),
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "sys"},
                        {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "x"},
                    ]
                }
            ),
        ],
    )
    recs = read_records(p)
    assert [(r.line, r.prompt, r.response, r.system) for r in recs] == [
        (1, "a", "b", None),
        (3, "c", "d", "s"),
        (4, "u", "x", "sys"),
    ]


def test_every_bad_line_is_reported_by_number(tmp_path):
    p = _write(
        tmp_path,
        [
            json.dumps({"prompt": "ok", "response": "ok"}),
            "{not json",
            json.dumps({"prompt": "", "response": "r"}),
            json.dumps({"prompt": "p"}),
            json.dumps({"messages": [{"role": "assistant", "content": "x"}]}),
            json.dumps({"prompt": "p", "response": "r", "extra": 1}),
            json.dumps(["a list"]),
        ],
    )
    with pytest.raises(InputError) as info:
        read_records(p)
    msg = str(info.value)
    assert "6 problem(s); nothing was sent" in msg
    for n, what in [
        (2, "not valid JSON"),
        (3, "prompt is empty"),
        (4, 'missing "response"'),
        (5, "messages[0] is an assistant turn where a user turn belongs"),
        (6, "unexpected keys: extra"),
        (7, "a record must be a JSON object"),
    ]:
        assert f"line {n}: {what}" in msg
    assert "line 1:" not in msg


def _chat(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    roles = ("user", "assistant")
    return {"messages": msgs + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def test_a_conversation_teaches_its_last_answer_after_its_earlier_turns(tmp_path):
    """Chat records of several turns (roles alternate, one optional system message first),
    and the flat shape's ``history``, read into the same record."""
    p = _write(
        tmp_path,
        [
            json.dumps(_chat("hi", "hello", "how are you?", "fine", system="be brief")),
            json.dumps(
                {
                    "system": "be brief",
                    "history": [{"user": "hi", "assistant": "hello"}],
                    "prompt": "how are you?",
                    "response": "fine",
                }
            ),
        ],
    )
    a, b = read_records(p)
    assert (a.prompt, a.response, a.system, a.history) == (
        "how are you?",
        "fine",
        "be brief",
        (("hi", "hello"),),
    )
    assert (b.prompt, b.response, b.system, b.history) == (
        a.prompt,
        a.response,
        a.system,
        a.history,
    )
    assert a.as_dict() == {
        "prompt": "how are you?",
        "response": "fine",
        "system": "be brief",
        "history": [{"user": "hi", "assistant": "hello"}],
    }
    (single,) = read_records(_write(tmp_path, [json.dumps(_chat("q", "a"))]))
    assert "history" not in single.as_dict()


def test_every_malformed_conversation_is_named_by_line_and_message(tmp_path):
    p = _write(
        tmp_path,
        [
            json.dumps(_chat("q", "a", "again")),  # ends with the user
            json.dumps(
                _chat("q", "a", system="s")
                | {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "system", "content": "s"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ),
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ),
            json.dumps(_chat("q", "  ", "q2", "a")),  # an empty earlier answer
            json.dumps({"prompt": "p", "response": "r", "history": [{"user": "u"}]}),
            json.dumps({"prompt": "p", "response": "r", "history": "u: hi"}),
            json.dumps(_chat(*["x"] * (2 * 65 + 2))),
            json.dumps({"messages": [{"role": "system", "content": "s"}]}),
            json.dumps({"messages": [{"role": "tool", "content": "t"}]}),
        ],
    )
    with pytest.raises(InputError) as info:
        read_records(p)
    msg = str(info.value)
    assert "9 problem(s)" in msg
    for n, what in [
        (1, "messages must end with an assistant turn"),
        (2, "messages[1] is a system message; only the first may be one"),
        (3, "messages[1] is a user turn where an assistant turn belongs"),
        (4, "history[0].assistant is empty"),
        (5, "history[0] must be an object with exactly the string keys"),
        (6, '"history" must be a list'),
        (7, "history has 65 turns; the limit is 64"),
        (8, "messages hold no user turn"),
        (9, "messages[0] has unknown role 'tool'"),
    ]:
        assert f"line {n}: {what}" in msg


def test_oversized_field(tmp_path):
    p = _write(tmp_path, [json.dumps({"prompt": "p", "response": "x" * 101})])
    with pytest.raises(InputError, match="line 1: response is 101 bytes; the limit is 100"):
        read_records(p, Limits(max_field_bytes=100))


def test_empty_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="holds no records"):
        read_records(_write(tmp_path, [""]))


def test_training_order_depends_on_content_only_even_where_digests_tie():
    import itertools

    from crowdsft.validation import training_order

    examples = [
        {"prompt": "p", "response": "r\x1fu\x1fa"},  # joined, the same text as the next one
        {"prompt": "p", "response": "r", "history": [{"user": "u", "assistant": "a"}]},
        {"prompt": "p", "response": "r", "system": "\x00"},
        {"prompt": "p", "response": "r"},
        {"prompt": "q", "response": "s"},
    ]
    orders = {json.dumps(training_order(list(perm))) for perm in itertools.permutations(examples)}
    assert len(orders) == 1


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    """Before: a JSONL or CSV file saved with a UTF-8 byte-order mark (as spreadsheet and
    Windows editors do) was refused on its first line."""
    from crowdsft.datafiles import read_records

    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "p", "response": "r"}\n')
    assert [(r.prompt, r.response) for r in read_records(jsonl)] == [("p", "r")]
    csv = tmp_path / "bom.csv"
    csv.write_bytes(b"\xef\xbb\xbfprompt,response\r\nq,a\r\n")
    assert [(r.prompt, r.response) for r in read_records(csv)] == [("q", "a")]


def test_a_json_array_and_other_tools_column_names_get_a_hint(tmp_path):
    import pytest

    from crowdsft.datafiles import read_records
    from crowdsft.errors import InputError

    array = tmp_path / "data.json"
    array.write_text('[{"prompt": "p", "response": "r"}]')
    with pytest.raises(InputError, match="JSON array; crowdsft reads JSON Lines"):
        read_records(array, format="jsonl")
    csv = tmp_path / "qa.csv"
    csv.write_text("prompt,answer\nq,a\n")
    with pytest.raises(InputError, match='rename "answer" to "response"'):
        read_records(csv)


def test_rows_from_csv_dictreader_are_taken_by_the_sdk_as_the_cli_takes_the_file(tmp_path):
    """``csv.DictReader`` rows have text cells: an empty history or system cell, and a
    history cell of JSON text, read as the CLI reads the same CSV file."""
    import csv

    from crowdsft.datafiles import read_records, records_from_dicts

    path = tmp_path / "examples.csv"
    path.write_text(
        "prompt,response,system,history\n"
        "Hi,Hello!,,\n"
        'And then?,Then this.,Be brief.,"[{""user"": ""Hi"", ""assistant"": ""Hello!""}]"\n',
        encoding="utf-8",
    )
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    from_sdk = records_from_dicts(rows)
    from_cli = read_records(path)
    assert [r.as_dict() for r in from_sdk] == [r.as_dict() for r in from_cli]
    assert from_sdk[0].history == () and from_sdk[0].system is None
    assert from_sdk[1].history == (("Hi", "Hello!"),)


def test_an_sdk_dict_that_is_not_a_row_of_text_cells_is_taken_as_it_is():
    from crowdsft.datafiles import records_from_dicts

    # an empty system prompt given on purpose, with a list history: not a table row
    (record,) = records_from_dicts([{"prompt": "p", "response": "r", "system": "", "history": []}])
    assert record.system == ""
