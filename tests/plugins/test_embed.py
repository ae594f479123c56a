"""``crowdsft embed`` works for every registered embedder; the goemotions weights ship."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from crowdsft.cli import main
from crowdsft.plugins.manager import get_plugins


@pytest.mark.slow
@pytest.mark.parametrize("name", get_plugins().names("embedder"))
def test_embed_adds_a_vector_to_every_line(name, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "I love this so much!", "id": 1}\n\n{"text": "meh."}\n')
    res = CliRunner().invoke(main, ["embed", "--embedder", name, str(src)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["I love this so much!", "meh."] and rows[0]["id"] == 1
    assert len(rows[0]["vector"]) == len(rows[1]["vector"]) > 0
    assert rows[0]["vector"] != rows[1]["vector"]


def test_embed_names_the_bad_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    res = CliRunner().invoke(main, ["embed", str(src)])
    assert res.exit_code != 0 and "in.jsonl:2" in res.output


@pytest.mark.slow
def test_goemotions_scores_are_28_probabilities_in_label_order():
    from crowdsft.plugins.goemotions import WEIGHTS, GoEmotionsEmbedder, read_meta

    meta = read_meta(WEIGHTS)
    assert len(meta["labels"]) == 28 and meta["labels"][-1] == "neutral"
    vec = GoEmotionsEmbedder().embed(["Thank you so much, this made my day!", "ok"])
    assert vec.shape == (2, 28) and ((vec >= 0) & (vec <= 1)).all()
    assert vec[0].argmax() == meta["labels"].index("gratitude")
