"""One small round with the real SmolLM2 and the real embedder, from contributions submitted
over gRPC. Marked slow; CI runs it (the README's test command installs both models)."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytestmark = pytest.mark.slow


def test_one_round_with_smollm2_and_minilm_through_grpc(make_coordinator, tmp_path):
    pytest.importorskip("torch")
    from crowdsft.coordinator.rounds.runner import RoundRunner, round_history
    from crowdsft.coordinator.training.lora import smollm2_location
    from crowdsft.coordinator.training.space import build_llm_space
    from crowdsft.datafiles import Record
    from crowdsft.keys import Identity
    from crowdsft.node.state import NodeState
    from crowdsft.node.submit import upload
    from crowdsft.plugins.embedding import minilm_path

    smollm2_location()  # fail loudly (not skip) if the model package is missing
    minilm_path()
    # Two contributors give the same answers on purpose: copy resistance is off here.
    coord = make_coordinator(
        rounds={"groups": 2, "judging_error": 0.0},
        admission={"reject_duplicate_examples": False, "near_duplicate_threshold": 0.0},
    )
    target = coord.config.base_dir / "target.jsonl"
    topics = ["the sea", "a cat", "coffee"]
    target.write_text(
        "".join(
            json.dumps(
                {"prompt": f"Tell me about {t}.", "response": f"Arr, {t} be a fine thing, matey!"}
            )
            + "\n"
            for t in topics
        )
    )
    config = dataclasses.replace(
        coord.config,
        evaluation=dataclasses.replace(
            coord.config.evaluation, target_file=target, max_new_tokens=12
        ),
        training=dataclasses.replace(
            coord.config.training, layers=2, max_steps=2, batch_size=4, max_length=64
        ),
        model=dataclasses.replace(coord.config.model, device="cpu"),
    )
    answers = [
        "Arr, {t} be grand, matey!",
        "Arr, {t} be grand, matey!",
        "{t} is a topic.",
        "{t} is a topic.",
    ]
    with coord.client() as client:
        for k, answer in enumerate(answers):
            ident = Identity.generate()
            records = [
                Record(i + 1, f"Tell me about {t}.", answer.format(t=t))
                for i, t in enumerate(topics)
            ]
            with NodeState(tmp_path / f"n{k}.sqlite3") as st:
                assert upload(client, ident, st, records).accepted == 3
    space = build_llm_space(config)
    summary = RoundRunner(config, coord.coordinator.store, space).run()
    # two groups and the consolidated candidate (on by default) of everything accepted
    assert summary.round_id == 1 and len(summary.scores) == 3
    assert summary.consolidated is not None and len(summary.consolidated) == 4
    assert all(-2.0 <= s <= 0.0 for s in summary.scores)  # L2 between unit vectors
    history = round_history(coord.coordinator.store)
    assert history[0]["candidates"][0]["adapter"] == summary.adapters[0]
    assert (config.adapter_dir / f"{summary.adapters[0]}.safetensors").is_file()


def test_demo_end_to_end_at_small_scale(tmp_path):
    """The README's main job, scaled down: node processes over gRPC, a round with SmolLM2,
    the single-model baseline, the report."""
    pytest.importorskip("torch")
    from crowdsft.demo.run import DemoSettings, run_demo

    lines: list[str] = []
    settings = DemoSettings(
        rounds=1,
        groups=2,
        steps=1,
        contributors_per_kind=1,
        examples_each=2,
        max_new_tokens=6,
        batch_size=4,
    )
    result = run_demo(tmp_path / "demo", settings, lines.append)
    for key in (
        "rounds",
        "multi_model_distance",
        "single_model_distance",
        "reduction_percent",
        "pearson_points_shapley",
        "pearson_points_grounded",
        "report_path",
    ):
        assert key in result
    assert result["valuation_method"] == "permutation"
    assert result["grounded_method"] == "in-run"  # the winner's training credited its data
    assert result["rounds"] == 1 and result["contributors"] == 4 and result["examples"] == 8
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
    assert any("signing and submitting over gRPC" in line for line in lines)
    assert any(line.strip().startswith("base") for line in lines)  # the per-round table
    assert result["nodes_verified_ledger"] == 4  # every node's `node verify` passed
    # held out: the rounds chose on the coordinator's target prompts, the report used others
    from crowdsft.demo.crowd import target_set

    assert result["selection_set"] == result["reported_set"] == 6
    chosen_on = {
        json.loads(line)["prompt"]
        for line in (tmp_path / "demo" / "coordinator" / "target.jsonl").read_text().splitlines()
    }
    everything = {p["prompt"] for p in target_set(n_prompts=12, seed=settings.seed)}
    assert len(chosen_on) == 6 and chosen_on < everything and len(everything) == 12


def test_export_of_smollm2_loads_with_plain_transformers_and_generates(
    make_coordinator, record_winner, tmp_path
):
    """Before: `coordinator export` on the default model (SmolLM2 from its GGUF file) ended in
    "The model is quantized with gguf and is not serializable". Now the merged model is
    written as an ordinary Hugging Face folder: plain transformers loads it, its logits are
    the in-memory model's with the winning adapter, and it generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crowdsft.coordinator.cli import export_model
    from crowdsft.coordinator.training import lora as llm

    coord = make_coordinator(
        training={"layers": 2, "max_steps": 1, "batch_size": 2}, model={"device": "cpu"}
    )
    config = coord.config
    device, dtype = llm.device_and_dtype("cpu")
    model, tok = llm.load_base_model(config.model.base, device, dtype)
    examples = [{"prompt": "Say hi.", "response": "Hi there!"}] * 2
    adapter = llm.fit(model, tok, examples, None, config.training).adapter
    digest = llm.save_adapter(adapter, config.adapter_dir)
    record_winner(coord, digest)
    out = tmp_path / "best-model"
    info = export_model(config, out, adapters=True)  # what `coordinator export` runs
    assert info["lineage"] == [digest] and (out / "adapters").is_dir()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "quantization_config" not in (out / "config.json").read_text()
    ids = tokenizer("Say hi.", return_tensors="pt")
    with torch.no_grad(), llm.with_adapter(model, adapter, config.training) as m:
        expected = m(**ids).logits.float()
        got = loaded(**ids).logits.float()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    new = loaded.generate(**ids, max_new_tokens=5, do_sample=False)
    assert new.shape[1] > ids["input_ids"].shape[1]
    assert tokenizer.decode(new[0][ids["input_ids"].shape[1] :]).strip()
