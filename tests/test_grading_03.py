"""Grading of exercise 03 (RAFT): the solution scores full marks, the exercise zero, and wrong implementations
lose points on exactly the checks that should catch them."""
from __future__ import annotations

import pytest

from grading_helpers import (assert_full_marks, assert_import_not_accepted, assert_in_sync, assert_loses_exactly,
                             assert_one_graded_cell_per_function, assert_registry, assert_scores_zero,
                             assert_syntax_error_costs_only, exercise_path, solution_path, with_solution)

SOLUTION = solution_path("03_raft")
EXERCISE = exercise_path("03_raft")
POINTS = {"select_local": 3, "select_global": 4, "distinct_n": 3, "choose_k_and_temperature": 2}


def test_checks_registry_of_exercise_03():
    assert_registry("03_raft", POINTS)


def test_solution_has_one_graded_cell_per_function():
    assert_one_graded_cell_per_function(SOLUTION, POINTS)


def test_exercise_03_is_in_sync():
    assert_in_sync("03_raft")


def test_solution_scores_full_marks():
    assert_full_marks(SOLUTION, 12)


def test_exercise_scores_zero_on_every_check():
    assert_scores_zero(EXERCISE)


# The first lines of a select_global: the flat rewards and the number to keep, with the error for N < k.
GLOBAL_KEEP = """
flat = rewards.flatten()
keep = flat.numel() // k{extra}
if flat.numel() < k:
    raise ValueError("fewer than k samples")
"""
# The n-grams of distinct_n, words made by {words}.
NGRAMS = """
grams = []
for text in texts:
    words = {words}
    grams.extend(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
"""
RATIO = "return len(set(grams)) / len(grams) if grams else 0.0"

LOCAL_REF = "select_local: matches the reference on random rewards (P, k)"
LOCAL_FLAT = "select_local: returns flat indices p * k + j, one per prompt, into that prompt's row"
LOCAL_TIES = "select_local: ties go to the first (earliest) sample of the prompt"
GLOBAL_REF = "select_global: matches the reference on random rewards, sorted flat indices"
GLOBAL_TOP = "select_global: keeps exactly the N // k highest rewards"
GLOBAL_TIES = "select_global: ties go to the earlier sample"
GLOBAL_ERROR = "select_global: raises ValueError when there are fewer than k samples"
DISTINCT_REF = "distinct_n: matches the reference on random texts, n = 1, 2, 3"
DISTINCT_CASE = "distinct_n: lower-cases the words and splits on any whitespace"
DISTINCT_WITHIN = "distinct_n: counts n-grams within each text only, 0.0 when there are none"

WRONG = {
    # select_local
    "column of the best sample instead of its flat index": (
        "select_local",
        "return rewards.argmax(-1)",
        {LOCAL_REF, LOCAL_FLAT}),
    "the last of equal rewards": (
        "select_local",
        "P, k = rewards.shape\n"
        "return torch.arange(P) * k + (k - 1 - rewards.flip(-1).argmax(-1))",
        {LOCAL_TIES}),
    "argmin": (
        "select_local",
        "P, k = rewards.shape\n"
        "return torch.arange(P) * k + rewards.argmin(-1)",
        {LOCAL_REF, LOCAL_FLAT, LOCAL_TIES}),
    # select_global
    "keeps N // k + 1": (
        "select_global",
        GLOBAL_KEEP.format(extra=" + 1")
        + "return torch.sort(flat, descending=True, stable=True).indices[:keep].sort().values",
        {GLOBAL_REF, GLOBAL_TOP, GLOBAL_TIES}),
    "indices in the order of the rewards, not sorted": (
        "select_global",
        GLOBAL_KEEP.format(extra="") + "return torch.sort(flat, descending=True, stable=True).indices[:keep]",
        {GLOBAL_REF}),
    "ties to the later sample": (
        "select_global",
        GLOBAL_KEEP.format(extra="")
        + "order = torch.sort(flat.flip(0), descending=True, stable=True).indices[:keep]\n"
        "return (flat.numel() - 1 - order).sort().values",
        {GLOBAL_TIES}),
    "the worst 1/k": (
        "select_global",
        GLOBAL_KEEP.format(extra="") + "return torch.sort(flat, stable=True).indices[:keep].sort().values",
        {GLOBAL_REF, GLOBAL_TOP, GLOBAL_TIES}),
    "no error when N < k (returns nothing)": (
        "select_global",
        "flat = rewards.flatten()\n"
        "keep = flat.numel() // k\n"
        "return torch.sort(flat, descending=True, stable=True).indices[:keep].sort().values",
        {GLOBAL_ERROR}),
    # distinct_n
    "no lower-casing": (
        "distinct_n",
        NGRAMS.format(words="text.split()") + RATIO,
        {DISTINCT_CASE}),
    "split on single spaces": (
        "distinct_n",
        NGRAMS.format(words="text.lower().split(' ')") + RATIO,
        {DISTINCT_CASE}),
    "n-grams across texts (all texts joined)": (
        "distinct_n",
        "words = ' '.join(texts).lower().split()\n"
        "grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]\n" + RATIO,
        {DISTINCT_REF, DISTINCT_WITHIN}),
    "no guard when there is no n-gram": (
        "distinct_n",
        NGRAMS.format(words="text.lower().split()") + "return len(set(grams)) / len(grams)",
        {DISTINCT_WITHIN}),
    "distinct words over n-grams": (
        "distinct_n",
        NGRAMS.format(words="text.lower().split()")
        + "unique = {w for t in texts for w in t.lower().split()}\n"
        "return len(unique) / len(grams) if grams else 0.0",
        {DISTINCT_REF, DISTINCT_WITHIN}),  # it does lower-case and split the words right
}


@pytest.mark.parametrize("mistake", sorted(WRONG))
def test_wrong_implementation_loses_points_on_the_right_checks(mistake, tmp_path):
    function, body, expected_failures = WRONG[mistake]
    assert_loses_exactly(with_solution(SOLUTION, function, body, tmp_path), function, expected_failures)


def test_syntax_error_in_one_cell_keeps_the_other_marks(tmp_path):
    assert_syntax_error_costs_only(SOLUTION, "select_global", "distinct_n", 12, tmp_path)


def test_functions_imported_from_alignlib_are_not_accepted(tmp_path):
    assert_import_not_accepted(SOLUTION, "distinct_n", "alignlib.raft", tmp_path)
