"""Checks of exercise 01 (the pieces of PPO for language models, and a beta chosen by experiment), 16 points.

Each check compares the student's function with ``alignlib.ppo`` on seeded random inputs laid out as in
alignlib (left padding and prompt, a contiguous response, right padding), or tests an invariant that the
reference satisfies too. Inputs are cloned before each call, so a function that edits its arguments in
place cannot spoil the comparison. ``clipped_policy_loss`` may return the loss alone or a tuple whose first
element is the loss (the reference returns ``(loss, stats)``).
"""
from __future__ import annotations

import math

import torch

from alignlib import ppo as ref
from alignlib.logprobs import masked_mean

from alignlib import tiny_lab

from . import as_number, assert_close, check, generator, get_function, rollout_masks, run_experiment

SHAPES = [(2, 6), (4, 10), (1, 3), (3, 12)]  # (B, T) of the random batches

# Response masks written by hand: left padding (the prompt's column 0 at least), right padding, a one-token
# response, and a response that runs to the last column.
FIXED_MASK = torch.tensor([
    [0, 0, 0, 1, 1, 1, 0, 0],   # left and right padding
    [0, 1, 1, 1, 1, 1, 1, 1],   # the response ends in the last column
    [0, 0, 0, 0, 0, 1, 0, 0],   # a one-token response, right padding
    [0, 0, 1, 1, 1, 1, 1, 0],   # one column of right padding
])


def describe_mask(mask: torch.Tensor) -> str:
    """A mask as rows of 0/1 digits, for error messages."""
    return "[" + ", ".join("".join(str(int(v)) for v in row) for row in mask) + "]"


def masks(gen: torch.Generator):
    """The hand-written mask, then random response masks of each shape in ``SHAPES`` (int64, (B, T))."""
    yield FIXED_MASK.clone()
    for batch, length in SHAPES:
        yield rollout_masks(batch, length, gen)[1]


def random_logprobs(shape, gen: torch.Generator) -> torch.Tensor:
    """Negative numbers like per-token log-probs of sampled tokens."""
    return -4 * torch.rand(shape, generator=gen) - 0.01


def as_pair(out, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute_gae`` must return a pair (advantages, returns)."""
    assert isinstance(out, (tuple, list)) and len(out) == 2, \
        f"{what} should return a pair (advantages, returns), got {type(out).__name__}"
    return out[0], out[1]


def loss_of(out, what: str) -> torch.Tensor:
    """The loss from what ``clipped_policy_loss`` returned: a tensor, or a tuple whose first element is one."""
    if isinstance(out, (tuple, list)):
        assert len(out) >= 1, f"{what} returned an empty tuple; return the loss or (loss, stats)"
        out = out[0]
    assert isinstance(out, torch.Tensor), \
        f"{what} should return the loss as a torch.Tensor (or a tuple (loss, stats)), got {type(out).__name__}"
    assert out.dim() == 0, f"{what} should return a scalar (0-dim) loss, got shape {tuple(out.shape)}"
    return out


# ---------------------------------------------------------------- kl_penalty (3 points)

@check(points=1, function="kl_penalty")
def kl_matches_reference(ns):
    """matches the reference, k1 (the default) and k3"""
    student = get_function(ns, "kl_penalty")
    gen = generator(100)
    for batch, length in SHAPES:
        logp = random_logprobs((batch, length), gen)
        ref_logp = random_logprobs((batch, length), gen)
        assert_close(student(logp.clone(), ref_logp.clone()), ref.kl_penalty(logp, ref_logp, "k1"),
                     f"kl_penalty with the default estimator (k1 = logp - ref_logp) on (B, T) = {(batch, length)}")
        for estimator in ("k1", "k3"):
            assert_close(student(logp.clone(), ref_logp.clone(), estimator),
                         ref.kl_penalty(logp, ref_logp, estimator),
                         f"kl_penalty with estimator={estimator!r} on (B, T) = {(batch, length)}")


@check(points=1, function="kl_penalty")
def k3_is_nonnegative(ns):
    """k3 is >= 0 everywhere and 0 where pi = rho"""
    student = get_function(ns, "kl_penalty")
    gen = generator(110)
    logp = random_logprobs((6, 20), gen)
    ref_logp = logp + 6 * torch.randn(6, 20, generator=gen)  # log-ratios from about -20 to 20
    ref_logp[:, ::4] = logp[:, ::4]                            # and some exactly 0
    out = student(logp.clone(), ref_logp.clone(), "k3")
    assert isinstance(out, torch.Tensor), f"expected a torch.Tensor, got {type(out).__name__}"
    assert out.shape == logp.shape, f"k3 has shape {tuple(out.shape)}, expected {tuple(logp.shape)}"
    out = out.detach().double()
    assert torch.isfinite(out).all(), "k3 returned non-finite values for log-ratios of size ~20"
    worst = out.min().item()
    assert worst >= -1e-5, f"k3 = (r - 1) - log r is never negative (log r <= r - 1), but one value is {worst:.4g}"
    equal = out[:, ::4].abs().max().item()
    assert equal <= 1e-6, f"where logp == ref_logp the policy and the reference agree, so k3 must be 0; got {equal:.4g}"


@check(points=1, function="kl_penalty")
def kl_sample_means(ns):
    """k1 and k3 average to KL(pi || rho) on tokens sampled from pi"""
    student = get_function(ns, "kl_penalty")
    pi = torch.tensor([0.4, 0.3, 0.2, 0.1])
    rho = torch.tensor([0.1, 0.2, 0.3, 0.4])
    exact = (pi * (pi / rho).log()).sum().item()
    tokens = torch.multinomial(pi, 64 * 128, replacement=True, generator=generator(120)).view(64, 128)
    logp, ref_logp = pi.log()[tokens], rho.log()[tokens]  # (64, 128) log-probs of the sampled tokens
    for estimator in ("k1", "k3"):
        expected = ref.kl_penalty(logp, ref_logp, estimator)
        tolerance = 5 * expected.std().item() / math.sqrt(expected.numel())  # 5 standard errors
        out = student(logp.clone(), ref_logp.clone(), estimator)
        assert isinstance(out, torch.Tensor) and out.shape == logp.shape, \
            f"kl_penalty should return a (B, T) tensor of shape {tuple(logp.shape)}"
        mean = out.double().mean().item()
        assert abs(mean - exact) <= tolerance, \
            (f"{estimator} averaged over {tokens.numel()} tokens sampled from pi = {pi.tolist()} is {mean:.4f}, but "
             f"KL(pi || rho) with rho = {rho.tolist()} is {exact:.4f} (sampling error allows +-{tolerance:.3f})")


# ---------------------------------------------------------------- shaped_rewards (3 points)

@check(points=1, function="shaped_rewards")
def shaped_matches_reference(ns):
    """matches the reference on padded batches"""
    student = get_function(ns, "shaped_rewards")
    gen = generator(200)
    for mask in masks(gen):
        batch, length = mask.shape
        scores = 2 * torch.randn(batch, generator=gen)
        kl = torch.randn(batch, length, generator=gen)
        for kl_coef in (0.05, 0.5):
            assert_close(student(scores.clone(), kl.clone(), mask.clone(), kl_coef),
                         ref.shaped_rewards(scores, kl, mask, kl_coef),
                         f"shaped_rewards with kl_coef={kl_coef} and mask {describe_mask(mask)}")


@check(points=1, function="shaped_rewards")
def shaped_score_on_last_token(ns):
    """the score sits on the last response token of each row"""
    student = get_function(ns, "shaped_rewards")
    mask = FIXED_MASK.clone()
    batch, length = mask.shape
    scores = torch.arange(1.0, batch + 1)  # 1, 2, 3, 4: a different score per row
    last = [max(c for c in range(length) if mask[b, c]) for b in range(batch)]
    expected = torch.zeros(batch, length)
    expected[torch.arange(batch), torch.tensor(last)] = scores
    for what, m in (("int64", mask), ("float", mask.float())):
        out = student(scores.clone(), torch.zeros(batch, length), m.clone(), 0.1)
        assert_close(out, expected, f"shaped_rewards with KL = 0 and a {what} mask {describe_mask(mask)} (the "
                     f"score R goes on the last 1 of each row, columns {last}, and every other entry is 0)")


@check(points=1, function="shaped_rewards")
def shaped_kl_on_response_only(ns):
    """-beta * KL on response tokens, zero off the mask"""
    student = get_function(ns, "shaped_rewards")
    gen = generator(220)
    mask = FIXED_MASK.clone()
    batch, length = mask.shape
    kl = torch.randn(batch, length, generator=gen)
    kl_with_padding = torch.where(mask.bool(), kl, 100 * torch.randn(batch, length, generator=gen))
    beta = 0.2
    out = student(torch.zeros(batch), kl_with_padding, mask.clone(), beta)
    assert_close(out, -beta * kl * mask, f"shaped_rewards with score 0, kl_coef={beta}, large KL values off the "
                 f"mask (they must not count) and mask {describe_mask(mask)}")


# ---------------------------------------------------------------- compute_gae (4 points)

GAE_SETTINGS = [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.95, 0.0)]  # (gamma, lam)


@check(points=2, function="compute_gae")
def gae_matches_reference(ns):
    """matches the reference on padded batches, several gamma and lam"""
    student = get_function(ns, "compute_gae")
    gen = generator(300)
    for mask in masks(gen):
        batch, length = mask.shape
        rewards = torch.randn(batch, length, generator=gen) * mask  # zero off the mask, as shaped_rewards gives
        values = torch.randn(batch, length, generator=gen)          # the value head fills every column
        for gamma, lam in GAE_SETTINGS:
            adv, ret = as_pair(student(rewards.clone(), values.clone(), mask.clone(), gamma, lam), "compute_gae")
            ref_adv, ref_ret = ref.compute_gae(rewards, values, mask, gamma, lam)
            where = f"gamma={gamma}, lam={lam}, mask {describe_mask(mask)}"
            assert_close(adv, ref_adv, f"compute_gae advantages with {where}", atol=1e-4, rtol=1e-4)
            assert_close(ret, ref_ret, f"compute_gae returns with {where}", atol=1e-4, rtol=1e-4)


@check(points=1, function="compute_gae")
def gae_reward_to_go(ns):
    """gamma = lam = 1 gives returns = rewards-to-go"""
    student = get_function(ns, "compute_gae")
    gen = generator(310)
    for mask in masks(gen):
        batch, length = mask.shape
        rewards = torch.randn(batch, length, generator=gen) * mask
        values = torch.randn(batch, length, generator=gen)
        to_go = rewards.flip(-1).cumsum(-1).flip(-1) * mask  # sum of the rewards from t to the response's end
        adv, ret = as_pair(student(rewards.clone(), values.clone(), mask.clone(), 1.0, 1.0), "compute_gae")
        where = f"gamma = lam = 1 and mask {describe_mask(mask)}"
        assert_close(ret, to_go, f"compute_gae returns with {where} (G_t is the sum of the rewards from t to the "
                     f"end of the response; nothing is bootstrapped after it)", atol=1e-4, rtol=1e-4)
        assert_close(adv, (to_go - values) * mask, f"compute_gae advantages with {where} (A_t = G_t - V(s_t))",
                     atol=1e-4, rtol=1e-4)


@check(points=1, function="compute_gae")
def gae_ignores_off_mask(ns):
    """rewards and values off the mask change nothing"""
    student = get_function(ns, "compute_gae")
    gen = generator(320)
    mask = FIXED_MASK.clone()
    batch, length = mask.shape
    rewards = torch.randn(batch, length, generator=gen) * mask
    values = torch.randn(batch, length, generator=gen) * mask
    noisy_rewards = torch.where(mask.bool(), rewards, 10 * torch.randn(batch, length, generator=gen))
    noisy_values = torch.where(mask.bool(), values, 10 * torch.randn(batch, length, generator=gen))
    for gamma, lam in GAE_SETTINGS:
        clean = as_pair(student(rewards.clone(), values.clone(), mask.clone(), gamma, lam), "compute_gae")
        noisy = as_pair(student(noisy_rewards.clone(), noisy_values.clone(), mask.clone(), gamma, lam), "compute_gae")
        where = f"gamma={gamma}, lam={lam}, mask {describe_mask(mask)}"
        for name, a, b in (("advantages", noisy[0], clean[0]), ("returns", noisy[1], clean[1])):
            assert isinstance(b, torch.Tensor) and b.shape == mask.shape, \
                f"compute_gae {name} should be a tensor of shape {tuple(mask.shape)}"
            off = b.detach()[~mask.bool()].abs().max().item()
            assert off == 0, f"compute_gae {name} must be 0 off the mask; got {off:.4g} with {where}"
            assert_close(a, b, f"compute_gae {name} after changing rewards and values off the mask (the "
                         f"padding and the prompt are not part of the episode) with {where}", atol=1e-5)


# ---------------------------------------------------------------- clipped_policy_loss (4 points)

@check(points=1, function="clipped_policy_loss")
def clip_matches_reference(ns):
    """matches the reference on padded batches"""
    student = get_function(ns, "clipped_policy_loss")
    gen = generator(400)
    for mask in masks(gen):
        batch, length = mask.shape
        old_logp = random_logprobs((batch, length), gen)
        logp = old_logp + 0.4 * torch.randn(batch, length, generator=gen)  # ratios from about 0.3 to 3
        advantages = torch.randn(batch, length, generator=gen)
        expected = ref.clipped_policy_loss(logp, old_logp, advantages, mask, 0.2)[0]
        out = student(logp.clone(), old_logp.clone(), advantages.clone(), mask.clone())
        assert_close(loss_of(out, "clipped_policy_loss"), expected,
                     f"clipped_policy_loss with the default cliprange (0.2) and mask {describe_mask(mask)}")
        for cliprange in (0.1, 0.3):
            expected = ref.clipped_policy_loss(logp, old_logp, advantages, mask, cliprange)[0]
            out = student(logp.clone(), old_logp.clone(), advantages.clone(), mask.clone(), cliprange)
            assert_close(loss_of(out, "clipped_policy_loss"), expected,
                         f"clipped_policy_loss with cliprange={cliprange} and mask {describe_mask(mask)}")


# One row of tokens: (ratio pi/pi_old, advantage, mask, gradient is zero, why). With eps = 0.2 the trust region
# is [0.8, 1.2]; outside it the clipped term wins when the ratio has moved in the direction A favours.
GRADIENT_CASES = [
    (2.0, 3.0, 0, True, "padding"),
    (1.5, 1.0, 1, True, "ratio 1.5 above 1+eps with A > 0: clipped"),
    (0.5, -1.0, 1, True, "ratio 0.5 below 1-eps with A < 0: clipped"),
    (1.5, -1.0, 1, False, "ratio 1.5 above 1+eps with A < 0: the unclipped term is the larger loss"),
    (0.5, 1.0, 1, False, "ratio 0.5 below 1-eps with A > 0: the unclipped term is the larger loss"),
    (1.1, 2.0, 1, False, "ratio 1.1 inside the trust region, A > 0"),
    (0.9, -2.0, 1, False, "ratio 0.9 inside the trust region, A < 0"),
    (0.7, 0.5, 0, True, "padding"),
]


@check(points=2, function="clipped_policy_loss")
def clip_gradient(ns):
    """gradient is zero outside the trust region, nonzero inside"""
    student = get_function(ns, "clipped_policy_loss")
    ratio = torch.tensor([[c[0] for c in GRADIENT_CASES]])
    advantages = torch.tensor([[c[1] for c in GRADIENT_CASES]])
    mask = torch.tensor([[c[2] for c in GRADIENT_CASES]])
    old_logp = torch.full_like(ratio, -2.0)
    logp = (old_logp + ratio.log()).requires_grad_()
    loss = loss_of(student(logp, old_logp.clone(), advantages.clone(), mask.clone(), 0.2), "clipped_policy_loss")
    assert loss.requires_grad, "the loss carries no gradient to logp (was something detached or turned into a float?)"
    (grad,) = torch.autograd.grad(loss, logp)
    n = mask.sum().item()
    for t, (r, a, _, zero, why) in enumerate(GRADIENT_CASES):
        expected = 0.0 if zero else -a * r / n  # d(-A w / n) / d log pi = -A w / n
        got = grad[0, t].item()
        if zero:
            assert abs(got) <= 1e-7, f"token {t} ({why}): d loss / d logp should be 0, got {got:.4g}"
        else:
            assert abs(got - expected) <= 1e-5, \
                (f"token {t} ({why}): d loss / d logp should be -A * ratio / (number of response tokens) = "
                 f"{expected:.4g}, got {got:.4g}")


@check(points=1, function="clipped_policy_loss")
def clip_on_policy(ns):
    """at ratio 1 the loss is -mean(A), with the policy gradient"""
    student = get_function(ns, "clipped_policy_loss")
    gen = generator(420)
    mask = FIXED_MASK.clone()
    old_logp = random_logprobs(mask.shape, gen)
    advantages = torch.randn(mask.shape, generator=gen)
    logp = old_logp.clone().requires_grad_()
    loss = loss_of(student(logp, old_logp.clone(), advantages.clone(), mask.clone(), 0.2), "clipped_policy_loss")
    assert_close(loss, -masked_mean(advantages, mask),
                 "clipped_policy_loss with logp == old_logp (ratio 1 everywhere: the loss is minus the mean "
                 "advantage over the response tokens of the whole batch)")
    assert loss.requires_grad, "the loss carries no gradient to logp (was something detached or turned into a float?)"
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close(grad, -advantages * mask / mask.sum(),
                 "d loss / d logp at ratio 1 (-A_t / number of response tokens on the mask, 0 off it)")


# ---------------------------------------------------------------- the graded experiment (2 points)

KL_TARGET, KL_TOLERANCE = 0.5, 0.02   # nats


@check(points=2, function="choose_beta")
def beta_reaches_kl_target(ns):
    """the chosen beta puts the KL-regularised optimum at KL(pi* || rho) = 0.5 +- 0.02 nats"""
    beta = as_number(run_experiment(ns, "choose_beta"), "choose_beta()")
    assert beta > 0, f"choose_beta() returned {beta}; beta must be > 0"
    kl = tiny_lab.tilted_optimum(beta)["kl"]
    assert abs(kl - KL_TARGET) <= KL_TOLERANCE, \
        (f"at beta = {beta:.4g} the optimum's KL is {kl:.3f} nats, not within {KL_TOLERANCE} of {KL_TARGET} "
         "(smaller beta, larger KL)")
