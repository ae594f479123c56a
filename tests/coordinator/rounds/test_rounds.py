"""Rounds in the coordinator over the tiny LM: a round from submitted contributions, and a
round stopped after every persisted step and resumed, finishing exactly once."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from crowdsft.coordinator.rounds.runner import (
    NotEnoughContributors,
    RoundInterrupted,
    RoundRunner,
    round_history,
)
from crowdsft.coordinator.training import lora as llm
from crowdsft.coordinator.training.space import GenerationConfig, LLMSpace
from crowdsft.envelope import new_nonce, now_ms, sign_envelope
from crowdsft.keys import Identity
from crowdsft.plugins.evaluation import L2
from crowdsft.v1 import contribution_pb2

TRAIN = llm.TrainingConfig(
    rank=8,
    alpha=16,
    learning_rate=2e-2,
    epochs=20,
    batch_size=4,
    max_length=48,
    seed=1,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
IDENTITIES = [Identity.generate() for _ in range(4)]
ANSWERS = ["yes yes yes", "yes yes yes", "no no no", "no no no"]
STEPS = ["planned", "candidate:0", "trained", "scored"]
# Two contributors give the same answers on purpose: these tests are about rounds, so copy
# resistance (tests/coordinator/test_copies.py) is off here.
SAME_ANSWERS_ALLOWED = {"reject_duplicate_examples": False, "near_duplicate_threshold": 0.0}


def submit_all(coord):
    with coord.client() as c:
        for ident, answer in zip(IDENTITIES, ANSWERS, strict=True):
            for prompt in ("say it", "again?"):
                env = sign_envelope(
                    ident,
                    contribution_pb2.ContributionPayload(
                        examples=[contribution_pb2.Example(prompt=prompt, response=answer)],
                        nonce=new_nonce(),
                        timestamp_ms=now_ms(),
                    ),
                    coord.public_key,
                )
                c.stub.SubmitContribution(env, timeout=10)


def make_runner(coord, tiny, embedder, tmp_path, **space_options):
    model, tok = tiny
    space = LLMSpace(
        copy.deepcopy(model),
        tok,
        embedder,
        [],
        eval_prompts=[{"prompt": "say it"}, {"prompt": "again?"}],
        target_responses=["yes yes yes", "yes yes yes"],
        evaluation=L2(),
        training=TRAIN,
        adapter_dir=coord.config.adapter_dir,
        generation=GenerationConfig(max_new_tokens=6, batch_size=2),
        **space_options,
    )
    return RoundRunner(coord.config, coord.coordinator.store, space)


@pytest.fixture
def rounds_coord(make_coordinator):
    def make(consolidate_every=0):
        """Groups only by default here: these tests follow the groups' candidates (the
        consolidated one has tests of its own, and the resume test runs with it)."""
        coord = make_coordinator(
            rounds={
                "groups": 2,
                "judging_error": 0.0,
                "seed": 3,
                "consolidate_every": consolidate_every,
            },
            admission=SAME_ANSWERS_ALLOWED,
        )
        submit_all(coord)
        return coord

    return make


def ledger(coord):
    return coord.coordinator.store.query(
        "SELECT round_id, node_id, points_before, points_after FROM points_ledger ORDER BY node_id"
    )


def test_a_round_from_submitted_contributions(rounds_coord, tiny, char_embedder, tmp_path):
    coord = rounds_coord()
    runner = make_runner(coord, tiny, char_embedder, tmp_path)
    summary = runner.run()
    assert summary.round_id == 1 and summary.updated
    assert sorted(n for g in summary.groups for n in g) == sorted(i.node_id for i in IDENTITIES)
    assert summary.scores[summary.winner] == max(summary.scores)
    # rank reward: G - rank points to every member, exactly once
    for rank, g in enumerate(summary.ranking):
        for node in summary.groups[g]:
            assert summary.points[node] == 2 - rank
    assert len(ledger(coord)) == 4
    store = coord.coordinator.store
    assert store.query("SELECT adapter FROM lineage")[0][0] == summary.adapters[summary.winner]
    consumed = store.query("SELECT COUNT(*) FROM consumed")[0][0]
    assert consumed == 2 * len(summary.groups[summary.winner])  # the winners' data retires
    assert (coord.config.adapter_dir / f"{summary.adapters[0]}.safetensors").is_file()
    history = round_history(store)
    assert history[0]["winner"] == summary.winner and len(history[0]["candidates"]) == 2
    with coord.client() as c:
        status = c.status(IDENTITIES[0])
        events = []
        for ev in c.watch_rounds(0, timeout=10):
            events.append(ev)
            if len(events) == 2:
                break
    assert status.points == summary.points[IDENTITIES[0].node_id]
    (part,) = status.rounds
    group = next(g for g, m in enumerate(summary.groups) if IDENTITIES[0].node_id in m)
    assert (part.round_id, part.group, part.rank) == (1, group, summary.ranking.index(group))
    assert part.points_after == summary.points[IDENTITIES[0].node_id]
    assert [(e.round_id, e.kind) for e in events] == [(1, "planned"), (1, "finished")]
    assert list(events[1].scores) == pytest.approx(summary.scores)
    assert events[1].winner == summary.winner
    from click.testing import CliRunner

    from crowdsft.cli import main

    out = CliRunner().invoke(
        main, ["node", "watch", "--coordinator", coord.address, "--count", "2", "--json"]
    )
    assert out.exit_code == 0, out.output
    lines = [json.loads(x) for x in out.stdout.splitlines()]  # stderr: "connected ..."
    assert [x["kind"] for x in lines] == ["planned", "finished"]
    # Before: `node watch` printed the raw scores (negated distances, "scores [-1.0493, ...]")
    # where every other display shows distances. Now distances, lower is better.
    assert lines[1]["evaluation"] == "l2"
    assert lines[1]["distances"] == pytest.approx([-s for s in summary.scores])
    text = CliRunner().invoke(
        main, ["node", "watch", "--coordinator", coord.address, "--count", "2"]
    )
    assert text.exit_code == 0, text.output
    finished = text.stdout.splitlines()[1]
    assert "distances [" in finished and "lower is better" in finished and "-" not in finished
    # The next round trains on top of the winner, from the data not yet consumed.
    second = runner.run()
    assert second.round_id == 2
    assert set(n for g in second.groups for n in g).isdisjoint(summary.groups[summary.winner])


@pytest.mark.parametrize("step", STEPS)
def test_a_round_stopped_after_each_step_resumes_and_finishes_once(
    rounds_coord, tiny, char_embedder, tmp_path, step
):
    reference_coord = rounds_coord(consolidate_every=1)  # the default: with the consolidated
    reference = make_runner(reference_coord, tiny, char_embedder, tmp_path).run()
    assert reference.consolidated is not None and len(reference.scores) == 3

    coord = rounds_coord(consolidate_every=1)
    with pytest.raises(RoundInterrupted):
        make_runner(coord, tiny, char_embedder, tmp_path).run(stop_after=step)
    status = coord.coordinator.store.query("SELECT status FROM rounds")
    assert len(status) == 1 and status[0][0] != "finished"
    coord.restart()  # a new process would see only what was committed
    resumed = make_runner(coord, tiny, char_embedder, tmp_path).run()

    assert resumed.round_id == 1
    assert (resumed.winner, resumed.ranking, resumed.groups) == (
        reference.winner,
        reference.ranking,
        reference.groups,
    )
    np.testing.assert_allclose(resumed.scores, reference.scores)
    assert resumed.points == reference.points
    store = coord.coordinator.store
    assert store.query("SELECT COUNT(*), MIN(status) FROM rounds")[0] == (1, "finished")
    assert store.query("SELECT COUNT(*) FROM lineage")[0][0] == 1
    assert store.query("SELECT COUNT(*) FROM candidates")[0][0] == 3
    assert len(ledger(coord)) == 4
    points = dict(store.query("SELECT node_id, points FROM nodes"))
    assert points == reference.points
    # Running again starts the next round; it never redoes round 1.
    assert make_runner(coord, tiny, char_embedder, tmp_path).run().round_id == 2


def test_not_enough_contributors(make_coordinator, tiny, char_embedder, tmp_path):
    coord = make_coordinator(rounds={"groups": 3})
    with pytest.raises(NotEnoughContributors, match="at least 3 contributors"):
        make_runner(coord, tiny, char_embedder, tmp_path).run()


def test_regression_reward_rebuilds_its_state_after_a_restart(
    make_coordinator, tiny, char_embedder, tmp_path
):
    coord = make_coordinator(
        rounds={
            "groups": 2,
            "judging_error": 0.0,
            "reward": "regression",
            "consume": "none",
            "seed": 5,
        },
        admission=SAME_ANSWERS_ALLOWED,
    )
    submit_all(coord)
    first = make_runner(coord, tiny, char_embedder, tmp_path).run()
    coord.restart()
    second = make_runner(coord, tiny, char_embedder, tmp_path).run()
    assert second.round_id == 2
    stored = json.loads(
        coord.coordinator.store.query("SELECT strategies FROM rounds WHERE round_id=2")[0][0]
    )
    assert stored["reward"] == "regression"
    assert set(first.points) == set(second.points)
    assert all(1.0 <= p + 1.0 <= 2.0 + 1e-9 for p in second.points.values())


def test_the_credit_reward_pays_winners_credit_and_nodes_recompute_it(
    make_coordinator, tiny, char_embedder, tmp_path
):
    from crowdsft.coordinator.report.build import build_report
    from crowdsft.coordinator.store.chain import ledger_entries
    from crowdsft.coordinator.store.queries import finished_rounds
    from crowdsft.ledger import verify_ledger

    coord = make_coordinator(
        rounds={"groups": 2, "judging_error": 0.0, "reward": "credit", "consume": "none"},
        admission=SAME_ANSWERS_ALLOWED,
    )
    submit_all(coord)
    target = [{"prompt": "say it", "response": "yes yes yes"}]
    heldout = [{"prompt": "again?", "response": "yes yes yes"}]
    runner = make_runner(
        coord,
        tiny,
        char_embedder,
        tmp_path,
        credit_targets=target,
        heldout_credit_targets=heldout,
    )
    for _ in range(2):
        runner.run()
    rounds = finished_rounds(coord.coordinator.store)
    assert any(r.updated for r in rounds)
    assert all(r.consolidated is not None for r in rounds)  # the default: every round

    def members(r, group):  # a group's, or the consolidated candidate's (index len(groups))
        return r.groups[group] if group < len(r.groups) else r.consolidated["members"]

    totals: dict[str, float] = {i.node_id: 0.0 for i in IDENTITIES}
    for r in rounds:
        assert len(r.candidates) == len(r.groups) + 1
        assert all(
            len(c.training["member_credit_heldout"]) == len(members(r, c.group))
            for c in r.candidates
        )
        if r.updated:
            win = next(c for c in r.candidates if c.group == r.winner)
            for n, c in zip(members(r, r.winner), win.training["member_credit"], strict=True):
                totals[n] += c
    t = np.array(list(totals.values()))
    expected = 1.0 + (t - t.min()) / (t.max() - t.min())  # onto [1, 2]
    held = runner.points()
    assert [1.0 + held.get(n, 0.0) for n in totals] == pytest.approx(expected.tolist())
    # The credit is signed into the ledger with the candidates: nodes recompute the points.
    entries = ledger_entries(coord.coordinator.store)
    records = [json.loads(e.record) for e in entries]
    assert all("member_credit" in c for rec in records for c in rec["candidates"])
    report = verify_ledger(entries, coord.public_key)
    assert report.ok, [str(p) for p in report.problems]
    assert {n: report.points.get(n, 0.0) for n in held} == pytest.approx(held)
    # The report's grounded values come from the held-out prompts' credit.
    data = build_report(
        coord.config,
        coord.coordinator.store,
        tmp_path / "report",
        char_embedder,
        [t["response"] for t in target],
    )
    assert data["grounded_method"] == "in-run" and data["grounded_on"] == "held-out"
    assert data["pearson_points_grounded"] is not None and data["grounded_note"] is None
    # Without held-out prompts, the grounded values are the very credit the rule paid from:
    # the report gives no Pearson, and says why.
    for r in finished_rounds(coord.coordinator.store):
        for c in r.candidates:
            c.training.pop("member_credit_heldout")
            coord.coordinator.store.write(
                lambda conn, r=r, c=c: conn.execute(
                    "UPDATE candidates SET training=? WHERE round_id=? AND group_index=?",
                    (json.dumps(c.training), r.round_id, c.group),
                )
            )
    data = build_report(
        coord.config,
        coord.coordinator.store,
        tmp_path / "report2",
        char_embedder,
        [t["response"] for t in target],
    )
    assert data["grounded_on"] == "target" and data["pearson_points_grounded"] is None
    assert "heldout_file" in data["grounded_note"]


def test_report_extras_may_not_replace_its_own_fields(rounds_coord, tiny, char_embedder, tmp_path):
    from crowdsft.coordinator.report.build import build_report

    coord = rounds_coord()
    make_runner(coord, tiny, char_embedder, tmp_path).run()
    with pytest.raises(ValueError, match="rounds"):
        build_report(
            coord.config,
            coord.coordinator.store,
            tmp_path / "r",
            char_embedder,
            ["yes"],
            extra={"rounds": 3},
        )


def test_the_report_names_contributors_and_group_members_and_labels_its_figures(
    rounds_coord, tiny, char_embedder, tmp_path
):
    from crowdsft.coordinator.report.build import build_report
    from crowdsft.coordinator.store import queries

    coord = rounds_coord()
    store = coord.coordinator.store
    summary = make_runner(coord, tiny, char_embedder, tmp_path).run()
    named = summary.groups[0][0]
    store.write(lambda conn: queries.set_display_name(conn, named, "Ada <the expert>"))
    data = build_report(
        coord.config,
        store,
        tmp_path / "r",
        char_embedder,
        ["yes"],
        extra={"base_model_distance": 1.25},
        labels={"base_model_distance": "the base model, not fine-tuned"},
    )
    by_id = {c["node_id"]: c["name"] for c in data["contributors"]}
    assert by_id[named] == "Ada <the expert>"  # the registered display name, not a cut id
    # two nodes of one name stay two, and a name that matplotlib would read as maths plots
    a, b, c = [x["node_id"] for x in data["contributors"] if x["node_id"] != named][:3]
    for node, name in ((a, "alice"), (b, "alice"), (c, "$\\nosuchcmd$")):
        store.write(lambda conn, node=node, name=name: queries.set_display_name(conn, node, name))
    again = build_report(coord.config, store, tmp_path / "r2", char_embedder, ["yes"])
    shown = {x["node_id"]: x["name"] for x in again["contributors"]}
    assert shown[a] == f"alice ({a[:6]})" and shown[b] == f"alice ({b[:6]})"
    assert shown[c] == "$\\nosuchcmd$"
    assert data["distance_per_round"][0]["members"][0][0] == "Ada <the expert>"
    page = (tmp_path / "r" / "index.html").read_text()
    assert "group 0 (Ada &lt;the expert&gt;" in page  # members listed, escaped
    assert "<th>the base model, not fine-tuned</th><td>1.25</td>" in page
    assert "base model distance" not in page


def test_a_single_round_is_one_tick_on_the_x_axis():
    from crowdsft.coordinator.report.build import _integer_rounds, pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.scatter([1, 1], [0.5, 0.7])
    _integer_rounds(ax, [1])
    assert list(ax.get_xticks()) == [1] and ax.get_xlim() == (0.5, 1.5)
    plt.close(fig)
    fig, ax = plt.subplots()
    _integer_rounds(ax, list(range(40)))
    assert all(float(t).is_integer() for t in ax.get_xticks())
    plt.close(fig)


def test_the_demo_says_when_low_quality_contributors_out_earn_expert_like_ones():
    from crowdsft.demo.run import points_note

    note = points_note({"expert-like": 2.7, "noisy": 4.7, "off-style": 1.0, "spammer": 3.0}, 3)
    assert note is not None
    assert "noisy contributors 4.7 and spammer contributors 3" in note and "2.7" in note
    assert points_note({"expert-like": 5.0, "noisy": 4.7, "spammer": 3.0}, 3) is None
    assert points_note({"expert-like": 0.0, "noisy": 0.0, "spammer": 0.0}, 1) is None  # a tie
    third = 13 / 3  # the demo's seed 0: 4.33 each, equal but for rounding
    assert points_note({"expert-like": third, "noisy": 4 + 1 / 3, "spammer": 3.0}, 3) is None


def test_export_merges_the_lineage_into_a_loadable_model(
    make_coordinator, record_winner, tiny, tmp_path
):
    import torch
    from transformers import AutoModelForCausalLM

    from crowdsft.coordinator.cli import export_model

    model, tok = tiny
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    coord = make_coordinator(
        model={"base": str(base_dir), "device": "cpu"}, training=dataclasses_asdict(TRAIN)
    )
    adapter = llm.fit(
        model, tok, [{"prompt": "p", "response": "yes yes yes"}], None, coord.config.training
    ).adapter
    digest = llm.save_adapter(adapter, coord.config.adapter_dir)
    record_winner(coord, digest)
    out = tmp_path / "export"
    info = export_model(coord.config, out, adapters=True)
    assert info["lineage"] == [digest]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = llm.encode(tok, [{"prompt": "p", "response": "yes"}])
    with torch.no_grad(), llm.with_adapter(model, adapter, coord.config.training) as m:
        expected = m(input_ids=batch.input_ids).logits
        got = loaded(input_ids=batch.input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the adapter in PEFT's own format: PeftModel.from_pretrained loads it over the base
    from peft import PeftModel

    (folder,) = (out / "adapters").iterdir()
    assert folder.name == f"01-{digest[:12]}"
    fresh = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    peft = PeftModel.from_pretrained(fresh, str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            peft(input_ids=batch.input_ids).logits, expected, rtol=1e-4, atol=1e-4
        )


def dataclasses_asdict(config):
    import dataclasses

    return dataclasses.asdict(config)


def test_report_after_rounds(rounds_coord, tiny, char_embedder, tmp_path):
    from crowdsft.coordinator.report.build import build_report

    coord = rounds_coord()
    runner = make_runner(coord, tiny, char_embedder, tmp_path)
    runner.run()
    out = tmp_path / "report"
    data = build_report(
        coord.config,
        coord.coordinator.store,
        out,
        char_embedder,
        ["yes yes yes", "yes yes yes"],
        extra={"note": "test"},
    )
    for name in (
        "index.html",
        "report.json",
        "distance_per_round.png",
        "candidates_per_round.png",
        "points_per_contributor.png",
        "points_vs_shapley.png",
    ):
        assert (out / name).is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["note"] == "test" and len(saved["rounds"]) == 1
    assert len(saved["contributors"]) == 4
    shapley = {c["node_id"]: c["shapley"] for c in saved["contributors"]}
    yes_nodes = [i.node_id for i, a in zip(IDENTITIES, ANSWERS, strict=True) if a.startswith("yes")]
    no_nodes = [i.node_id for i, a in zip(IDENTITIES, ANSWERS, strict=True) if a.startswith("no")]
    assert min(shapley[n] for n in yes_nodes) > max(shapley[n] for n in no_nodes)
    assert data["pearson_points_shapley"] is not None
    assert all(c["shapley_stderr"] >= 0 for c in saved["contributors"])
    assert saved["valuation_method"] == "permutation"
    assert isinstance(saved["unresolved_pairs"], list)
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # self-contained


def test_unresolved_pairs_use_the_covariance_of_the_estimates():
    from crowdsft.coordinator.report.build import Valued, unresolved_pairs

    v = np.array([1.0, 0.9, 0.0, 0.0])
    se = np.array([0.1, 0.05, 0.1, 0.0])
    independent = Valued(list("abcd"), v, se, np.diag(se**2))
    assert unresolved_pairs(independent) == [("a", "b"), ("c", "d")]
    # a and b estimated from the same permutations, strongly correlated: their difference is
    # known far better than either value, so their order is settled
    cov = np.diag(se**2)
    cov[0, 1] = cov[1, 0] = 0.99 * 0.1 * 0.05
    assert unresolved_pairs(Valued(list("abcd"), v, se, cov)) == [("c", "d")]
    exact = Valued(list("abc"), np.array([1.0, 1.0, 0.5]), np.zeros(3), np.zeros((3, 3)))
    assert unresolved_pairs(exact) == [("a", "b")]  # only a tie
    unknown = Valued(list("ab"), np.array([1.0, 0.5]), np.full(2, np.nan), None)
    assert unresolved_pairs(unknown) is None  # KernelSHAP-like: no error estimate
