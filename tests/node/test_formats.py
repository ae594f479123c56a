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
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"messages": CHAT}, {"messages": CHAT[1:]}]).save_to_disk(
        str(folder)
    )
    assert detect_format(folder) == "datasets"
    assert _as_tuples(read_records(folder)) == [
        ("Hi?", "Hello!", "Be kind."),
        ("Hi?", "Hello!", None),
    ]
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


def test_node_submit_reads_a_csv_file(coord, tmp_path):
    from crowdsft.cli import main

    path = tmp_path / "data.csv"
    path.write_text("prompt,response\nq1,a1\nq2,a2\n", encoding="utf-8")
    key = tmp_path / "node.key"
    runner = CliRunner()
    assert runner.invoke(main, ["node", "keygen", "--out", str(key)]).exit_code == 0
    out = runner.invoke(
        main,
        ["node", "submit", "--coordinator", coord.address, "--key", str(key), str(path), "--json"],
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["accepted"] == 2
