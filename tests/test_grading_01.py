"""Grading of exercise 01 (PPO): the solution scores full marks, the exercise zero, and wrong implementations
lose points on exactly the checks that should catch them."""
from __future__ import annotations

import pytest

from grading_helpers import (assert_full_marks, assert_import_not_accepted, assert_in_sync, assert_loses_exactly,
                             assert_one_graded_cell_per_function, assert_registry, assert_scores_zero,
                             assert_syntax_error_costs_only, exercise_path, solution_path, with_solution)

SOLUTION = solution_path("01_ppo")
EXERCISE = exercise_path("01_ppo")
POINTS = {"kl_penalty": 3, "shaped_rewards": 3, "compute_gae": 4, "clipped_policy_loss": 4, "choose_beta": 2}


def test_checks_registry_of_exercise_01():
    assert sum(POINTS.values()) == 16
    assert_registry("01_ppo", POINTS)


def test_solution_has_one_graded_cell_per_function():
    assert_one_graded_cell_per_function(SOLUTION, POINTS)


def test_exercise_01_is_in_sync():
    assert_in_sync("01_ppo")


def test_solution_scores_full_marks():
    assert_full_marks(SOLUTION, 16)


def test_exercise_scores_zero_on_every_check():
    assert_scores_zero(EXERCISE)


GAE_LOOP = """
mask = mask.to(rewards.dtype)
advantages = torch.zeros_like(rewards)
next_value = torch.zeros_like(rewards[:, 0])
next_adv = torch.zeros_like(rewards[:, 0])
for t in reversed(range(rewards.shape[1])):
    delta = rewards[:, t] + gamma * next_value - values[:, t]
    next_adv = {recursion}
    advantages[:, t] = next_adv
    next_value = values[:, t]{value_mask}
    next_adv = next_adv{adv_mask}
return advantages * mask, (advantages + values) * mask
"""

CLIP_TERMS = """
ratio = torch.exp(logp - old_logp)
unclipped = -advantages * ratio
clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
mask = mask.to(logp.dtype)
"""

KL_REF = "kl_penalty: matches the reference, k1 (the default) and k3"
KL_MEANS = "kl_penalty: k1 and k3 average to KL(pi || rho) on tokens sampled from pi"
SHAPED_REF = "shaped_rewards: matches the reference on padded batches"
SHAPED_LAST = "shaped_rewards: the score sits on the last response token of each row"
SHAPED_KL = "shaped_rewards: -beta * KL on response tokens, zero off the mask"
GAE_REF = "compute_gae: matches the reference on padded batches, several gamma and lam"
GAE_TO_GO = "compute_gae: gamma = lam = 1 gives returns = rewards-to-go"
GAE_OFF = "compute_gae: rewards and values off the mask change nothing"
CLIP_REF = "clipped_policy_loss: matches the reference on padded batches"
CLIP_GRAD = "clipped_policy_loss: gradient is zero outside the trust region, nonzero inside"
CLIP_ONE = "clipped_policy_loss: at ratio 1 the loss is -mean(A), with the policy gradient"

WRONG = {
    # kl_penalty
    "k1 with the sign flipped": (
        "kl_penalty",
        "log_ratio = logp - ref_logp\n"
        "return -log_ratio if estimator == 'k1' else torch.expm1(-log_ratio) + log_ratio",
        {KL_REF, KL_MEANS}),
    "k3 with pi/rho instead of rho/pi": (  # still >= 0, but a biased estimate of KL(pi || rho)
        "kl_penalty",
        "log_ratio = logp - ref_logp\n"
        "return log_ratio if estimator == 'k1' else torch.expm1(log_ratio) - log_ratio",
        {KL_REF, KL_MEANS}),
    # shaped_rewards
    "score on the last column": (
        "shaped_rewards",
        "rewards = -kl_coef * kl * mask\n"
        "rewards[:, -1] += scores\n"
        "return rewards",
        {SHAPED_REF, SHAPED_LAST}),
    "score at mask.sum() - 1 (forgets the left padding)": (
        "shaped_rewards",
        "rewards = -kl_coef * kl * mask\n"
        "rewards[torch.arange(len(scores)), mask.sum(-1) - 1] += scores\n"
        "return rewards",
        {SHAPED_REF, SHAPED_LAST}),
    "KL penalty on every column": (
        "shaped_rewards",
        "rewards = -kl_coef * kl.clone()\n"
        "last = torch.where(mask.bool(), torch.arange(mask.shape[1]), -1).max(-1).values\n"
        "rewards[torch.arange(len(scores)), last] += scores\n"
        "return rewards",
        {SHAPED_REF, SHAPED_KL}),
    # compute_gae
    "GAE that does not stop at the mask": (  # bootstraps from the values in the right padding
        # (with gamma = lam = 1 the values telescope away, so the rewards-to-go come out right)
        "compute_gae",
        GAE_LOOP.format(recursion="delta + gamma * lam * next_adv", value_mask="", adv_mask=""),
        {GAE_REF, GAE_OFF}),
    "GAE returns without + V": (
        "compute_gae",
        GAE_LOOP.format(recursion="(delta + gamma * lam * next_adv) * mask[:, t]", value_mask=" * mask[:, t]",
                        adv_mask="").replace("(advantages + values) * mask", "advantages * mask"),
        {GAE_REF, GAE_TO_GO}),
    "GAE without gamma in the lambda term": (
        "compute_gae",
        GAE_LOOP.format(recursion="(delta + lam * next_adv) * mask[:, t]", value_mask=" * mask[:, t]",
                        adv_mask=" * mask[:, t]"),
        {GAE_REF}),
    # clipped_policy_loss
    "min instead of max of the negated terms": (
        "clipped_policy_loss",
        CLIP_TERMS + "return (torch.min(unclipped, clipped) * mask).sum() / mask.sum()",
        {CLIP_REF, CLIP_GRAD}),
    "no clipping": (
        "clipped_policy_loss",
        CLIP_TERMS + "return (unclipped * mask).sum() / mask.sum()",
        {CLIP_REF, CLIP_GRAD}),
    "mean over every column, padding included": (
        "clipped_policy_loss",
        CLIP_TERMS + "return torch.max(unclipped, clipped).mean()",
        {CLIP_REF, CLIP_GRAD, CLIP_ONE}),
    "mean per sequence, then over the batch": (  # a different weighting of the tokens
        "clipped_policy_loss",
        CLIP_TERMS + "return ((torch.max(unclipped, clipped) * mask).sum(-1) / mask.sum(-1)).mean()",
        {CLIP_REF, CLIP_ONE}),
    "loss only, no stats (accepted)": (
        "clipped_policy_loss",
        CLIP_TERMS + "return (torch.max(unclipped, clipped) * mask).sum() / mask.sum()",
        set()),
}


@pytest.mark.parametrize("mistake", sorted(WRONG))
def test_wrong_implementation_loses_points_on_the_right_checks(mistake, tmp_path):
    function, body, expected_failures = WRONG[mistake]
    assert_loses_exactly(with_solution(SOLUTION, function, body, tmp_path), function, expected_failures)


def test_syntax_error_in_one_cell_keeps_the_other_marks(tmp_path):
    assert_syntax_error_costs_only(SOLUTION, "compute_gae", "clipped_policy_loss", 16, tmp_path)


def test_functions_imported_from_alignlib_are_not_accepted(tmp_path):
    assert_import_not_accepted(SOLUTION, "compute_gae", "alignlib.ppo", tmp_path)
