import math
import string

import pytest
import torch

from alignlib.ppo import (AdaptiveKLController, PPOConfig, PPOTrainer, clipped_policy_loss, clipped_value_loss,
                          compute_gae, kl_penalty, shaped_rewards, whiten)


def gae_reference(rewards, values, gamma, lam):
    """The textbook recursion on one unpadded episode: A_t = sum_k (gamma lam)^k delta_{t+k}."""
    T = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < T else 0.0) - values[t] for t in range(T)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(T - t)) for t in range(T)]


@pytest.mark.unit
def test_gae_matches_plain_recursion_under_padding():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    # row 0: response in columns 2..8; row 1: columns 4..6 then right padding; row 2: columns 0..8
    mask = torch.zeros(3, 9)
    mask[0, 2:] = 1
    mask[1, 4:7] = 1
    mask[2, :] = 1
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for b in range(3):
        cols = mask[b].nonzero().squeeze(-1)
        expected = gae_reference(rewards[b, cols].tolist(), values[b, cols].tolist(), 0.9, 0.8)
        assert torch.allclose(adv[b, cols], torch.tensor(expected), atol=1e-5)
        assert torch.allclose(ret[b, cols], adv[b, cols] + values[b, cols])
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


@pytest.mark.unit
def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.3, 0.5, 0.7]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.ones(1, 3)) and torch.allclose(adv, 1 - values)


@pytest.mark.unit
def test_clipped_objective_has_zero_gradient_outside_the_trust_region():
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    old = torch.zeros(1, 4)
    # ratios 1.5 (A>0, clipped), 1.1 (A>0, inside), 0.5 (A<0, clipped), 0.9 (A<0, inside)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5, 0.9]])).requires_grad_()
    loss, stats = clipped_policy_loss(logp, old, adv, torch.ones(1, 4), cliprange=0.2)
    loss.backward()
    grad = logp.grad[0]
    assert grad[0] == 0 and grad[2] == 0, "clipped tokens must not push the ratio further"
    assert grad[1] < 0 and grad[3] > 0, "inside the region, A>0 raises and A<0 lowers log pi"
    assert stats["policy/clipfrac"] == pytest.approx(0.5)


@pytest.mark.unit
def test_clipped_value_loss_keeps_the_worse_of_the_two():
    values = torch.tensor([[2.0, 0.1]], requires_grad=True)
    old = torch.zeros(1, 2)
    returns = torch.tensor([[0.0, 0.1]])
    loss, stats = clipped_value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: unclipped (2-0)^2=4 vs clipped (0.2-0)^2=0.04 -> 4; token 1: both 0
    assert loss.item() == pytest.approx(0.5 * (4 + 0) / 2)
    assert stats["value/clipfrac"] == 0.0


@pytest.mark.unit
def test_kl_estimators_on_known_distributions():
    """E_{x~p}[k1] = E_{x~p}[k3] = KL(p || q); k3 is never negative."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    exact = (p * (p / q).log()).sum()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[x], q.log()[x]
    k1, k3 = kl_penalty(logp, logq, "k1"), kl_penalty(logp, logq, "k3")
    assert k1.mean().item() == pytest.approx(exact.item(), abs=0.01)
    assert k3.mean().item() == pytest.approx(exact.item(), abs=0.01)
    assert (k3 >= 0).all() and (k1 < 0).any()
    assert torch.all(kl_penalty(logp, logp, "k3") == 0)
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, logq, "k2")


@pytest.mark.unit
def test_whitening_and_shaped_rewards():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g) * 5 + 3
    mask = torch.ones(4, 6)
    mask[0, :2] = 0
    w = whiten(x, mask)
    sel = w[mask.bool()]
    assert sel.mean().abs() < 1e-5 and (sel.var(unbiased=False) - 1).abs() < 1e-4
    assert torch.all(w[~mask.bool()] == 0)
    kl = torch.ones(2, 4)
    m = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]]).float()
    r = shaped_rewards(torch.tensor([1.0, 2.0]), kl, m, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[0, -0.1, 0.9, 0], [0, 0, -0.1, 1.9]]))


@pytest.mark.unit
def test_adaptive_kl_controller_moves_toward_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(current_kl=12.0, n_samples=10)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    ctl2 = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl2.update(current_kl=3.0, n_samples=10)
    assert ctl2.value < 0.1


@pytest.mark.unit
def test_config_validation_and_presets():
    assert PPOConfig.preset("lab-gpu").adaptive_kl
    with pytest.raises(ValueError, match="preset"):
        PPOConfig.preset("tpu")
    with pytest.raises(ValueError, match="mini_batch_size"):
        PPOConfig(batch_size=4, mini_batch_size=8)
    with pytest.raises(ValueError, match="temperature"):
        PPOConfig(temperature=float("nan"))
    with pytest.raises(ValueError, match=r"steps \(0\)"):
        PPOConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        PPOConfig(lr=float("inf"))


def lowercase_share(prompts, responses):
    """Reward: the share of lowercase ASCII letters in the response (~10% for the untrained byte model)."""
    return torch.tensor([sum(c in string.ascii_lowercase for c in r) / max(len(r), 1) for r in responses])


@pytest.mark.learning
@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_ppo_raises_reward_on_tiny_model(value_model, fresh_tiny):
    model, tok = fresh_tiny(lora={"r": 8, "lora_alpha": 16})
    cfg = PPOConfig(steps=30, batch_size=16, mini_batch_size=8, ppo_epochs=4, max_new_tokens=8, lr=1e-2,
                    kl_coef=0.01, chat=False, value_model=value_model, seed=0)
    history = PPOTrainer(model, tok, lowercase_share, ["a", "b", "c", "hello", "xyz"], cfg).train(progress=False)
    first = sum(h["reward/mean"] for h in history[:5]) / 5
    last = sum(h["reward/mean"] for h in history[-5:]) / 5
    assert last > first + 0.1, f"reward did not rise: {first:.3f} -> {last:.3f}"
    assert history[-1]["kl/ref"] > 0, "the policy must have moved away from the reference"
    for key in ("kl/ref", "policy/clipfrac", "policy/approxkl", "loss/value", "value/explained_var",
                "policy/entropy", "time/generate_s", "time/train_s", "memory/peak_mb"):
        assert key in history[-1] and math.isfinite(history[-1][key]) or key == "value/explained_var"


@pytest.mark.unit
def test_nan_reward_stops_training_before_the_update(tiny_lora):
    model, tok = tiny_lora
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = PPOTrainer(model, tok, lambda p, r: torch.full((len(r),), float("nan")), ["a"],
                         PPOConfig(steps=1, batch_size=2, mini_batch_size=2, max_new_tokens=4, chat=False))
    with pytest.raises(ValueError, match="non-finite rewards"):   # caught where the reward is read
        trainer.train(progress=False)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.unit
def test_full_model_needs_a_reference(tiny):
    model, tok = tiny
    with pytest.raises(TypeError, match="ref_model"):
        PPOTrainer(model, tok, lowercase_share, ["a"], PPOConfig(batch_size=2, mini_batch_size=2))


_X, _Y, _S = torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(3)


@pytest.mark.unit
@pytest.mark.parametrize("call, message", [
    (lambda: kl_penalty(_X, _Y), r"kl_penalty: logp has shape \(2, 4\) but ref_logp has shape \(2, 3\)"),
    (lambda: shaped_rewards(torch.zeros(2), _X, torch.ones(2, 3), 0.1),
     r"shaped_rewards: kl has shape \(2, 4\) but mask has shape \(2, 3\)"),
    (lambda: shaped_rewards(_S, _X, torch.ones(2, 4), 0.1),
     r"shaped_rewards: scores has shape \(3,\) but kl has shape \(2, 4\)"),
    (lambda: compute_gae(_X, _Y, torch.ones(2, 4)), r"compute_gae: rewards has shape \(2, 4\) but values has shape "
                                                    r"\(2, 3\)"),
    (lambda: compute_gae(_S, _S, _S), r"compute_gae: rewards has shape \(3,\); .* must be \(B, T\)"),
    (lambda: whiten(_X, torch.ones(2, 3)), r"whiten: values has shape \(2, 4\) but mask has shape \(2, 3\)"),
    (lambda: clipped_policy_loss(_X, _X, _Y, torch.ones(2, 4)),
     r"clipped_policy_loss: logp has shape \(2, 4\) but advantages has shape \(2, 3\)"),
    (lambda: clipped_value_loss(_X, _X, _X, torch.ones(4)),
     r"clipped_value_loss: values has shape \(2, 4\) but mask has shape \(4,\)"),
])
def test_mismatched_shapes_name_both_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
