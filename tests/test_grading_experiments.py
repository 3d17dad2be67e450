"""The graded experiments (one per exercise, on the tiny model): scored on the outcome, so a wrong or malformed
choice loses exactly that check, and the measurements behind them are deterministic and reject bad input."""
from __future__ import annotations

import pytest

from alignlib import tiny_lab
from alignlib.checks import load_checks
from grading_helpers import assert_loses_exactly, solution_path, with_solution

pytestmark = pytest.mark.unit

# (exercise, experiment function, a body that returns a wrong choice, a body that returns no number)
CASES = [
    ("00_logprobs", "choose_temperature", "return 1.0", "return 'hot'"),
    ("01_ppo", "choose_beta", "return 0.05", "return None"),
    ("02_rrhf", "choose_alpha", "return 0.0", "return float('nan')"),
    ("03_raft", "choose_k_and_temperature", "return 8, 1.0", "return 8"),
]


@pytest.mark.parametrize("exercise, function, wrong, malformed", CASES, ids=[c[0] for c in CASES])
def test_a_wrong_or_malformed_choice_loses_only_the_experiment(exercise, function, wrong, malformed, tmp_path):
    (check_name,) = [name for name in _check_names(exercise) if name.startswith(f"{function}:")]
    for body in (wrong, malformed):
        path = with_solution(solution_path(exercise), function, body, tmp_path)
        assert_loses_exactly(path, function, {check_name})


def _check_names(exercise: str) -> list[str]:
    return [c.name for c in load_checks(exercise)]


def test_measurements_move_the_way_the_exercises_say():
    assert tiny_lab.mean_entropy(0.25) < tiny_lab.mean_entropy(1.0) < tiny_lab.mean_entropy(4.0)
    small, large = tiny_lab.tilted_optimum(0.1), tiny_lab.tilted_optimum(1.0)
    assert small["kl"] > large["kl"] > 0 and small["reward"] > large["reward"] > large["reference_reward"]
    assert tiny_lab.length_correlation(0.0) < -0.5 < 0.5 < tiny_lab.length_correlation(1.5)
    assert tiny_lab.best_of_k(4, 0.5) == tiny_lab.best_of_k(4, 0.5)        # fixed seeds: the grader sees this


@pytest.mark.parametrize("call, message", [
    (lambda: tiny_lab.mean_entropy(0), "temperature"),
    (lambda: tiny_lab.tilted_optimum(float("nan")), "beta"),
    (lambda: tiny_lab.length_correlation("1"), "alpha"),
    (lambda: tiny_lab.best_of_k(9, 0.5), "k must be"),
    (lambda: tiny_lab.best_of_k(2, -1.0), "temperature"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
