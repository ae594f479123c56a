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
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "1"},
                        {"role": "assistant", "content": "2"},
                        {"role": "user", "content": "3"},
                        {"role": "assistant", "content": "4"},
                    ]
                }
            ),
        ],
    )
    with pytest.raises(InputError) as info:
        read_records(p)
    msg = str(info.value)
    assert "7 problem(s); nothing was sent" in msg
    for n, what in [
        (2, "not valid JSON"),
        (3, "prompt is empty"),
        (4, 'missing "response"'),
        (5, "one user turn"),
        (6, "unexpected keys: extra"),
        (7, "must be a JSON object"),
        (8, "multi-turn"),
    ]:
        assert f"line {n}: " in msg and what in msg
    assert "line 1:" not in msg


def test_oversized_field(tmp_path):
    p = _write(tmp_path, [json.dumps({"prompt": "p", "response": "x" * 101})])
    with pytest.raises(InputError, match="line 1: response is 101 bytes; the limit is 100"):
        read_records(p, Limits(max_field_bytes=100))


def test_empty_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="holds no records"):
        read_records(_write(tmp_path, [""]))
