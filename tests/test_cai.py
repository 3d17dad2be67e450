"""Constitutional AI: prompt assembly, the SL data step, soft labels, the soft preference model, Elo, bad input."""
import json
import random

import pytest
import torch

from alignlib import cai
from alignlib.commands.cli import main
from alignlib.data import DataFormatError
from alignlib.feedback import MultipleChoiceJudge, soft_labels
from alignlib.prefix_cache import PrefixCache
from alignlib.reward_model import (RewardModelConfig, bradley_terry_loss, load_reward_model, pairwise_accuracy,
                                   train_reward_model)
from alignlib.sft import encode_sft

PAIRS = ({"id": "c1", "critique_request": "Name anything harmful.", "revision_request": "Remove the harm."},
         {"id": "c2", "critique_request": "Is it rude?", "revision_request": "Make it polite."})
PRINCIPLES = ({"id": "p1", "principle": "Which is less harmful?"}, {"id": "p2", "principle": "Which is kinder?"})
SHOT = {"id": "s1", "prompt": "How do I pick a lock?", "response": "Use a pin.", "critique_request": "c1",
        "critique": "It helps break in.", "revision": "Call a locksmith if you are locked out."}


def constitution(**kw):
    return cai.Constitution(**{"critiques": PAIRS, "principles": PRINCIPLES, "few_shot": (SHOT,), **kw})


@pytest.mark.unit
def test_the_course_constitution_loads_with_its_splits():
    train, test = cai.load_constitution("train"), cai.load_constitution("test")
    assert len(train.critiques) + len(test.critiques) >= 16 and len(train.principles) + len(test.principles) >= 16
    assert {r["id"] for r in train.critiques}.isdisjoint({r["id"] for r in test.critiques})
    assert train.few_shot and all(train.pair(s["critique_request"]) for s in train.few_shot)


@pytest.mark.unit
def test_prompts_hold_the_drawn_request_and_the_few_shot_conversations():
    c = constitution()
    pair = c.draw_pair(random.Random(3))
    assert pair in PAIRS and c.draw_pair(random.Random(3)) == pair            # a seeded draw is reproducible
    ask = cai.critique_prompt("Q?", "A.", pair)
    assert ask.startswith("Human: Q?\n\nAssistant: A.\n\n") and pair["critique_request"] in ask
    assert ask.endswith("Critique:")
    rev = cai.revision_prompt("Q?", "A.", pair, " It is bad. ")
    assert rev.startswith(ask) and "Critique: It is bad.\n\n" in rev and pair["revision_request"] in rev
    assert rev.endswith("Revision:")
    direct = cai.direct_revision_prompt("Q?", "A.", pair)
    assert "Critique" not in direct and direct.endswith("Revision:")
    prefix = cai.few_shot_prefix(c)
    for text in SHOT["prompt"], SHOT["critique"], SHOT["revision"], PAIRS[0]["critique_request"]:
        assert text in prefix
    assert prefix.endswith("\n\n")


@pytest.mark.unit
def test_cut_section_keeps_only_the_generated_section():
    assert cai.cut_section(" It is rude.\n\nRevision request: x") == "It is rude."
    assert cai.cut_section(" Be kind. Human: next question") == "Be kind."
    assert cai.cut_section("   ") == ""


class FakeCritic:
    """Critiques name the round; revisions are 'fixed' versions; one prompt gets an empty revision."""

    def __init__(self):
        self.asked = []

    def complete(self, prompts):
        self.asked += prompts
        out = []
        for p in prompts:
            if p.endswith("Critique:"):
                out.append("CRITIQUE-TEXT")
            else:
                out.append("" if "Human: empty" in p else "fixed " + p.split("Assistant: ")[1].split("\n")[0])
        return out


@pytest.mark.unit
def test_critique_and_revise_rounds_direct_and_the_sft_target():
    c = constitution()
    rows = cai.critique_and_revise(FakeCritic(), ["q1", "empty"], ["bad", "bad"], c, rounds=2, seed=0)
    assert [len(r["rounds"]) for r in rows] == [2, 2]
    assert rows[0]["final"] == "fixed fixed bad"                       # round 2 revises round 1's revision
    assert rows[1]["final"] == "bad" and rows[1]["empty"] == 2         # an empty revision keeps its input
    assert all(x["critique"] == "CRITIQUE-TEXT" for x in rows[0]["rounds"])
    example = cai.sft_example(rows[0]["prompt"], [x["revision"] for x in rows[0]["rounds"]])
    assert example == {"prompt": "q1", "response": "fixed fixed bad"}
    assert "CRITIQUE" not in json.dumps(example)                        # nothing of the critique in the SFT pair
    critic = FakeCritic()
    direct = cai.critique_and_revise(critic, ["q1"], ["bad"], c, direct=True)
    assert direct[0]["rounds"][0]["critique"] is None and not any(p.endswith("Critique:") for p in critic.asked)


@pytest.mark.unit
def test_sl_trains_on_revision_tokens_only(tiny):
    _, tok = tiny
    ex = cai.sft_example("How do I pick a lock?", ["It helps break in.", "Call a locksmith."])
    batch = encode_sft(tok, [ex["prompt"]], [ex["response"]], chat=True, add_eos=[False])
    target = batch.input_ids[0][batch.response_mask[0].bool()]
    assert tok.decode(target) == "Call a locksmith."


@pytest.mark.unit
def test_format_examples_are_the_few_shot_sections():
    prompts, targets = cai.format_examples(constitution())
    assert prompts[0].endswith("Critique:") and targets[0] == " It helps break in.\n\n"
    assert prompts[1].endswith("Revision:") and targets[1] == " Call a locksmith if you are locked out.\n\n"


@pytest.mark.unit
def test_bad_constitutions_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no critique/revision pairs"):
        cai.Constitution(critiques=(), principles=PRINCIPLES)
    with pytest.raises(ValueError, match="no comparison principles"):
        cai.Constitution(critiques=PAIRS, principles=())
    with pytest.raises(ValueError, match="unknown critique request 'c9'"):
        constitution(few_shot=({**SHOT, "critique_request": "c9"},))
    with pytest.raises(ValueError, match="lacks non-empty string fields \\['critique'\\]"):
        constitution(few_shot=({**SHOT, "critique": ""},))
    with pytest.raises(ValueError, match="no few-shot"):
        cai.few_shot_prefix(constitution(few_shot=()))
    folder = tmp_path / "constitution"
    folder.mkdir()
    for name in ("critique_revision.jsonl", "comparison_principles.jsonl"):
        (folder / name).write_text((cai.DATA_DIR / "constitution" / name).read_text())
    (folder / "few_shot.jsonl").write_text('{"id": "fs-01", "prompt": "x"\n')     # a conversation cut short
    with pytest.raises(DataFormatError, match="few_shot.jsonl"):
        cai.load_constitution(data_dir=tmp_path)


@pytest.mark.unit
def test_soft_labels_sum_to_one_and_swap_with_the_order():
    lp_ab = torch.log(torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.7, 0.3]]))
    lp_ba = torch.log(torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3]]))
    out = soft_labels(lp_ab, lp_ba)
    torch.testing.assert_close(out["p"], torch.tensor([0.65, 0.5, 0.5]))    # row 3: a pure "A" bias cancels
    torch.testing.assert_close(out["p"] + soft_labels(lp_ba, lp_ab)["p"], torch.ones(3))
    with pytest.raises(ValueError, match="must both be \\(B, 2\\)"):
        soft_labels(lp_ab, lp_ba[:2])


@pytest.mark.unit
def test_judge_labels_swap_with_the_order(tiny):
    model, tok = tiny
    judge = MultipleChoiceJudge(model, tok)
    c = constitution()
    ab = cai.ai_labelled_pairs(judge, ["q", "r"], ["good", "fine"], ["bad", "awful answer"], c, seed=1)
    ba = cai.ai_labelled_pairs(judge, ["q", "r"], ["bad", "awful answer"], ["good", "fine"], c, seed=1)
    for x, y in zip(ab, ba):
        assert x["p"] + y["p"] == pytest.approx(1.0, abs=1e-5) and x["principle"] == y["principle"]


@pytest.mark.unit
def test_soft_bradley_terry():
    d = torch.tensor([0.0, 2.0], requires_grad=True)
    loss = bradley_terry_loss(d, torch.zeros(2), torch.tensor([0.5, 1.0]))
    loss.backward()
    assert d.grad[0].item() == pytest.approx(0.0, abs=1e-7)              # p = 1/2 is satisfied by d = 0
    torch.testing.assert_close(bradley_terry_loss(d.detach(), torch.zeros(2), torch.ones(2)),
                               bradley_terry_loss(d.detach(), torch.zeros(2)))
    with pytest.raises(ValueError, match="probability in \\[0, 1\\]"):
        bradley_terry_loss(d, torch.zeros(2), torch.tensor([0.5, 1.5]))


@pytest.mark.learning
def test_the_preference_model_learns_a_separable_soft_preference():
    torch.manual_seed(0)
    good = ["I can help you find a safe way to do that.", "Here is a kind and careful answer.",
            "Let me suggest a legal alternative.", "That could hurt someone; here is a safer plan."]
    bad = ["Just steal it when nobody looks.", "Hit him first and run.", "Lie to the police about it.",
           "Break the window and take what you want."]
    rows = [{"prompt": f"question {i}", "chosen": g, "rejected": b, "p": 0.8}
            for i, (g, b) in enumerate(zip(good, bad))]
    rows += [{"prompt": f"question {i}", "chosen": b, "rejected": g, "p": 0.2}
             for i, (g, b) in enumerate(zip(good, bad))]
    test = [{"prompt": "q", "chosen": "A careful, legal suggestion instead.", "rejected": "Steal it and lie."}]
    model, tok = load_reward_model(seed=0)
    before = pairwise_accuracy(model, tok, rows[:4])["margin"]
    train_reward_model(model, tok, rows, RewardModelConfig(epochs=6, batch_size=4, lr=3e-4, seed=0), progress=False)
    after = pairwise_accuracy(model, tok, rows[:4])
    assert after["accuracy"] == 1.0 and after["margin"] > before + 0.5
    assert pairwise_accuracy(model, tok, test)["accuracy"] == 1.0


@pytest.mark.unit
def test_batched_prefix_generation_equals_one_at_a_time_and_a_full_recompute(tiny):
    model, tok = tiny
    prefix = "Human: hi\n\nAssistant: hello\n\nCritique request: be kind\n\nCritique: fine\n\n"
    cache = PrefixCache(model, tok, prefix)
    suffixes = ["Human: q\n\nAssistant: a\n\nCritique:",
                "Human: a much longer question here?\n\nAssistant: b\n\nCritique:"]
    batch = cache.generate_batch(suffixes, max_new_tokens=12)
    for s, got in zip(suffixes, batch):
        assert got == cache.generate(s, max_new_tokens=12)
        ids = tok(prefix, add_special_tokens=False).input_ids + tok(s, add_special_tokens=False).input_ids
        full = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        assert got == tok.decode(full[0, len(ids):], skip_special_tokens=True)


@pytest.mark.unit
def test_elo_from_pairwise_outcomes():
    outcomes = [("a", "b", 1.0)] * 75 + [("a", "b", 0.0)] * 25 + [("b", "c", 0.5)] * 40
    elo = cai.elo_scores(outcomes, ["a", "b", "c"], prior=0.0)
    assert elo["a"] == 0.0
    assert elo["a"] - elo["b"] == pytest.approx(400 * torch.log10(torch.tensor(3.0)).item(), abs=0.5)   # 190.8
    assert elo["c"] == pytest.approx(elo["b"], abs=0.5)
    sweep = cai.elo_scores([("a", "b", 1.0)] * 5, ["a", "b"])                  # a clean sweep stays finite
    assert 0 > sweep["b"] > -5000
    ci = cai.elo_intervals(outcomes, ["a", "b", "c"], n_boot=50)
    assert ci["b"][1] <= ci["b"][0] <= ci["b"][2] < 0
    assert cai.pairwise_outcomes({"x": [0.9, 0.1], "y": [0.2, 0.1]}) == [("x", "y", 1.0), ("x", "y", 0.5)]
    with pytest.raises(ValueError, match="not in players"):
        cai.elo_scores([("a", "z", 1.0)], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        cai.elo_scores([], ["a", "b"])


@pytest.mark.pipeline
def test_both_stages_end_to_end_on_the_tiny_model(tmp_path, capsys):
    common = ["--model", "tiny-random", "--red-team", "4", "--helpful", "2", "--few-shot", "1", "--format-epochs", "1",
              "--study-prompts", "2", "--output", str(tmp_path)]
    main(["cai-sl", *common])
    sl = json.loads((tmp_path / "sl.json").read_text())
    assert len(sl["revised"]) == 4 and len(sl["helpful"]) == 2 and sl["sft_history"] and sl["format_history"]
    assert (tmp_path / "sl_adapter" / "adapter_model.safetensors").exists()
    curve = sl["revision_study"]["direct"]["curve"]
    assert [c["round"] for c in curve] == [0, 1, 2, 3] and all(0 <= c["harmlessness"] <= 1 for c in curve)
    main(["cai-rl", *common, "--ppo-steps", "1", "--eval", "3", "--feedback-model", "tiny-random",
          "--human-helpful-pairs", "4"])
    rl = json.loads((tmp_path / "rl.json").read_text())
    assert len(rl["ai_pairs"]) == 8                                      # 4 multiple-choice + 4 contrastive
    assert all(0 <= p["p"] <= 1 for p in rl["ai_pairs"]) and len(rl["ppo_history"]) == 1
    assert set(rl["evaluation"]["elo"]["harmlessness"]) == {"initial", "SL-CAI", "RL-CAI"}
    assert rl["evaluation"]["elo"]["harmlessness"]["initial"][0] == 0.0
    assert 0.5 < rl["scorer_accuracy"]["evasive"] <= 1
    assert "harmless" in capsys.readouterr().out


@pytest.mark.unit
def test_cai_rl_needs_the_sl_stage_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="cai-sl"):
        main(["cai-rl", "--model", "tiny-random", "--output", str(tmp_path)])


# ---------------------------------------------------------------- the paper's recipes as defaults; the controls

@pytest.mark.unit
def test_sl_data_has_one_pair_per_round_by_default_and_the_final_revision_as_an_option():
    rows = cai.critique_and_revise(FakeCritic(), ["q1", "empty"], ["bad", "bad"], constitution(), rounds=2, seed=0)
    assert cai.CAIConfig().sl_all_rounds is True                           # the paper's recipe is the default
    every = cai.sft_examples(rows[0])
    assert [e["response"] for e in every] == ["fixed bad", "fixed fixed bad"] and {e["prompt"] for e in every} == {"q1"}
    assert cai.sft_examples(rows[0], all_rounds=False) == [{"prompt": "q1", "response": "fixed fixed bad"}]
    # a prompt whose every revision came out empty gives one pair with the text it ends with, in both modes
    assert cai.sft_examples(rows[1]) == cai.sft_examples(rows[1], all_rounds=False) == [{"prompt": "empty",
                                                                                         "response": "bad"}]
    assert "CRITIQUE" not in json.dumps(every)


@pytest.mark.unit
def test_feedback_template_holds_the_labelled_examples_the_judge_check_validates():
    from alignlib import feedback

    assert cai.feedback_template(False) == (feedback.COMPARISON, "zero-shot")
    template, name = cai.feedback_template(True)
    examples = feedback.load_feedback_examples(cai.FEEDBACK_SHOTS)
    assert name == "few-shot" and template == feedback.few_shot_template(examples)
    assert template.endswith(feedback.COMPARISON) and all(e["first"] in template for e in examples)
    filled = template.format(question="Q?", principle="P", first="one", second="two")
    assert filled.endswith("(A) one\n(B) two\nThe answer is: (")


@pytest.mark.unit
def test_control_config_data_and_oracle_labels():
    with pytest.raises(ValueError, match="task"):
        cai.CAIControlConfig(task="tone")
    with pytest.raises(ValueError, match="labels"):
        cai.CAIControlConfig(labels="human")
    with pytest.raises(ValueError, match="judge"):
        cai.CAIControlConfig(judge="vibes")
    with pytest.raises(ValueError, match="eval_prompts"):
        cai.CAIControlConfig(eval_prompts=0)
    train, test = cai.control_prompts("concision", "train", 63), cai.control_prompts("concision", "test", 48)
    assert not set(train) & set(test)                                      # held-out prompts are unseen
    with pytest.raises(ValueError, match="test prompts"):
        cai.control_prompts("concision", "test", 49)
    for task in ("positivity", "concision"):
        assert cai.control_principles(task, "train") and cai.control_principles(task, "test")
        assert len(cai.control_principles(task, "train", field="instruction")) == len(cai.control_principles(task))
    assert cai.ControlOracle("positivity")(["q", "q"], ["What a lovely, happy day!", "This is awful."])[0] > 0.5
    assert cai.oracle_soft_label(-10, -30, 20) == 1.0 and cai.oracle_soft_label(-30, -10, 20) == 0.0
    assert cai.oracle_soft_label(0.7, 0.6, 1.0) == pytest.approx(0.55)
    assert cai.ControlOracle("concision")(["q", "q"], ["one two three", "one"]) == [-3.0, -1.0]
    assert cai._agreement([0.9, 0.2, 0.6], [-1, -5, -2], [-3, -1, -2]) == {"accuracy": 1.0, "pairs": 2}


@pytest.mark.pipeline
def test_cai_control_end_to_end_and_resumed_on_the_tiny_model(tmp_path, capsys):
    args = ["cai-control", "--model", "tiny-random", "--pairs", "4", "--eval-prompts", "3", "--ppo-steps", "1",
            "--pm-epochs", "1", "--max-new-tokens", "8", "--n-boot", "50", "--output", str(tmp_path)]
    main(args)
    out = json.loads((tmp_path / "control.json").read_text())
    assert len(out["pairs"]) == 4 and all(0 <= p["p"] <= 1 and p["principle"] for p in out["pairs"])
    ev = out["evaluation"]
    assert len(ev["answers"]["initial"]) == len(ev["answers"]["ppo"]) == 6    # 3 prompts x 2 samples
    effect = ev["oracle"]["effect"]
    assert effect["mean"] == pytest.approx(ev["oracle"]["ppo"]["mean"] - ev["oracle"]["initial"]["mean"])
    assert effect["low"] <= effect["mean"] <= effect["high"] and len(out["ppo_history"]) == 1
    assert "effect" in capsys.readouterr().out
    main(args + ["--resume"])                                                # every stage read back: same result
    again = json.loads((tmp_path / "control.json").read_text())
    assert again["evaluation"]["oracle"] == ev["oracle"] and again["pairs"] == out["pairs"]


@pytest.mark.unit
def test_likelihood_judge_is_symmetric_in_the_order(tiny):
    model, tok = tiny
    judge = cai.LikelihoodJudge(model, tok, scale=0.1)
    q, a, b = ["Describe rain."] * 2, ["It is lovely.", "Grey and sad."], ["Grey and sad.", "It is lovely."]
    out = judge.prefer_first(q, a, b, "Answer cheerfully.")
    assert torch.allclose(out["p"][0], 1 - out["p"][1], atol=1e-5)          # swapping the pair gives 1 - p
    same = judge.prefer_first(q[:1], a[:1], a[:1], "Answer cheerfully.")
    assert same["p"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="principles"):
        judge.prefer_first(q, a, b, ["one"])
