"""Grading of exercise 02 (RRHF): the solution scores full marks, the exercise zero, and wrong implementations
lose points on exactly the checks that should catch them."""
from __future__ import annotations

import pytest

from grading_helpers import (assert_full_marks, assert_import_not_accepted, assert_in_sync, assert_loses_exactly,
                             assert_one_graded_cell_per_function, assert_registry, assert_scores_zero,
                             assert_syntax_error_costs_only, exercise_path, solution_path, with_solution)

SOLUTION = solution_path("02_rrhf")
EXERCISE = exercise_path("02_rrhf")
POINTS = {"rank_loss": 6, "best_response_loss": 4, "choose_alpha": 2}


def test_checks_registry_of_exercise_02():
    assert_registry("02_rrhf", POINTS)


def test_solution_has_one_graded_cell_per_function():
    assert_one_graded_cell_per_function(SOLUTION, POINTS)


def test_exercise_02_is_in_sync():
    assert_in_sync("02_rrhf")


def test_solution_scores_full_marks():
    assert_full_marks(SOLUTION, 12)


def test_exercise_scores_zero_on_every_check():
    assert_scores_zero(EXERCISE)


# The first lines of a rank_loss: the (Q, k, k) differences and the pairs; {worse} decides which pairs count.
RANK_PAIRS = """
valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
diff = scores[:, :, None] - scores[:, None, :]
pairs = ({worse}) & valid[:, :, None] & valid[:, None, :]
"""
STRICT = "rewards[:, :, None] < rewards[:, None, :]"

# The first lines of a best_response_loss: invalid candidates out of the running.
BEST_MASKED = """
if valid is not None:
    rewards = rewards.masked_fill(~valid.bool(), float("-inf"))
"""

RANK_REF = "rank_loss: matches the reference on random (Q, k), with and without a valid mask"
RANK_ORDERED = "rank_loss: zero when each query's scores are ordered like its rewards"
RANK_TIES = "rank_loss: tied rewards form no pair"
RANK_SUM = "rank_loss: a batch of queries gives the sum of the single-query losses"
RANK_GRAD = "rank_loss: gradient with respect to the scores matches the reference"
BEST_REF = "best_response_loss: matches the reference on random (Q, k), with and without a valid mask"
BEST_INVALID = "best_response_loss: an invalid candidate is never the best, whatever its reward"
BEST_TIES = "best_response_loss: the first of several best candidates is the one trained on"
BEST_SUM = "best_response_loss: sums over queries, with gradient to the best candidates only"

WRONG = {
    # rank_loss
    "pairs across queries (the batch flattened into one query)": (
        "rank_loss",
        "Q, k = scores.shape\n"
        "valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()\n"
        "s, r, v = scores.reshape(1, Q * k), rewards.reshape(1, Q * k), valid.reshape(1, Q * k)\n"
        "pairs = (r[:, :, None] < r[:, None, :]) & v[:, :, None] & v[:, None, :]\n"
        "return (torch.relu(s[:, :, None] - s[:, None, :]) * pairs).sum()",
        {RANK_REF, RANK_ORDERED, RANK_SUM, RANK_GRAD}),
    "ties counted as pairs": (
        "rank_loss",
        RANK_PAIRS.format(worse="rewards[:, :, None] <= rewards[:, None, :]")
        + "return (torch.relu(diff) * pairs).sum()",
        {RANK_REF, RANK_TIES}),
    "mean over the pairs instead of the sum": (  # 0 / 0 when a query has no pair
        "rank_loss",
        RANK_PAIRS.format(worse=STRICT) + "return (torch.relu(diff) * pairs).sum() / pairs.sum()",
        {RANK_REF, RANK_TIES, RANK_SUM, RANK_GRAD}),
    "mean over the queries instead of the sum": (
        "rank_loss",
        RANK_PAIRS.format(worse=STRICT) + "return (torch.relu(diff) * pairs).sum((1, 2)).mean()",
        {RANK_REF, RANK_SUM, RANK_GRAD}),
    "hinge the wrong way round": (
        "rank_loss",
        RANK_PAIRS.format(worse=STRICT) + "return (torch.relu(-diff) * pairs).sum()",
        {RANK_REF, RANK_ORDERED, RANK_TIES, RANK_GRAD}),
    "valid mask ignored": (
        "rank_loss",
        "diff = scores[:, :, None] - scores[:, None, :]\n"
        "return (torch.relu(diff) * (rewards[:, :, None] < rewards[:, None, :])).sum()",
        {RANK_REF, RANK_GRAD}),
    "a Python loop adding up floats (no gradient)": (
        "rank_loss",
        "total = 0.0\n"
        "for q in range(scores.shape[0]):\n"
        "    for i in range(scores.shape[1]):\n"
        "        for j in range(scores.shape[1]):\n"
        "            ok = valid is None or (bool(valid[q, i]) and bool(valid[q, j]))\n"
        "            if ok and rewards[q, i] < rewards[q, j]:\n"
        "                total += max(0.0, (scores[q, i] - scores[q, j]).item())\n"
        "return torch.tensor(total)",
        {RANK_GRAD}),
    # best_response_loss
    "argmin of the rewards": (
        "best_response_loss",
        "if valid is not None:\n"
        "    rewards = rewards.masked_fill(~valid.bool(), float('inf'))\n"
        "return nll.gather(1, rewards.argmin(-1)[:, None]).sum()",
        {BEST_REF, BEST_INVALID, BEST_TIES, BEST_SUM}),
    "valid mask ignored (best)": (
        "best_response_loss",
        "return nll.gather(1, rewards.argmax(-1)[:, None]).sum()",
        {BEST_REF, BEST_INVALID}),
    "the last of several best candidates": (
        "best_response_loss",
        BEST_MASKED + "last = rewards.shape[1] - 1 - rewards.flip(-1).argmax(-1)\n"
        "return nll.gather(1, last[:, None]).sum()",
        {BEST_TIES}),
    "mean over the queries": (
        "best_response_loss",
        BEST_MASKED + "return nll.gather(1, rewards.argmax(-1)[:, None]).mean()",
        {BEST_REF, BEST_SUM}),
    "mean NLL of every candidate": (
        "best_response_loss",
        "return nll.mean(-1).sum()",
        {BEST_REF, BEST_INVALID, BEST_TIES, BEST_SUM}),
}


@pytest.mark.parametrize("mistake", sorted(WRONG))
def test_wrong_implementation_loses_points_on_the_right_checks(mistake, tmp_path):
    function, body, expected_failures = WRONG[mistake]
    assert_loses_exactly(with_solution(SOLUTION, function, body, tmp_path), function, expected_failures)


def test_syntax_error_in_one_cell_keeps_the_other_marks(tmp_path):
    assert_syntax_error_costs_only(SOLUTION, "rank_loss", "best_response_loss", 12, tmp_path)


def test_functions_imported_from_alignlib_are_not_accepted(tmp_path):
    assert_import_not_accepted(SOLUTION, "best_response_loss", "alignlib.rrhf", tmp_path)
