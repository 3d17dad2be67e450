"""The graded experiments (one per exercise, on the tiny model): scored on the outcome, so a wrong or malformed
choice loses exactly that check, and the measurements behind them are deterministic and reject bad input."""
from __future__ import annotations

import pytest

from alignlib import tiny_lab
from alignlib.checks import Namespace, load_checks
from grading_helpers import assert_loses_exactly, solution_path, with_solution

pytestmark = pytest.mark.grading

# (exercise, experiment function, a body that returns a wrong choice, a body that returns no number)
CASES = [
    ("00_logprobs", "choose_temperature", "return 1.0", "return 'hot'"),
    ("01_ppo", "choose_beta", "return 0.05", "return None"),
    ("02_rrhf", "choose_alpha", "return 0.0", "return float('nan')"),
    ("03_raft", "choose_k_and_temperature", "return 8, 1.0", "return 8"),
    ("04_soups", "choose_lambda", "return 0.5", "return [0.3]"),
    ("05_cai", "choose_judge_setup", "return False, 0.3", "return 'both', 0.2"),
    ("06_self_align", "choose_threshold", "return 0.9", "return None"),
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
    one, both = tiny_lab.judge_labels(False, 0.0), tiny_lab.judge_labels(True, 0.0)
    assert abs(both["mean_p"] - 0.5) < abs(one["mean_p"] - 0.5)              # both orders cancel the letter bias
    assert both["accuracy"] > one["accuracy"] and one["kept"] == both["kept"] == 1.0
    strict = tiny_lab.judge_labels(True, 0.2)
    assert strict["kept"] < both["kept"] and strict["accuracy"] > both["accuracy"]   # fewer, cleaner labels
    loose, tight = tiny_lab.novelty_pass_rate(1.0), tiny_lab.novelty_pass_rate(0.3)
    assert tight["pass_rate"] < loose["pass_rate"] and tight["mean_best"] < loose["mean_best"]


def _experiment_passes(exercise: str, function: str, body: str) -> bool:
    """Run only ``function``'s experiment check on a function returning ``body`` (compiled as a graded cell)."""
    (chk,) = [c for c in load_checks(exercise) if c.function == function]
    scope = {"__name__": "__graded__"}
    exec(compile(f"def {function}():\n    {body}\n", "<graded cell 0>", "exec"), scope)
    try:
        chk.run(Namespace(scope))
    except AssertionError:
        return False
    return True


def test_a_wrong_setup_of_the_judge_loses_the_points():
    """05: the most accurate setup keeps too few pairs; one order, or no margin, keeps enough but is noisier: all lose
    the experiment; a margin a little below the best one's passes (within the tolerance)."""
    for body in ("return True, 0.3", "return False, 0.0", "return True, 0.0", "return False, 0.3"):
        assert not _experiment_passes("05_cai", "choose_judge_setup", body), body
    assert _experiment_passes("05_cai", "choose_judge_setup", "return True, 0.17")


def test_a_threshold_that_keeps_too_few_or_is_too_lenient_loses_the_points():
    """06: a threshold below the strictest one that meets the target keeps too few; one well above it is too lenient
    (self-instruct's 0.7 happens to keep too few here); one just above the strictest passes."""
    strictest = min(t / 1000 for t in range(1001) if tiny_lab.novelty_pass_rate(t / 1000)["pass_rate"] >= 0.4)
    for body in (f"return {strictest - 0.05}", f"return {strictest + 0.05}", "return 0.7", "return 1.0"):
        assert not _experiment_passes("06_self_align", "choose_threshold", body), body
    assert _experiment_passes("06_self_align", "choose_threshold", f"return {strictest + 0.01}")


@pytest.mark.parametrize("call, message", [
    (lambda: tiny_lab.mean_entropy(0), "temperature"),
    (lambda: tiny_lab.tilted_optimum(float("nan")), "beta"),
    (lambda: tiny_lab.length_correlation("1"), "alpha"),
    (lambda: tiny_lab.best_of_k(9, 0.5), "k must be"),
    (lambda: tiny_lab.best_of_k(2, -1.0), "temperature"),
    (lambda: tiny_lab.judge_labels(1, 0.1), "both_orders"),
    (lambda: tiny_lab.judge_labels(True, 0.5), "margin"),
    (lambda: tiny_lab.novelty_pass_rate(1.5), "threshold"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
