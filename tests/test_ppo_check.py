"""ppo-check's verdicts on hand-made runs: each criterion can fail on its own."""
import pytest

from alignlib.bench.ppo_check import judge

pytestmark = pytest.mark.unit


def run(**changes):
    history = [{"policy/entropy": 1.5, "value/explained_var": 0.0, "kl/ref": 0.0}] * 3 + \
              [{"policy/entropy": 1.4, "value/explained_var": 0.2, "kl/ref": 6.0}] * 3
    base = {"history": history, "reward_before": [0.1] * 4, "reward_after": [0.4] * 4,
            "ppl_before": 8.0, "ppl_after": 10.0}
    return {**base, **changes}


def test_a_sound_run_passes_every_criterion():
    verdict = judge(run(), min_gain=0.1, kl_budget=12)
    assert all(passed for passed, _ in verdict.values())
    assert abs(verdict["gain"][1] - 0.3) < 1e-9


def test_each_criterion_fails_alone():
    h = run()["history"]
    cases = {
        "gain": run(reward_after=[0.15] * 4),
        "entropy": run(history=h[:3] + [{**h[3], "policy/entropy": 2.0}] * 3),
        "value": run(history=h[:3] + [{**h[3], "value/explained_var": -0.1}] * 3),
        "kl": run(history=h[:3] + [{**h[3], "kl/ref": 20.0}] * 3),
        "readable": run(ppl_after=20.0),
    }
    for name, case in cases.items():
        verdict = judge(case, min_gain=0.1, kl_budget=12)
        assert [k for k, (passed, _) in verdict.items() if not passed] == [name]
