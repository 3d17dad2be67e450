"""alignlib PPO vs TRL GRPO benchmark: each method runs 2 steps on the tiny model and reports what it should.

No timing assertions: the numbers only have to exist, be finite and (times, memory) positive.
"""
import argparse
import json
import math
import subprocess
import sys

import pytest
import torch

from alignlib.commands.bench import peer_bench_arguments
from alignlib.bench.peer import (BenchSettings, bench_ppo, bench_trl, comparison, format_table,
                                 trl_config)

TINY = dict(model="tiny-random", steps=2, prompts_per_step=4, generations=4, max_new_tokens=8, mini_batch_size=8,
            epochs=2, held_out=4, threads=1)
KEYS = ["median_step_s", "median_generate_s", "peak_rss_mb", "reward_last_step", "held_out_reward_before",
        "held_out_reward_after", "trainable_params", "optimizer_steps", "mean_completion_tokens", "step_seconds",
        "reward_per_step", "settings"]


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()  # the bench sets 1 thread (fast for the tiny model); restore afterwards
    try:
        out = {"ppo": bench_ppo(BenchSettings(**TINY), progress=False),
               "trl": bench_trl(BenchSettings(**TINY), progress=False)}
    finally:
        torch.set_num_threads(threads)
    return out


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.unit
@pytest.mark.parametrize("method", ["ppo", "trl"])
def test_each_method_reports_finite_numbers(results, method):
    r = results[method]
    assert set(KEYS) <= set(r), set(KEYS) - set(r)
    assert len(r["step_seconds"]) == 2 and all(positive(t) for t in r["step_seconds"])
    assert positive(r["median_step_s"]) and positive(r["median_generate_s"])
    assert positive(r["peak_rss_mb"]) and positive(r["trainable_params"])
    if sys.platform.startswith("linux"):
        assert positive(r["train_peak_rss_mb"]) and r["train_peak_rss_mb"] <= r["peak_rss_mb"] + 1e-6
    for key in ("reward_last_step", "held_out_reward_before", "held_out_reward_after"):
        assert math.isfinite(r[key]) and -1 <= r[key] <= 1  # VADER compound
    assert len(r["reward_per_step"]) == 2
    assert r["optimizer_steps"] == 2 * 2 * (16 // 8), "2 steps x (2 passes x 2 mini-batches)"
    assert 0 < r["mean_completion_tokens"] <= 8
    json.dumps(r)  # the subprocess protocol is JSON


@pytest.mark.unit
def test_same_work_and_adapter(results):
    ppo, trl = results["ppo"], results["trl"]
    hidden = 64  # tiny-random; PPO adds a Linear(hidden, 1) value head to the same LoRA adapter
    assert ppo["trainable_params"] - trl["trainable_params"] == hidden + 1
    assert ppo["completions_per_step"] == trl["completions_per_step"] == 16
    assert trl["trl_gradient_checkpointing"] is False
    # the same sampler, seed and (LoRA B = 0) weights before training: the same held-out reward
    assert ppo["held_out_reward_before"] == trl["held_out_reward_before"]


@pytest.mark.unit
def test_table_and_ratios(results):
    cmp = comparison(results)
    assert positive(cmp["median_step_s_ratio"]) and positive(cmp["peak_rss_mb_ratio"])
    table = format_table(results)
    assert "alignlib/TRL" in table and "seconds / step" in table and "goal" in table


@pytest.mark.unit
def test_trl_config_mirrors_ppo_schedule(tmp_path):
    s = BenchSettings(**TINY)
    args = trl_config(s, str(tmp_path))
    assert args.generation_batch_size == s.completions_per_step == 16
    assert args.steps_per_generation * args.num_iterations == s.optimizer_steps_per_step == 4
    assert args.max_steps == s.steps * 4 and args.beta == s.kl_coef and args.learning_rate == s.lr
    assert not args.gradient_checkpointing and not args.bf16 and args.report_to in ([], "none", ["none"])


@pytest.mark.unit
def test_settings_round_trip_and_validation():
    s = BenchSettings(**TINY, trl_gradient_checkpointing=True)
    parsed = peer_bench_arguments(argparse.ArgumentParser()).parse_args(s.to_argv())
    assert BenchSettings.from_args(parsed) == s
    with pytest.raises(ValueError, match="divide"):
        BenchSettings(prompts_per_step=3, generations=3, mini_batch_size=8).validate()
    with pytest.raises(ValueError, match="warm-up"):
        BenchSettings(steps=1).validate()


@pytest.mark.pipeline
def test_standalone_module_prints_json():
    argv = BenchSettings(**{**TINY, "max_new_tokens": 4, "held_out": 2}).to_argv()
    proc = subprocess.run([sys.executable, "-m", "alignlib.bench.peer", "--method", "ppo", *argv],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["method"] == "ppo" and positive(out["median_step_s"])
