"""Inputs people have: CSV, Parquet and Hugging Face datasets saved to disk, by extension or
--format, with the same numbered errors as JSONL; and through `node submit`."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from crowdsft.datafiles import detect_format, read_records
from crowdsft.errors import InputError

ROWS = [
    {"prompt": "What is 2+2?", "response": "4", "system": None},
    {"prompt": "Capital of Peru?", "response": "Lima.", "system": "Be brief."},
]
CHAT = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello!"},
]

HISTORY = [{"user": "Hi?", "assistant": "Hello!"}]


def _expected():
    return [(r["prompt"], r["response"], r["system"]) for r in ROWS]


def _as_tuples(records):
    return [(r.prompt, r.response, r.system) for r in records]


def test_csv_by_extension_with_empty_system_cells_and_chat_json(tmp_path):
    path = tmp_path / "data.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["prompt", "response", "system"])
        w.writeheader()
        for r in ROWS:
            w.writerow({k: v or "" for k, v in r.items()})
    assert detect_format(path) == "csv"
    assert _as_tuples(read_records(path)) == _expected()
    chat = tmp_path / "chat.csv"
    with open(chat, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["messages"])
        w.writeheader()
        w.writerow({"messages": json.dumps(CHAT)})
    assert _as_tuples(read_records(chat)) == [("Hi?", "Hello!", "Be kind.")]
    turns = tmp_path / "turns.csv"
    with open(turns, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["prompt", "response", "history"])
        w.writeheader()
        w.writerow({"prompt": "And?", "response": "Done.", "history": json.dumps(HISTORY)})
        w.writerow({"prompt": "Alone?", "response": "Yes.", "history": ""})
        w.writerow({"prompt": "Bad?", "response": "Yes.", "history": "[{"})
    with pytest.raises(InputError, match=r"row 3: the \"history\" cell is not valid JSON: "):
        read_records(turns)
    turns.write_text("\n".join(turns.read_text().splitlines()[:3]) + "\n")
    a, b = read_records(turns)
    assert a.history == (("Hi?", "Hello!"),) and b.history == ()


def test_csv_errors_name_every_bad_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,response\nfine,ok\nno response,\n,,\nx,y\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        read_records(path)
    text = str(info.value)
    assert "row 2:" in text and "row 3:" in text and "row 1:" not in text and "row 4" not in text


def test_parquet_and_a_saved_dataset(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "data.parquet")
    assert _as_tuples(read_records(tmp_path / "data.parquet")) == _expected()
    rows = [r | {"history": HISTORY if r["system"] else None} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "turns.parquet")
    assert [r.history for r in read_records(tmp_path / "turns.parquet")] == [
        (),
        (("Hi?", "Hello!"),),
    ]
    folder = tmp_path / "saved"
    longer = [*CHAT, {"role": "user", "content": "Well?"}, {"role": "assistant", "content": "Ok."}]
    datasets.Dataset.from_list(
        [{"messages": CHAT}, {"messages": CHAT[1:]}, {"messages": longer}]
    ).save_to_disk(str(folder))
    assert detect_format(folder) == "datasets"
    records = read_records(folder)
    assert _as_tuples(records) == [
        ("Hi?", "Hello!", "Be kind."),
        ("Hi?", "Hello!", None),
        ("Well?", "Ok.", "Be kind."),
    ]
    assert records[2].history == (("Hi?", "Hello!"),)
    # a datasets Sequence feature stores a list of dicts as a dict of lists
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "response": datasets.Value("string"),
            "history": datasets.Sequence(
                {"user": datasets.Value("string"), "assistant": datasets.Value("string")}
            ),
        }
    )
    sequenced = tmp_path / "sequenced"
    datasets.Dataset.from_list(
        [
            {
                "prompt": "Well?",
                "response": "Ok.",
                "history": {"user": ["Hi?"], "assistant": ["Hello!"]},
            }
        ],
        features=features,
    ).save_to_disk(str(sequenced))
    assert [r.history for r in read_records(sequenced)] == [(("Hi?", "Hello!"),)]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "response": "r"}, {"prompt": "p"}]), bad)
    with pytest.raises(InputError, match=r"row 2: missing \"response\""):
        read_records(bad)


def test_format_flag_overrides_the_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("prompt,response\nq,a\n", encoding="utf-8")
    with pytest.raises(InputError):
        read_records(path)  # read as JSONL: not JSON
    assert _as_tuples(read_records(path, format="csv")) == [("q", "a", None)]


def _node_submit(coord, tmp_path, path) -> dict:
    """``crowdsft node submit --json`` of ``path`` with a new key; its report."""
    from crowdsft.cli import main

    key = tmp_path / "node.key"
    runner = CliRunner()
    assert runner.invoke(main, ["node", "keygen", "--out", str(key)]).exit_code == 0
    out = runner.invoke(
        main,
        ["node", "submit", "--coordinator", coord.address, "--key", str(key), str(path), "--json"],
    )
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def test_node_submit_reads_a_csv_file(coord, tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,response\nq1,a1\nq2,a2\n", encoding="utf-8")
    assert _node_submit(coord, tmp_path, path)["accepted"] == 2


def test_a_conversation_goes_from_a_file_to_the_rounds_whole(coord, tmp_path):
    """A multi-turn chat record is signed with its earlier turns, stored as signed, and handed
    to training with them; its last turn alone is another example (no copy)."""
    from crowdsft.coordinator.store import queries
    from crowdsft.validation import payload_examples

    turns = ["Hi?", "Hello!", "And your name?", "Crowd."]
    roles = ["user", "assistant"] * 2
    chat = [CHAT[0]] + [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps({"messages": chat})
        + "\n"
        # the same last turn without the earlier one: another example
        + json.dumps({"prompt": "And your name?", "response": "Crowd.", "system": "Be kind."})
        + "\n",
        encoding="utf-8",
    )
    assert _node_submit(coord, tmp_path, path)["accepted"] == 2
    stored = [
        e
        for row in queries.all_contributions(coord.coordinator.store)
        for e in payload_examples(row.payload)
    ]
    assert sorted(stored, key=len) == [
        {"prompt": "And your name?", "response": "Crowd.", "system": "Be kind."},
        {
            "prompt": "And your name?",
            "response": "Crowd.",
            "system": "Be kind.",
            "history": [{"user": "Hi?", "assistant": "Hello!"}],
        },
    ]
