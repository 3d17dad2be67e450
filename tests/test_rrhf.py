"""RRHF: the ranking loss against a double loop, per-query pairs, exact chunked gradients, learning."""
import string

import pytest
import torch

from alignlib.rrhf import (RRHFConfig, RRHFTrainer, as_queries, best_response_loss, candidate_scores,
                           preference_accuracy, rank_loss, rrhf_loss)
from alignlib.sft import encode_sft


def double_loop_rank_loss(scores, rewards):
    total = 0.0
    for q in range(scores.shape[0]):
        for i in range(scores.shape[1]):
            for j in range(scores.shape[1]):
                if rewards[q, i] < rewards[q, j]:
                    total += max(0.0, float(scores[q, i] - scores[q, j]))
    return total


@pytest.mark.unit
@pytest.mark.parametrize("shape", [(1, 2), (3, 4), (2, 7), (5, 1)])
def test_rank_loss_matches_a_double_loop(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    scores = torch.randn(shape, generator=gen)
    rewards = torch.randint(0, 3, shape, generator=gen).float()  # ties happen: they form no pair
    assert rank_loss(scores, rewards).item() == pytest.approx(double_loop_rank_loss(scores, rewards), abs=1e-5)


@pytest.mark.unit
def test_rank_loss_is_zero_when_scores_are_ordered_like_rewards():
    rewards = torch.randn(4, 5)
    scores = 2 * rewards - 1  # same order
    assert rank_loss(scores, rewards).item() == 0.0
    assert rank_loss(-scores, rewards).item() > 0


@pytest.mark.unit
def test_batch_of_two_queries_is_the_sum_of_single_queries():
    gen = torch.Generator().manual_seed(0)
    scores, rewards = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    nll = torch.rand(2, 4, generator=gen)
    both, _ = rrhf_loss(scores, nll, rewards)
    singles = sum(rrhf_loss(scores[q:q + 1], nll[q:q + 1], rewards[q:q + 1])[0] for q in range(2))
    assert torch.allclose(both, singles)
    # a flattened batch (the reference code's pairs across queries) would differ
    flat = rank_loss(scores.view(1, -1), rewards.view(1, -1))
    assert not torch.allclose(flat, rank_loss(scores, rewards))


@pytest.mark.unit
def test_valid_mask_drops_missing_candidates_and_best_response_loss():
    scores = torch.tensor([[0.0, 1.0, 5.0]])
    rewards = torch.tensor([[1.0, 0.0, -1.0]])
    valid = torch.tensor([[True, True, False]])
    assert rank_loss(scores, rewards, valid).item() == pytest.approx(1.0)  # only (1 worse than 0): 1 - 0
    nll = torch.tensor([[0.3, 0.7, 0.1]])
    assert best_response_loss(nll, rewards).item() == pytest.approx(0.3)
    assert best_response_loss(nll, torch.tensor([[0.0, 0.0, 2.0]]), valid).item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="Q, k"):
        rank_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="at least one valid"):
        best_response_loss(nll, rewards, torch.zeros(1, 3, dtype=torch.bool))


@pytest.mark.unit
def test_chunked_backward_gives_the_same_gradient(tiny_lora):
    model, tok = tiny_lora
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so every LoRA weight gets a gradient
            torch.nn.init.normal_(p, std=0.05)
    trainer = RRHFTrainer(model, tok, lambda p, r: torch.zeros(len(r)), ["a"], RRHFConfig(chat=False))
    batch = encode_sft(tok, ["ab"] * 3 + ["xyz"] * 3, ["hello", "hi", "hey there", "no", "yes", "maybe so"],
                       chat=False)
    rewards = torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.2, 0.4]])
    grads, stats = [], []
    for chunk in (None, 1, 4):
        trainer.config.chunk_size = chunk
        model.zero_grad()
        stats.append(trainer.backward(batch, rewards, n_queries=2))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert stats[0] == pytest.approx(stats[1]) and stats[0] == pytest.approx(stats[2])
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-5, rtol=1e-4)
    assert grads[0].abs().max() > 1e-3


@pytest.mark.unit
def test_queries_from_preference_rows_and_bad_input(tiny):
    model, tok = tiny
    qs = as_queries([{"prompt": "p", "chosen": "c", "rejected": "r"}, "q2"])
    assert qs[0].responses == ["c", "r"] and qs[1].responses == []
    with pytest.raises(ValueError, match="same number"):
        RRHFTrainer(model, tok, lambda p, r: torch.zeros(len(r)), qs, RRHFConfig(initial_samples=0))
    with pytest.raises(TypeError, match="LoRA"):
        RRHFTrainer(model, tok, lambda p, r: torch.zeros(len(r)), ["a"], RRHFConfig())
    with pytest.raises(ValueError, match="non-empty"):
        as_queries([])


@pytest.mark.unit
def test_policy_as_reward_model_accuracy(tiny):
    """Margins are p(chosen) - p(rejected), each scored alone (batching and padding change nothing)."""
    model, tok = tiny
    pairs = [{"prompt": "a", "chosen": "bbbb", "rejected": "zq"}, {"prompt": "cde", "chosen": "dd", "rejected": "x"},
             {"prompt": "hello", "chosen": "a longer answer", "rejected": "no"}]
    out = preference_accuracy(model, tok, pairs, chat=False, batch_size=2)
    with torch.no_grad():
        def p(prompt, response):
            return candidate_scores(model, encode_sft(tok, [prompt], [response], chat=False))[0].item()
        expected = torch.tensor([p(r["prompt"], r["chosen"]) - p(r["prompt"], r["rejected"]) for r in pairs])
    assert torch.allclose(out["margins"], expected, atol=1e-4)
    assert out["accuracy"] == pytest.approx((expected > 0).float().mean().item())


def lowercase_share(prompts, responses):
    return torch.tensor([sum(c in string.ascii_lowercase for c in r) / max(len(r), 1) for r in responses])


@pytest.mark.learning
def test_rrhf_raises_the_reward_of_the_policy_samples(tiny_lora):
    model, tok = tiny_lora
    cfg = RRHFConfig(steps=30, batch_size=4, policy_samples=3, initial_samples=1, max_new_tokens=8, lr=1e-2,
                     chat=False, chunk_size=8, seed=2)
    history = RRHFTrainer(model, tok, lowercase_share, ["a", "b", "c", "hello", "xyz"], cfg).train(progress=False)
    rewards = [h["reward/mean"] for h in history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert history[-1]["kl/ref"] > 0
    assert all(k in history[0] for k in ("loss/rank", "loss/ft", "rank/accuracy", "reward/initial", "ppl/ref"))
