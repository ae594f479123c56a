"""The trainer and the LLM space on a tiny random causal LM built from a config (no
downloads): training lowers the loss, only response tokens carry loss, weights change the
loss, an adapter round-trips through its file, and a round picks the closest candidate."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from crowdsft.coordinator.training import lora as llm  # noqa: E402
from crowdsft.coordinator.training.space import Candidate, GenerationConfig, LLMSpace  # noqa: E402
from crowdsft.plugins.evaluation import L2  # noqa: E402
from crowdsft.plugins.grouping import RandomGrouping  # noqa: E402
from crowdsft.plugins.influence import Uniform  # noqa: E402
from crowdsft.plugins.reward import RankReward  # noqa: E402
from crowdsft.plugins.selection import BestWithGuard  # noqa: E402
from crowdsft.tournament import Strategies, Tournament  # noqa: E402

TRAIN = llm.TrainingConfig(
    rank=8,
    alpha=16,
    learning_rate=2e-2,
    epochs=30,
    batch_size=4,
    max_length=64,
    seed=1,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
EXAMPLES = [
    {"prompt": "say yes", "response": "yes yes yes"},
    {"prompt": "agree?", "response": "yes yes yes"},
    {"prompt": "what is two plus two", "response": "four", "system": "be brief"},
]


def test_labels_cover_the_response_only(tiny):
    _, tok = tiny
    batch = llm.encode(tok, EXAMPLES, max_length=64)
    for i, ex in enumerate(EXAMPLES):
        labelled = [t for t in batch.labels[i].tolist() if t != -100]
        text = tok.decode(labelled)
        assert text.startswith(ex["response"])
        prompt_len = len(tok(llm.prompt_text(tok, ex), add_special_tokens=False)["input_ids"])
        assert (batch.labels[i, :prompt_len] == -100).all()
        assert batch.attention_mask[i].sum() > prompt_len


CONVERSATION = {
    "system": "be brief",
    "history": [
        {"user": "hello there", "assistant": "hi"},
        {"user": "say no", "assistant": "no no"},
    ],
    "prompt": "now say yes",
    "response": "yes yes yes",
}


def test_a_conversation_is_context_and_only_its_last_answer_carries_loss(tiny):
    _, tok = tiny
    batch = llm.encode(tok, [CONVERSATION], max_length=128)
    rendered = llm.prompt_text(tok, CONVERSATION)
    for text in ("be brief", "hello there", "hi", "say no", "no no", "now say yes"):
        assert text in rendered
    assert rendered.index("hello there") < rendered.index("say no") < rendered.index("now say")
    labelled = tok.decode([t for t in batch.labels[0].tolist() if t != -100])
    assert labelled.startswith("yes yes yes") and "no no" not in labelled


def test_a_long_conversation_loses_its_oldest_turns_not_its_answer(tiny):
    _, tok = tiny
    full = llm.encode(tok, [CONVERSATION], max_length=512)
    length = int(full.attention_mask[0].sum())
    # one token short: the oldest turn goes, whole; the system prompt and the rest stay
    cut = llm.encode(tok, [CONVERSATION], max_length=length - 1)
    later = CONVERSATION | {"history": CONVERSATION["history"][1:]}
    expected = llm.encode(tok, [later], max_length=512)
    n = int(expected.attention_mask[0].sum())
    assert n < length and int(cut.attention_mask[0].sum()) == n
    assert cut.input_ids[0, :n].tolist() == expected.input_ids[0, :n].tolist()
    assert cut.labels[0, :n].tolist() == expected.labels[0, :n].tolist()
    assert "be brief" in tok.decode(cut.input_ids[0, :n]) and "hello there" not in tok.decode(
        cut.input_ids[0, :n]
    )
    # too short for even the last exchange: every earlier turn goes, then the end is cut,
    # as for a single-turn example
    single = {k: CONVERSATION[k] for k in ("system", "prompt", "response")}
    whole = llm.encode(tok, [single], max_length=512)
    m = int(whole.attention_mask[0].sum())
    assert llm.encode(tok, [CONVERSATION], max_length=m - 2).input_ids[0].tolist() == (
        whole.input_ids[0, : m - 2].tolist()
    )


def test_only_response_tokens_carry_loss(tiny):
    model, tok = tiny
    batch = llm.encode(tok, EXAMPLES, max_length=64)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    base = llm.weighted_loss(logits, batch.labels, batch.weights)
    # Scramble the logits wherever the next token is not a response token: same loss.
    next_is_label = torch.zeros_like(batch.labels, dtype=torch.bool)
    next_is_label[:, :-1] = batch.labels[:, 1:] != -100
    noisy = torch.where(next_is_label.unsqueeze(-1), logits, torch.randn_like(logits) * 50)
    assert llm.weighted_loss(noisy, batch.labels, batch.weights) == pytest.approx(float(base))
    # ... and scrambling a response position changes it.
    changed = logits.clone()
    pos = int(next_is_label[0].nonzero()[0])
    changed[0, pos] = torch.randn_like(changed[0, pos]) * 50
    assert float(llm.weighted_loss(changed, batch.labels, batch.weights)) != pytest.approx(
        float(base)
    )


def test_batch_loss_computes_logits_only_where_labels_are_and_matches_the_full_loss(tiny):
    model, tok = tiny
    batch = llm.encode(tok, EXAMPLES, [1.0, 2.0, 0.5], max_length=64)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        full = float(llm.weighted_loss(logits, batch.labels, batch.weights))
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, _i, out: rows.append(out.shape[:-1])
    )
    try:
        with torch.no_grad():
            assert float(llm.batch_loss(model, batch)) == pytest.approx(full, rel=1e-5)
    finally:
        hook.remove()
    labelled = int((batch.labels[:, 1:] != -100).sum())
    assert rows == [torch.Size([labelled])] and labelled < batch.labels.numel() // 2


def test_batch_loss_through_a_lora_model_gives_the_full_loss_and_its_gradients(tiny):
    from peft import get_peft_model

    model, tok = tiny
    cut = dict(EXAMPLES[0], response="yes " * 80)  # its response is cut away entirely
    batch = llm.encode(tok, [*EXAMPLES, cut], [1.0, 2.0, 0.5, 3.0], max_length=24)
    assert (batch.labels[3] == -100).all()
    peft_model = get_peft_model(model, llm.lora_config(TRAIN, model))
    try:
        lora = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
        for p in lora:  # B starts at zero: give the adapter an effect
            torch.nn.init.normal_(p, std=0.05)
        out = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        full = llm.weighted_loss(out.logits, batch.labels, batch.weights)
        g_full = torch.autograd.grad(full, lora)
        fast = llm.batch_loss(peft_model, batch)
        g_fast = torch.autograd.grad(fast, lora)
        assert fast.item() == pytest.approx(full.item(), rel=1e-5)
        for a, b in zip(g_fast, g_full, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finally:
        peft_model.unload()


def test_batch_loss_keeps_a_models_logit_soft_cap(tiny):
    model, tok = tiny
    batch = llm.encode(tok, EXAMPLES, max_length=64)

    class Capped(torch.nn.Module):  # a model whose forward transforms the head's output
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = 3.0 * torch.tanh(out.logits / 3.0)
            return out

    capped = Capped(model)
    with torch.no_grad():
        out = capped(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        full = float(llm.weighted_loss(out.logits, batch.labels, batch.weights))
        assert float(llm.batch_loss(capped, batch)) == pytest.approx(full, rel=1e-5)


def test_weights_change_the_loss(tiny):
    model, tok = tiny
    batch = llm.encode(tok, EXAMPLES, max_length=64)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    equal = llm.weighted_loss(logits, batch.labels, torch.tensor([1.0, 1.0, 1.0]))
    skewed = llm.weighted_loss(logits, batch.labels, torch.tensor([10.0, 1.0, 1.0]))
    only_last = llm.weighted_loss(logits, batch.labels, torch.tensor([0.0, 0.0, 1.0]))
    alone = llm.encode(tok, EXAMPLES[2:], max_length=64)
    with torch.no_grad():
        alone_logits = model(input_ids=alone.input_ids, attention_mask=alone.attention_mask).logits
    assert float(equal) != pytest.approx(float(skewed))
    assert float(only_last) == pytest.approx(
        float(llm.weighted_loss(alone_logits, alone.labels, alone.weights)), rel=1e-4
    )


def test_training_lowers_the_loss_and_leaves_the_base_alone(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before = llm.example_losses(model, tok, EXAMPLES)
    result = llm.fit(model, tok, EXAMPLES, None, TRAIN)
    assert result.steps == 30 and result.losses[-1] < result.losses[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with llm.with_adapter(model, result.adapter, TRAIN) as tuned:
        loss_after = llm.example_losses(tuned, tok, EXAMPLES)
    assert loss_after < 0.5 * loss_before
    assert llm.example_losses(model, tok, EXAMPLES) == pytest.approx(loss_before)


def test_fit_is_seeded(tiny):
    model, tok = tiny
    cfg = dataclasses.replace(TRAIN, epochs=2)
    a = llm.fit(model, tok, EXAMPLES, None, cfg)
    b = llm.fit(model, tok, EXAMPLES, None, cfg)
    assert a.losses == b.losses
    assert all(torch.equal(a.adapter[k], b.adapter[k]) for k in a.adapter)


def test_adapter_file_round_trip(tiny, tmp_path):
    model, tok = tiny
    result = llm.fit(model, tok, EXAMPLES, None, dataclasses.replace(TRAIN, epochs=3))
    digest = llm.save_adapter(result.adapter, tmp_path)
    assert (tmp_path / f"{digest}.safetensors").is_file()
    assert llm.save_adapter(result.adapter, tmp_path) == digest  # content-addressed
    loaded = llm.load_adapter(tmp_path, digest)
    batch = llm.encode(tok, EXAMPLES, max_length=64)
    with torch.no_grad():
        with llm.with_adapter(model, result.adapter, TRAIN) as m:
            a = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with llm.with_adapter(model, loaded, TRAIN) as m:
            b = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(a, b)
    path = tmp_path / f"{digest}.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="corrupt"):
        llm.load_adapter(tmp_path, digest)


def test_generation_is_batched_and_deterministic(tiny):
    model, tok = tiny
    prompts = [{"prompt": "say yes"}, {"prompt": "what is two plus two", "system": "be brief"}]
    a = llm.generate(model, tok, prompts, max_new_tokens=8, batch_size=2)
    b = llm.generate(model, tok, prompts, max_new_tokens=8, batch_size=1)
    assert a == b and len(a) == 2
    s1 = llm.generate(model, tok, prompts, max_new_tokens=8, greedy=False, seed=3)
    s2 = llm.generate(model, tok, prompts, max_new_tokens=8, greedy=False, seed=3)
    assert s1 == s2


def test_a_round_picks_the_candidate_closest_to_the_target(tiny, tmp_path, char_embedder):
    model, tok = tiny
    yes = [{"prompt": p, "response": "yes yes yes"} for p in ("say yes", "agree?", "ok?")]
    no = [{"prompt": p, "response": "no no no"} for p in ("say no", "refuse?", "nope?")]
    data = [yes, yes, no, no]  # contributors 0, 1 agree with the expert; 2, 3 do not
    space = LLMSpace(
        model,
        tok,
        char_embedder,
        data,
        eval_prompts=[{"prompt": "say yes"}, {"prompt": "agree?"}],
        target_responses=["yes yes yes", "yes yes yes"],
        evaluation=L2(),
        training=TRAIN,
        adapter_dir=tmp_path,
        generation=GenerationConfig(max_new_tokens=6, batch_size=2),
    )

    class Fixed(RandomGrouping):
        def group(self, points, round_index, rounds, rng):
            return [np.array([2, 3]), np.array([0, 1])]

    engine = Tournament(
        Strategies(Fixed(2), BestWithGuard(error=0.0), RankReward(), Uniform()), rounds=1
    )
    state = engine.start(space, Candidate())
    new, record, candidates = engine.step(space, state, np.random.default_rng(0))
    assert record.updated and record.winner == 1  # the group that trained on "yes yes yes"
    assert record.scores[1] > record.scores[0]
    assert record.scores[1] == pytest.approx(max(record.scores))
    assert new.base == candidates[1] and new.base.adapter is not None
    assert new.points.tolist() == [3.0, 3.0, 2.0, 2.0]
    texts = space.last_generations[candidates[1].lineage]
    assert all("yes" in t for t in texts)
    # The winner becomes the next base: the next round trains on top of it.
    space.materialise(new.base)
    assert space.chain == (candidates[1].adapter,)


def test_a_conversation_in_a_target_file_keeps_its_turns(tmp_path):
    """Target and held-out files take conversations too: scoring asks the whole
    conversation, and credit is measured on its last answer after its turns."""
    import json

    from crowdsft.coordinator.training.space import _target
    from crowdsft.datafiles import read_records

    path = tmp_path / "target.jsonl"
    chat = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": "now this"},
    ]
    path.write_text(json.dumps({"messages": chat}) + "\n")
    (record,) = read_records(path)
    turns = [{"user": "hi", "assistant": "hello"}]
    assert _target(record) == {"prompt": "and now?", "response": "now this", "history": turns}
    assert _target(record, with_response=False) == {"prompt": "and now?", "history": turns}


def test_a_blank_system_prompt_is_no_system_turn(tiny):
    _, tok = tiny
    bare = llm.prompt_text(tok, {"prompt": "hi"})
    assert llm.prompt_text(tok, {"prompt": "hi", "system": "   "}) == bare
    assert llm.prompt_text(tok, {"prompt": "hi", "system": ""}) == bare
    assert llm.prompt_text(tok, {"prompt": "hi", "system": "be brief"}) != bare


# -- the faster paths: packed training rows and decoding with a shared prompt -----------------

SHARED = [
    {"prompt": "write a reddit comment.", "response": r}
    for r in ("yes yes yes", "the cat sat on the mat", "no", "hello there, four")
]


def _lora_model(model, seed=0):
    from peft import get_peft_model

    peft_model = get_peft_model(model, llm.lora_config(TRAIN, model))
    torch.manual_seed(seed)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:  # B starts at zero: give the adapter an effect
            torch.nn.init.normal_(p, std=0.05)
    return peft_model


@pytest.mark.parametrize(
    "examples, weights, max_length",
    [
        (SHARED, None, 64),  # one prompt: the whole chat template is a shared prefix
        (EXAMPLES, [1.0, 2.0, 0.5], 64),  # different prompts and a system prompt
        ([*SHARED, CONVERSATION, EXAMPLES[2]], [1, 2, 3, 4, 5, 6], 128),
        ([*EXAMPLES, dict(EXAMPLES[0], response="yes " * 80)], [1.0, 2.0, 0.5, 3.0], 24),
        ([SHARED[0], SHARED[0]], [1.0, 3.0], 64),  # identical examples: all prefix
    ],
)
def test_a_packed_batch_gives_the_padded_loss_and_gradients(tiny, examples, weights, max_length):
    model, tok = tiny
    rows = llm.tokenize(tok, examples, max_length)
    peft_model = _lora_model(model)
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        padded = llm.batch_loss(peft_model, llm.pad(rows, tok.pad_token_id, weights))
        g_padded = torch.autograd.grad(padded, params, allow_unused=True)
        packed_batch = llm.pack_rows(rows, weights)
        assert llm.packs(peft_model, packed_batch.input_ids.shape[1])
        packed = llm.packed_loss(peft_model, packed_batch)
        g_packed = torch.autograd.grad(packed, params, allow_unused=True)
        assert packed.item() == pytest.approx(padded.item(), rel=1e-5, abs=1e-7)
        for a, b in zip(g_packed, g_padded, strict=True):
            if a is None or b is None:
                assert a is None and b is None
                continue
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finally:
        peft_model.unload()


def test_a_packed_batch_holds_the_shared_prefix_once_and_no_padding(tiny):
    _, tok = tiny
    rows = llm.tokenize(tok, SHARED, 64)
    prompt = len(tok(llm.prompt_text(tok, SHARED[0]), add_special_tokens=False)["input_ids"])
    packed = llm.pack_rows(rows)
    assert packed.prefix >= prompt  # at least the whole rendered prompt
    lengths = [len(ids) for ids, _ in rows]
    assert packed.tokens == sum(lengths)
    assert packed.input_ids.shape[1] == packed.prefix + sum(n - packed.prefix for n in lengths)
    assert packed.input_ids.shape[1] < len(rows) * max(lengths) // 2
    # every labelled token is predicted once, by its example
    labelled = [sum(t != -100 for t in lab[1:]) for _, lab in rows]
    assert sorted(packed.owner.tolist()) == [i for i, n in enumerate(labelled) for _ in range(n)]
    # a suffix never sees another example's tokens
    seg_of = {}
    start = packed.prefix
    for i, n in enumerate(lengths):
        for p in range(start, start + n - packed.prefix):
            seg_of[p] = i
        start += n - packed.prefix
    allowed = packed.allowed
    for q, i in seg_of.items():
        for k, j in seg_of.items():
            if i != j:
                assert not allowed[q, k]


def test_packed_and_padded_training_give_the_same_adapter(tiny):
    model, tok = tiny
    cfg = dataclasses.replace(TRAIN, epochs=3, batch_size=2)
    data = [*SHARED, *EXAMPLES]
    a = llm.fit(model, tok, data, [1, 2, 1, 1, 3, 1, 1], cfg, pack=True)
    b = llm.fit(model, tok, data, [1, 2, 1, 1, 3, 1, 1], cfg, pack=False)
    assert a.steps == b.steps and a.tokens == b.tokens
    assert a.losses == pytest.approx(b.losses, rel=1e-4)
    # Adam divides by the gradients' running magnitude, so float rounding in the two
    # summation orders shows most in weights whose gradients are near zero
    for k in a.adapter:
        torch.testing.assert_close(a.adapter[k], b.adapter[k], rtol=1e-2, atol=2e-4)


def test_a_model_that_cannot_take_a_packed_row_trains_padded(tiny):
    model, _ = tiny
    assert llm.packs(model, 100)
    model.config.sliding_window = 16  # a window the block mask would override
    try:
        assert not llm.packs(model, 100) and llm.packs(model, 16)
    finally:
        model.config.sliding_window = None


def test_greedy_decoding_gives_what_transformers_generate_gives(tiny):
    model, tok = tiny
    prompts = [
        {"prompt": "say yes"},
        {"prompt": "what is two plus two", "system": "be brief"},
        {"prompt": "hello there the cat sat on the mat"},
    ]
    ours = llm.generate(model, tok, prompts, max_new_tokens=10, batch_size=3)
    enc = tok(
        [llm.prompt_text(tok, p) for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    with torch.no_grad():
        ids = model.generate(
            **enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id
        )
    new = ids[:, enc["input_ids"].shape[1] :]
    assert ours == [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


@pytest.mark.parametrize("greedy", [True, False])
def test_one_prompt_asked_many_times_is_read_once_with_the_same_answers(tiny, greedy):
    model, tok = tiny
    prompts = [{"prompt": "write a reddit comment."}] * 6
    calls = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        kw = dict(max_new_tokens=8, batch_size=6, greedy=greedy, seed=5, temperature=1.0)
        shared = llm.generate(model, tok, prompts, share_prompt=True, **kw)
        first = list(calls)
        calls.clear()
        alone = llm.generate(model, tok, prompts, share_prompt=False, **kw)
    finally:
        hook.remove()
    assert shared == alone and len(set(shared)) > (1 if not greedy else 0)
    assert first[0][0] == 1 and calls[0][0] == 6  # the prompt read by one row, not six


def test_sampling_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(20_000, 1)
    gen = torch.Generator().manual_seed(0)
    drawn = llm.sample_tokens(logits, 0.8, gen)
    freq = torch.bincount(drawn, minlength=5).double() / len(drawn)
    expected = torch.softmax(logits[0].double() / 0.8, dim=-1)
    assert (freq - expected).abs().max() < 0.01
    assert freq[4] == 0  # a token of negligible probability is never drawn
    again = llm.sample_tokens(logits, 0.8, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)


def test_the_frozen_front_layers_run_once_and_give_the_same_training(tiny):
    """LoRA on the last layer only: the first layer's output is computed once per example
    for the whole fit, and the training is the one the full model gives."""
    model, tok = tiny
    cfg = dataclasses.replace(TRAIN, epochs=3, batch_size=3, layers=1)
    data = [*SHARED, *EXAMPLES, CONVERSATION]
    first = model.model.layers[0]
    calls = []
    hook = first.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        skipped = llm.fit(model, tok, data, None, cfg)
        runs_skipped = len(calls)
        calls.clear()
        full = llm.fit(model, tok, data, None, cfg, frozen_front=False)
        runs_full = len(calls)
    finally:
        hook.remove()
    steps = full.steps
    assert runs_full == steps and runs_skipped == 1  # one chunk of 8 examples, once
    assert skipped.losses == pytest.approx(full.losses, rel=1e-4)
    for k in full.adapter:
        torch.testing.assert_close(skipped.adapter[k], full.adapter[k], rtol=1e-2, atol=2e-4)
    assert list(model.model.layers) == [first, model.model.layers[1]]  # put back


def test_each_round_samples_its_answers_afresh(tiny, tmp_path, char_embedder):
    """With sampled answers, a round's scores (its starting model's too) come from samples
    of that round: the starting model does not keep the best-of-several score that made it
    win. Greedy answers need no new samples."""
    from crowdsft.testing.tiny import tiny_model

    # A model of its own: the shared one may have been trained by earlier tests until its
    # answers no longer vary, and then fresh samples could not show.
    model, tok = tiny_model(seed=0, corpus=["say yes", "yes yes yes", "no no no"])
    sampled = GenerationConfig(max_new_tokens=4, batch_size=4, greedy=False, seed=7, samples=4)
    space = LLMSpace(
        model,
        tok,
        char_embedder,
        [],
        eval_prompts=[{"prompt": "say yes"}, {"prompt": "say yes"}],
        target_responses=["yes yes yes", "yes yes"],
        evaluation=L2(),
        training=TRAIN,
        adapter_dir=tmp_path,
        generation=sampled,
    )
    assert len(space.eval_prompts) == 1 and len(space.answer_job().prompts) == 4
    space.begin_round(1)
    first = space.score([Candidate()])[0]
    one = space.last_generations[()]
    space.begin_round(1)  # the same round again (a resumed one): the same samples
    assert space.has_score(Candidate()) and space.score([Candidate()])[0] == first
    seed_one = space.generation.seed
    space.begin_round(2)
    assert space.generation.seed != seed_one
    assert not space.has_score(Candidate())
    space.score([Candidate()])
    assert space.last_generations[()] != one
    greedy = LLMSpace(
        model,
        tok,
        char_embedder,
        [],
        eval_prompts=[{"prompt": "say yes"}],
        target_responses=["yes"],
        evaluation=L2(),
        training=TRAIN,
        adapter_dir=tmp_path,
    )
    greedy.score([Candidate()])
    greedy.begin_round(5)
    assert greedy.has_score(Candidate()) and greedy.generation.seed == 0


def test_fine_tuning_and_answering_report_their_progress(tiny):
    from crowdsft import progress

    model, tok = tiny
    seen = []
    with progress.reporting_to(lambda *a: seen.append(a)):
        llm.fit(model, tok, EXAMPLES, None, dataclasses.replace(TRAIN, epochs=2))
        llm.generate(model, tok, [{"prompt": "hi"}] * 5, max_new_tokens=2, batch_size=2)
    fits = [s for s in seen if s[0].startswith("fine-tuning")]
    answers = [s for s in seen if s[0].startswith("answering")]
    total = 2 * len(EXAMPLES)
    assert fits[0][1:] == (0, total, "examples") and fits[-1][1:] == (total, total, "examples")
    assert [s[1] for s in fits] == sorted(s[1] for s in fits) and len(fits) > 3
    steps = 2 * -(-len(EXAMPLES) // TRAIN.batch_size)
    assert fits[0][0].endswith(f"x 2 epochs, {steps} steps")
    assert [s[1] for s in answers] == [0, 2, 4, 5] and answers[-1][2] == 5
