"""Faults that used to pass silently: a reward of the wrong shape or NaN, and weights that diverge."""
from __future__ import annotations

import pytest
import torch

from alignlib.models import load_model
from alignlib.rewards import score
from alignlib.utils import guarded_step, seed_everything

PROMPTS = ["Hello", "Name a colour.", "What is 2 + 2?", "Say something nice."]


@pytest.mark.unit
def test_score_accepts_a_finite_vector_and_names_every_other_output():
    assert score(lambda p, r: torch.ones(len(r), dtype=torch.float64), ["a", "b"], ["x", "y"]).dtype == torch.float32
    cases = [(lambda p, r: torch.ones(1), ValueError, r"shape \(1,\) for 2 responses"),
             (lambda p, r: torch.ones(2, 1), ValueError, r"shape \(2, 1\)"),
             (lambda p, r: [1.0, 2.0], TypeError, "returned list"),
             (lambda p, r: torch.tensor([1.0, float("nan")]), ValueError, r"non-finite rewards \(at responses \[1\]")]
    for fn, error, message in cases:
        with pytest.raises(error, match=message):
            score(fn, ["a", "b"], ["x", "y"])


@pytest.mark.unit
@pytest.mark.parametrize("method", ["ppo", "rrhf", "raft"])
def test_every_trainer_rejects_a_reward_broadcast_over_the_batch(method):
    from alignlib.ppo import PPOConfig, PPOTrainer
    from alignlib.raft import RAFTConfig, RAFTTrainer
    from alignlib.rrhf import RRHFConfig, RRHFTrainer

    seed_everything(0)
    model, tok = load_model("tiny-random", lora=True)
    one = lambda prompts, responses: torch.ones(1)  # noqa: E731
    if method == "ppo":
        trainer = PPOTrainer(model, tok, one, PROMPTS,
                             PPOConfig(steps=1, batch_size=4, mini_batch_size=2, max_new_tokens=4))
    elif method == "rrhf":
        trainer = RRHFTrainer(model, tok, one, [{"prompt": p} for p in PROMPTS],
                              RRHFConfig(steps=1, batch_size=2, policy_samples=1, initial_samples=1, max_new_tokens=4))
    else:
        trainer = RAFTTrainer(model, tok, one, PROMPTS, RAFTConfig(stages=1, batch_size=2, k=2, max_new_tokens=4))
    with pytest.raises(ValueError, match="one reward per response"):
        trainer.train(progress=False)


@pytest.mark.unit
def test_a_diverging_ppo_run_stops_instead_of_finishing_with_broken_weights():
    from alignlib.ppo import PPOConfig, PPOTrainer

    seed_everything(0)
    model, tok = load_model("tiny-random", lora=True)
    config = PPOConfig(steps=3, batch_size=4, mini_batch_size=2, max_new_tokens=4, lr=1e30, value_head_lr=1e30,
                       max_grad_norm=0.0)
    trainer = PPOTrainer(model, tok, lambda p, r: torch.randn(len(r)), PROMPTS, config)
    with pytest.raises(FloatingPointError, match="not finite|non-finite"):
        trainer.train(progress=False)


@pytest.mark.unit
def test_guarded_step_checks_the_gradient_before_and_the_weights_after():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(FloatingPointError, match="weights were not updated"):
        guarded_step(opt, max_grad_norm=1.0)
    assert torch.equal(w.detach(), torch.ones(3))                 # true: nothing moved
    w.grad = torch.tensor([1.0, 0.0, 0.0])
    assert guarded_step(opt) == pytest.approx(1.0) and w[0].item() == 0.0
    big = torch.optim.SGD([w], lr=float("inf"))
    w.grad = torch.tensor([1.0, 0.0, 0.0])
    with pytest.raises(FloatingPointError, match="last\\s+checkpoint"):
        guarded_step(big)


@pytest.mark.unit
@pytest.mark.parametrize("make, message", [
    (lambda: __import__("alignlib.rrhf", fromlist=["x"]).RRHFConfig(temperature=float("nan")), "temperature"),
    (lambda: __import__("alignlib.rrhf", fromlist=["x"]).RRHFConfig(max_new_tokens=0), "max_new_tokens"),
    (lambda: __import__("alignlib.raft", fromlist=["x"]).RAFTConfig(lr=float("inf")), "lr must be"),
    (lambda: __import__("alignlib.raft", fromlist=["x"]).RAFTConfig(max_new_tokens=2.5), "max_new_tokens"),
])
def test_configs_are_checked_up_front(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.unit
def test_a_bare_string_is_not_taken_for_a_list_of_prompts():
    from alignlib.ppo import PPOConfig, PPOTrainer

    model, tok = load_model("tiny-random", lora=True)
    with pytest.raises(TypeError, match="one string"):
        PPOTrainer(model, tok, lambda p, r: torch.zeros(len(r)), "Hello there", PPOConfig(steps=1))


@pytest.mark.unit
def test_a_diverging_reward_model_stops_instead_of_finishing_with_broken_weights():
    from alignlib import reward_model as rm

    model, tok = rm.load_reward_model("tiny-random")
    pairs = [{"prompt": "Say hi.", "chosen": "Hello there!", "rejected": "No."}] * 8
    config = rm.RewardModelConfig(model="tiny-random", lr=1e30, epochs=5, batch_size=4, max_length=64,
                                  warmup_ratio=0.0)
    with pytest.raises(FloatingPointError, match="not finite|non-finite"):
        rm.train_reward_model(model, tok, pairs, config, progress=False)


@pytest.mark.unit
@pytest.mark.parametrize("out, error, message", [
    (torch.tensor([1 + 2j, 3 + 0j]), TypeError, "reward function bad returned complex rewards"),
    (torch.tensor([1.0, float("inf")]), ValueError, "bad returned non-finite rewards"),
    (torch.ones(3), ValueError, r"bad returned shape \(3,\) for 2 responses"),
])
def test_score_refuses_complex_non_finite_and_misshapen_rewards_by_name(out, error, message):
    from alignlib.rewards import WeightedSum

    def bad(prompts, responses):
        return out

    with pytest.raises(error, match=message):
        score(bad, ["a", "b"], ["x", "y"])
    with pytest.raises(error, match=message):                  # a part of a weighted sum, named by its key
        WeightedSum({"bad": bad, "ok": lambda p, r: torch.ones(len(r))}, [0.5, 0.5])(["a", "b"], ["x", "y"])


@pytest.mark.unit
def test_pairwise_accuracy_refuses_complex_and_non_numeric_rewards():
    from alignlib.reward_model import pairwise_accuracy

    pairs = [{"prompt": "p", "chosen": "good", "rejected": "bad"}] * 2
    with pytest.raises(TypeError, match="complex rewards"):
        pairwise_accuracy(lambda p, r: torch.full((len(r),), 1j), None, pairs)
    with pytest.raises(TypeError, match="returned list of non-numbers"):
        pairwise_accuracy(lambda p, r: ["high"] * len(r), None, pairs)
    assert pairwise_accuracy(lambda p, r: [float(len(x)) for x in r], None, pairs)["accuracy"] == 1.0


@pytest.mark.unit
@pytest.mark.parametrize("call, message", [
    (lambda: __import__("alignlib.data", fromlist=["x"]).load_prompts("movie_openings", "test", n=-1),
     r"n must be None \(all\) or an integer >= 0, got -1"),
    (lambda: __import__("alignlib.data", fromlist=["x"]).load_prompts("movie_openings", "test", n=True),
     "got True"),
    (lambda: __import__("alignlib.data", fromlist=["x"]).load_task_prompts("course:movie_openings", "test", -2),
     "n must be None"),
    (lambda: __import__("alignlib.cai", fromlist=["x"]).CAIConfig(helpful=-1), "helpful must be an integer >= 0"),
    (lambda: __import__("alignlib.cai", fromlist=["x"]).CAIConfig(study_prompts=-1), "study_prompts must be"),
    (lambda: __import__("alignlib.cai", fromlist=["x"]).CAIConfig(eval_red_team=-1), "eval_red_team must be an "
                                                                                       "integer >= 1"),
    (lambda: __import__("alignlib.cai", fromlist=["x"]).CAIConfig(human_helpful_pairs=-1), "human_helpful_pairs"),
])
def test_negative_and_boolean_counts_are_refused_by_the_library(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.unit
@pytest.mark.parametrize("argv, flag, least", [
    (["cai-sl", "--helpful", "-1"], "--helpful", 0), (["cai-sl", "--study-prompts", "-1"], "--study-prompts", 0),
    (["cai-rl", "--eval", "-1"], "--eval", 1), (["cai-rl", "--human-helpful-pairs", "-1"], "--human-helpful-pairs", 0),
    (["tour", "--prompts", "-1"], "--prompts", 1), (["tour", "--prompts", "0"], "--prompts", 1),
])
def test_the_parser_refuses_negative_counts_with_a_usage_line(argv, flag, least, capsys):
    from alignlib.commands.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert f"argument {flag}: must be an integer >= {least}, got '{argv[-1]}'" in capsys.readouterr().err


@pytest.mark.unit
@pytest.mark.parametrize("command", ["soups", "cai-sl", "cai-rl", "self-align", "bench", "peer-bench", "gpu-check",
                                     "method-bench", "ppo-check"])
@pytest.mark.parametrize("threads", ["-1", "0"])
def test_every_threads_flag_refuses_non_positive_counts_and_names_the_cores(command, threads, capsys):
    import os

    from alignlib.commands.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--threads", threads])
    assert f"argument --threads: must be an integer >= 1, got '{threads}'; this machine has {os.cpu_count()} cores" \
        in capsys.readouterr().err


@pytest.mark.unit
def test_set_threads_checks_before_torch_does():
    import os

    from alignlib.utils import set_threads

    before = torch.get_num_threads()
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=f"threads must be an integer >= 1, got {bad!r}; this machine has "
                                             f"{os.cpu_count()} cores"):
            set_threads(bad)
    assert set_threads(before) == before == torch.get_num_threads()


@pytest.mark.unit
def test_configs_carrying_top_k_or_top_p_are_checked():
    from types import SimpleNamespace

    from alignlib.utils import check_sampling_fields

    check_sampling_fields(SimpleNamespace(top_k=0, top_p=1.0))
    for fields, message in (({"top_p": float("nan")}, "top_p"), ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k"),
                            ({"top_k": None}, "top_k")):
        with pytest.raises(ValueError, match=message):
            check_sampling_fields(SimpleNamespace(**fields))
