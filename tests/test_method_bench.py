"""The PPO / RRHF / RAFT benchmark: one method in-process on the tiny model, and the side-by-side summary."""
import pytest

from alignlib.bench.methods import bench_method, fig4_table, format_table, summarize, time_to_reach

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("method,mode", [("ppo", "lora"), ("rrhf", "full"), ("raft", "lora")])
def test_bench_method_reports_time_memory_and_reward(method, mode):
    r = bench_method(method, "tiny-random", steps=2, mode=mode, held_out=2, progress=False)
    assert r["method"] == method and len(r["history"]) == 2
    assert r["median_step_s"] > 0 and r["median_train_s"] > 0
    assert r["peak_mb"] >= r["loaded_mb"] > 0
    assert r["train_peak_mb"] is None or r["train_peak_mb"] > 0
    assert r["trainable_params"] > 0
    assert len(r["reward_before"]) == 2 and len(r["before"]) == len(r["after"]) == len(r["prompts"]) == 4
    assert 0 <= r["distinct2_after"] <= 1 and r["config"]["temperature"] == 0.7


def test_time_to_reach_and_summary():
    hist = [{"reward/mean": x, "time/step_s": 2.0, "time/train_s": 1.0} for x in (0.0, 0.1, 0.2, 0.6, 0.7)]
    assert time_to_reach(hist, 0.3) == 8.0   # the 3-step mean (0.1 + 0.2 + 0.6) / 3 = 0.3 at step 4
    assert time_to_reach(hist, 0.9) is None
    fake = {m: {"median_step_s": s, "median_train_s": s / 2, "peak_mb": p, "train_peak_mb": p / 2, "loaded_mb": 500,
                "held_out_before": 0.0, "held_out_after": 0.1, "history": hist, "model": "m", "mode": "lora",
                "steps": 5, "device": "cpu", "threads": 1, "loadavg": 1.0}
            for m, s, p in (("ppo", 4.0, 2000), ("rrhf", 8.0, 1000), ("raft", 2.0, 1500))}
    summary = summarize(fake)
    assert summary["rrhf"]["peak_ratio"] == 0.5 and summary["raft"]["step_ratio"] == 0.5
    table = format_table(fake, summary)
    assert "0.50x" in table and "RAFT" in table


def test_fig4_table_gives_the_initial_model_and_each_method_over_seeds():
    def result(after, ppl):
        return {"held_out_before": 0.1, "held_out_after": after, "ppl_before": 5.0, "ppl_after": ppl,
                "distinct2_before": 0.8, "distinct2_after": 0.6, "prompts": ["p"] * 80}
    runs = {0: {"ppo": result(0.5, 7.0), "raft": result(0.9, 9.0)},
            1: {"ppo": result(0.3, 6.0), "raft": result(0.7, 8.0)}}
    table = fig4_table(runs)
    assert "initial model" in table and "+0.100" in table
    assert "+0.400 [+0.300, +0.500]" in table and "8.50 [8.00, 9.00]" in table   # RAFT's perplexity over 2 seeds
    assert "40 held-out prompts" in table and "RRHF" not in table
