"""Grading of exercise 04 (rewarded soups): the solution scores full marks, the exercise zero, and wrong
implementations lose points on exactly the checks that should catch them."""
from __future__ import annotations

import pytest

from grading_helpers import (assert_full_marks, assert_import_not_accepted, assert_in_sync, assert_loses_exactly,
                             assert_one_graded_cell_per_function, assert_registry, assert_scores_zero,
                             assert_syntax_error_costs_only, exercise_path, solution_path, with_solution)

SOLUTION = solution_path("04_soups")
EXERCISE = exercise_path("04_soups")
POINTS = {"interpolate_state_dicts": 2, "lora_delta": 3, "pareto_mask": 3, "hypervolume_2d": 3, "choose_lambda": 2}


def test_checks_registry_of_exercise_04():
    assert_registry("04_soups", POINTS)


def test_solution_has_one_graded_cell_per_function():
    assert_one_graded_cell_per_function(SOLUTION, POINTS)


def test_exercise_04_is_in_sync():
    assert_in_sync("04_soups")


def test_solution_scores_full_marks():
    assert_full_marks(SOLUTION, 13)


def test_exercise_scores_zero_on_every_check():
    assert_scores_zero(EXERCISE)


CHECKED = """
w = [float(x) for x in weights]
if len(w) != len(state_dicts) or any(x < 0 for x in w) or abs(sum(w) - 1) > 1e-6:
    raise ValueError("weights off the simplex")
"""
PARETO = """
ge = (points[:, None, :] {op} points[None, :, :]).all(-1)
gt = (points[:, None, :] {strict} points[None, :, :]).any(-1)
"""
HV_HEAD = """
above = points{filter}
if len(above) == 0:
    return 0.0
front = above[above[:, 0].argsort(descending=True)]
r1, r2 = reference.tolist()
"""

INTERP_REF = ("interpolate_state_dicts: sum_i lambda_i theta_i key by key, for N = 2 and 3 experts, and a vertex "
              "gives that expert")
INTERP_BAD = ("interpolate_state_dicts: raises ValueError for weights off the simplex (negative, not summing to 1) "
              "or one weight per expert missing")
LORA_PRODUCT = "lora_delta: mode 'product': sum_i lambda_i B_i A_i (the soup of the full weights)"
LORA_FACTORS = "lora_delta: mode 'factors': (sum_i lambda_i B_i)(sum_i lambda_i A_i), A and B averaged separately"
LORA_VERTEX = "lora_delta: at a vertex both modes give that expert's B_i A_i"
PARETO_REF = "pareto_mask: matches the reference on random points, 2 and 3 rewards"
PARETO_DUP = ("pareto_mask: identical points do not dominate each other: duplicates of a front point stay, of a "
              "dominated one go")
PARETO_WEAK = "pareto_mask: a point tied in one reward and worse in another is dominated"
HV_REF = "hypervolume_2d: matches the reference on random fronts above the reference point"
HV_DOM = "hypervolume_2d: dominated points and duplicates add nothing"
HV_UNDER = "hypervolume_2d: points not above the reference in both rewards add nothing (and alone give 0.0)"
EXPERIMENT = ("choose_lambda: the chosen lambda gives user mu = 0.5 a utility within 0.005 of the best soup's "
              "(experts' Hessians differ)")

WRONG = {
    "weights applied to the experts in reverse": (
        "interpolate_state_dicts",
        CHECKED + "return {k: sum(wi * sd[k] for wi, sd in zip(reversed(w), state_dicts)) for k in state_dicts[0]}",
        {INTERP_REF}),
    "no check of the weights": (
        "interpolate_state_dicts",
        "return {k: sum(wi * sd[k] for wi, sd in zip(weights, state_dicts)) for k in state_dicts[0]}",
        {INTERP_BAD}),
    "factors mode computed as the product": (
        "lora_delta",
        "return sum(w * (B @ A) for w, A, B in zip(weights, As, Bs))",
        {LORA_FACTORS}),
    "product mode computed from averaged factors": (
        "lora_delta",
        "return sum(w * B for w, B in zip(weights, Bs)) @ sum(w * A for w, A in zip(weights, As))",
        {LORA_PRODUCT}),
    "square roots of the weights on each factor": (
        "lora_delta",
        "if mode == 'product':\n"
        "    return sum(w * (B @ A) for w, A, B in zip(weights, As, Bs))\n"
        "return sum(w ** 0.5 * B for w, B in zip(weights, Bs)) @ sum(w ** 0.5 * A for w, A in zip(weights, As))",
        {LORA_FACTORS}),
    "product mode ignores the weights (plain mean)": (
        "lora_delta",
        "if mode == 'product':\n"
        "    return sum(B @ A for A, B in zip(As, Bs)) / len(As)\n"
        "return sum(w * B for w, B in zip(weights, Bs)) @ sum(w * A for w, A in zip(weights, As))",
        {LORA_PRODUCT, LORA_VERTEX}),
    "strict dominance only (better in every reward)": (
        "pareto_mask",
        PARETO.format(op=">", strict=">") + "return ~(ge & gt).any(0)",
        {PARETO_WEAK}),
    "duplicates dominate each other": (
        "pareto_mask",
        PARETO.format(op=">=", strict=">")
        + "ge &= ~torch.eye(len(points), dtype=torch.bool)\nreturn ~ge.any(0)",
        {PARETO_DUP}),
    "rewards minimised": (
        "pareto_mask",
        PARETO.format(op="<=", strict="<") + "return ~(ge & gt).any(0)",
        {PARETO_REF, PARETO_DUP, PARETO_WEAK}),
    "points under the reference kept": (
        "hypervolume_2d",
        HV_HEAD.format(filter="")
        + "area, y_prev = 0.0, r2\nfor x, y in front.tolist():\n    if y > y_prev:\n"
          "        area += (x - r1) * (y - y_prev)\n        y_prev = y\nreturn area",
        {HV_UNDER}),
    "overlapping rectangles added up": (
        "hypervolume_2d",
        HV_HEAD.format(filter="[(points > reference).all(-1)]")
        + "return sum((x - r1) * (y - r2) for x, y in front.tolist())",
        {HV_REF, HV_DOM}),
    "lambda = mu, as if Lemma 1 held": (
        "choose_lambda",
        "return mu",
        {EXPERIMENT}),
}


@pytest.mark.parametrize("mistake", sorted(WRONG))
def test_wrong_implementation_loses_points_on_the_right_checks(mistake, tmp_path):
    function, body, expected_failures = WRONG[mistake]
    assert_loses_exactly(with_solution(SOLUTION, function, body, tmp_path), function, expected_failures)


def test_syntax_error_in_one_cell_keeps_the_other_marks(tmp_path):
    assert_syntax_error_costs_only(SOLUTION, "lora_delta", "pareto_mask", 13, tmp_path)


def test_functions_imported_from_alignlib_are_not_accepted(tmp_path):
    assert_import_not_accepted(SOLUTION, "pareto_mask", "alignlib.soups", tmp_path)
