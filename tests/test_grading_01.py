"""Grading of exercise 01 (PPO): the solution scores full marks, the exercise zero, and wrong implementations
lose points on exactly the checks that should catch them."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from alignlib.checks import load_checks
from alignlib.grading import BEGIN_CODE, END_CODE, grade, load_functions, print_table, sync_exercises

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "01_ppo.ipynb"
EXERCISE = ROOT / "exercises" / "01_ppo.ipynb"
FUNCTIONS = {"kl_penalty", "shaped_rewards", "compute_gae", "clipped_policy_loss"}


def test_checks_registry_of_exercise_01():
    checks = load_checks("01_ppo")
    assert sum(c.points for c in checks) == 14
    assert {c.function for c in checks} == FUNCTIONS
    assert len({c.name for c in checks}) == len(checks)
    points = {f: sum(c.points for c in checks if c.function == f) for f in FUNCTIONS}
    assert points == {"kl_penalty": 3, "shaped_rewards": 3, "compute_gae": 4, "clipped_policy_loss": 4}


def test_solution_has_one_graded_cell_per_function():
    nb = nbformat.read(SOLUTION, as_version=4)
    graded = [c for c in nb.cells if "graded" in c.metadata.get("tags", [])]
    assert "import torch" in graded[0].source and BEGIN_CODE not in graded[0].source  # imports first
    for function in FUNCTIONS:
        (cell,) = [c for c in graded if f"def {function}(" in c.source]
        assert cell.source.count(BEGIN_CODE) == 1 and '"""' in cell.source  # one answer, a docstring
    assert not any("import" in c.source for c in graded[1:])  # the functions use only the first cell's imports


def test_exercise_01_is_in_sync():
    assert "01_ppo.ipynb" not in sync_exercises(ROOT / "solutions", ROOT / "exercises", check=True)


def test_solution_scores_full_marks(capsys):
    results = grade(SOLUTION)
    assert [(r.name, r.message) for r in results if r.points != r.max_points] == []
    print_table(results)
    assert capsys.readouterr().out.strip().endswith("Total 14/14")


def test_exercise_scores_zero_on_every_check():
    results = grade(EXERCISE)
    assert results and all(r.points == 0 for r in results)
    assert {r.message for r in results} == {"not implemented"}


def with_solution(function: str, body: str, tmp_path: Path) -> Path:
    """Copy the solution notebook to tmp_path with ``function``'s solution block replaced by ``body``."""
    nb = nbformat.read(SOLUTION, as_version=4)
    (cell,) = [c for c in nb.cells if f"def {function}(" in c.source and "graded" in c.metadata.get("tags", [])]
    head, rest = cell.source.split(BEGIN_CODE)
    _, tail = rest.split(END_CODE)
    indent = head.split("\n")[-1]
    cell.source = head + body.strip("\n").replace("\n", "\n" + indent) + tail  # head ends with the indent
    path = tmp_path / SOLUTION.name  # same stem, so the same checks grade it
    nbformat.write(nb, path)
    return path


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
    results = grade(with_solution(function, body, tmp_path))
    failed = {r.name for r in results if r.points == 0}
    assert failed == expected_failures, [(r.name, r.message) for r in results if r.points == 0]
    assert all(r.name.startswith(function) for r in results if r.name in failed)


def test_syntax_error_in_one_cell_keeps_the_other_marks(tmp_path):
    path = with_solution("compute_gae", "return (rewards *", tmp_path)
    namespace = load_functions(path)
    assert "compute_gae" not in namespace and "clipped_policy_loss" in namespace
    results = grade(path)
    gae = [r for r in results if r.name.startswith("compute_gae")]
    assert gae and all(r.points == 0 and "SyntaxError" in r.message for r in gae)
    assert sum(r.points for r in results) == 14 - 4


def test_functions_imported_from_alignlib_are_not_accepted(tmp_path):
    nb = nbformat.read(SOLUTION, as_version=4)
    for cell in nb.cells:
        if "def compute_gae(" in cell.source:
            cell.source = "from alignlib.ppo import compute_gae"
    nbformat.write(nb, tmp_path / SOLUTION.name)
    results = [r for r in grade(tmp_path / SOLUTION.name) if r.name.startswith("compute_gae")]
    assert results and all(r.points == 0 and "def" in r.message for r in results)
