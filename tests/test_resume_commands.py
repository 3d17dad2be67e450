"""The run protocol of the commands that are not step loops: soups, the tour, reward-model over seeds, ppo-check and
method-bench check their output before any work, keep what finished, stop cleanly on SIGINT/SIGTERM and resume."""
import json
import os
import signal
import subprocess
import sys
import types

import pytest
import torch

from alignlib.training.checkpoint import RunDirectoryError, release

VOLATILE = ("seconds", "time/", "memory/", "machine", "loadavg", "wall_s")   # wall-clock and machine fields


def stable(obj) -> str:
    """``obj`` without wall-clock, memory and machine fields, as JSON (so that NaN equals NaN)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.startswith(VOLATILE)}
        return [strip(v) for v in x] if isinstance(x, list) else x
    return json.dumps(strip(obj), sort_keys=True)


def signal_on_call(fn, n: int, signum: int, calls: list):
    """``fn`` that sends ``signum`` to this process when it is called for the n-th time (then runs as usual)."""
    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signum)
        return fn(*args, **kwargs)
    return wrapped


# ---------------------------------------------------------------- soups

def letters(p, r): return torch.tensor([float(sum(c.isalpha() for c in x)) for x in r])
def lower(p, r): return torch.tensor([float(sum(c.islower() for c in x)) for x in r])
def other(p, r): return torch.tensor([float(sum(not c.isalnum() for c in x)) for x in r])


REWARDS = {"letters": letters, "lower": lower, "other": other}   # rewards that vary on the tiny model's answers


def soups_args(out, **change):
    return types.SimpleNamespace(**{**dict(preset="tiny", steps=1, seed=0, output=str(out), json=None, threads=None,
                                           resume=False, overwrite=False, _config_fields=["steps"]), **change})


@pytest.mark.pipeline
def test_soups_stopped_during_a_training_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    import alignlib.soups as soups
    from alignlib.commands.soups import run as soups_command

    monkeypatch.setattr(soups, "make_reward", REWARDS.__getitem__)
    monkeypatch.setitem(soups.SoupsConfig.PRESETS, "tiny", dict(
        model="tiny-random", rewards=tuple(REWARDS), lambdas=3, simplex_steps=2, morl_mus=(0.5,), eval_prompts=8,
        samples=2, max_new_tokens=8))                               # 3 experts, 2 MORL trainings, 9 evaluations
    whole = tmp_path / "whole"
    soups_command(soups_args(whole, json=str(tmp_path / "results" / "soups.json")))
    release(whole)

    real, calls = soups.train_policy, []
    monkeypatch.setattr(soups, "train_policy", signal_on_call(real, 2, signal.SIGINT, calls))   # Ctrl-C in training 2
    cut = tmp_path / "cut"
    with pytest.raises(SystemExit) as stop:
        soups_command(soups_args(cut))
    assert stop.value.code == 128 + signal.SIGINT
    assert sorted(p.name for p in (cut / "stages").iterdir()) == ["eval-initial", "expert-letters", "expert-lower"]
    assert not (cut / "soups.json").exists()
    release(cut)
    with pytest.raises(RunDirectoryError, match="already holds a run; pass --resume.*--overwrite"):
        soups_command(soups_args(cut))
    with pytest.raises(RunDirectoryError, match="seed: the run used 0, this command asks for 1"):
        soups_command(soups_args(cut, resume=True, seed=1))
    with pytest.raises(RunDirectoryError, match="trainer_steps: the run used 1, this command asks for 2"):
        soups_command(soups_args(cut, resume=True, steps=2))
    calls.clear()
    monkeypatch.setattr(soups, "train_policy", signal_on_call(real, 0, signal.SIGINT, calls))    # counts, no signal
    soups_command(soups_args(cut, resume=True))
    assert len(calls) == 3                                          # only the trainings that had not finished

    a, b = (json.loads((d / "soups.json").read_text()) for d in (whole, cut))
    assert stable(a) == stable(b) and a["points"]["rs:0.5000,0.5000"]["rewards"]
    assert json.loads((tmp_path / "results" / "soups.json").read_text()) == a
    for stage in ("expert-letters", "expert-lower", "expert-other", "morl-0.5000,0.5000,0.0000"):
        path = f"stages/{stage}/adapter.safetensors"
        assert (whole / path).read_bytes() == (cut / path).read_bytes()


# ---------------------------------------------------------------- the tour

@pytest.mark.pipeline
def test_the_tour_stopped_between_steps_resumes_to_the_uninterrupted_report(tmp_path, monkeypatch):
    import alignlib.commands.tour as tour

    small = dict(n_prompts=2, max_new_tokens=6, steps=1)
    whole = tmp_path / "whole"
    tour.run("tiny-random", report=whole, resume=False, overwrite=False, **small)
    release(whole)
    with pytest.raises(RunDirectoryError, match="already holds a run; pass --resume.*--overwrite.*another --report"):
        tour.run("tiny-random", report=whole, **small)             # a second plain run is refused, nothing runs

    real, calls = tour.tour_method, []
    monkeypatch.setattr(tour, "tour_method", signal_on_call(real, 2, signal.SIGTERM, calls))   # during RRHF
    cut = tmp_path / "cut"
    with pytest.raises(SystemExit) as stop:
        tour.run("tiny-random", report=cut, **small)
    assert stop.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in (cut / "stages").iterdir()) == ["ppo", "rrhf", "sample"]
    assert not (cut / "report.md").exists()
    release(cut)
    with pytest.raises(RunDirectoryError, match="method_steps: the run used 1, this command asks for 2"):
        tour.run("tiny-random", report=cut, resume=True, **{**small, "steps": 2})
    calls.clear()
    monkeypatch.setattr(tour, "tour_method", signal_on_call(real, 0, signal.SIGTERM, calls))    # counts, no signal
    result = tour.run("tiny-random", report=cut, resume=True, **small)
    assert len(calls) == 1                                          # RAFT only: PPO and RRHF were read back
    a, b = (json.loads((d / "histories.json").read_text()) for d in (whole, cut))
    assert (stable(a) == stable(b) and len(b["ppo"]) == 1
            and b["rrhf"][0]["reward/mean"] == result["rrhf"][0]["reward/mean"])
    assert (cut / "report.md").read_text().count("| RRHF | 1 |") == 1


# ---------------------------------------------------------------- reward-model over seeds

@pytest.mark.pipeline
def test_reward_model_seeds_resume_skip_finished_seeds_and_stop_between_seeds(tmp_path, monkeypatch):
    import alignlib.reward_model as rm
    from alignlib.commands.reward_model import accuracy_over_seeds

    small = dict(seeds=[0, 1], epochs=1, max_train_pairs=16, model="tiny-random", max_length=1024)
    whole = tmp_path / "whole"
    rows = accuracy_over_seeds(output=str(whole), **small)
    for seed in (0, 1):
        release(whole / f"seed-{seed}")
    with pytest.raises(RunDirectoryError, match="epochs: the run used 1, this command asks for 2"):
        accuracy_over_seeds(output=str(whole), resume=True, **{**small, "epochs": 2})

    def retrained(*args, **kwargs):
        raise AssertionError("a finished seed was trained again")

    with monkeypatch.context() as m:
        m.setattr(rm, "run", retrained)
        assert accuracy_over_seeds(output=str(whole), resume=True, **{**small, "epochs": None}) == rows

    real_run, calls = rm.run, []

    def run_then_sigint(*args, **kwargs):        # Ctrl-C after seed 0's training, before its shifted evaluation
        out = real_run(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(rm, "run", run_then_sigint)
    cut = tmp_path / "cut"
    with pytest.raises(SystemExit) as stop:
        accuracy_over_seeds(output=str(cut), **small)
    assert stop.value.code == 128 + signal.SIGINT
    assert json.loads((cut / "seed-0" / "history.json").read_text())["row"] == rows[0]
    assert not (cut / "seed-1" / "checkpoints").exists()           # seed 1 had not started
    for seed in (0, 1):
        release(cut / f"seed-{seed}")
    assert accuracy_over_seeds(output=str(cut), resume=True, **small) == rows
    assert len(calls) == 2                                          # seed 1 only


# ---------------------------------------------------------------- ppo-check (workers replaced by a stand-in)

FAKE_WORKER = r'''
import json, os, signal, sys, time
spec, path, mode = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(os.environ["WORKER_LOG"], "a") as log:
    log.write(f"{spec['seed']}\n")
if mode == "signal" and spec["seed"] == 1:        # the parent is asked to stop while this run is going
    os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(60)
h = [{"policy/entropy": 1.0, "value/explained_var": 0.5, "kl/ref": 1.0}] * 3
run = {**spec, "seconds": 1.0, "prompts": ["p"], "before": ["a"], "after": ["b"], "reward_before": [0.0],
       "reward_after": [0.5 + spec["seed"]], "distinct2_before": 1.0, "distinct2_after": 1.0, "history": h}
open(path, "w").write(json.dumps(run))
'''


@pytest.mark.unit
def test_ppo_check_keeps_finished_runs_when_stopped_and_resume_runs_only_the_rest(tmp_path, monkeypatch):
    import time

    import alignlib.bench.ppo_check as pc
    from alignlib.training.checkpoint import prepare_results  # noqa: F401  (finished runs are kept beside --json)

    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    log = tmp_path / "workers.log"
    monkeypatch.setenv("WORKER_LOG", str(log))
    mode = {"now": "signal"}
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kw: real_popen(
        [sys.executable, str(fake), argv[-2], argv[-1], mode["now"]], **kw))

    def perplexity(runs, model_name=None):
        for r in runs:
            r["ppl_before"], r["ppl_after"] = 5.0, 6.0

    monkeypatch.setattr(pc, "reference_perplexity", perplexity)
    out = tmp_path / "check" / "ppo_check.json"
    args = types.SimpleNamespace(seeds=[0, 1, 2], threads=[1], kl_coefs=None, steps=None, task="sentiment",
                                 min_gain=None, kl_budget=12.0, parallel=1, json=str(out), rejudge=False,
                                 resume=False, overwrite=False)
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        pc.run(args)
    assert stop.value.code == 128 + signal.SIGTERM and time.monotonic() - start < 30   # the sleeping worker was ended
    assert not out.exists()
    stages = out.parent / "ppo_check.runs" / "stages"
    assert sorted(p.name for p in stages.iterdir()) == ["seed-0_threads-1_beta-0.05"]
    release(out.parent / "ppo_check.runs")
    with pytest.raises(RunDirectoryError, match="already holds a run; pass --resume.*--overwrite"):
        pc.run(args)
    with pytest.raises(RunDirectoryError, match="seeds: the run used \\[0, 1, 2\\]"):
        pc.run(types.SimpleNamespace(**{**vars(args), "resume": True, "seeds": [0, 1]}))

    mode["now"], before = "plain", log.read_text()
    assert pc.run(types.SimpleNamespace(**{**vars(args), "resume": True})) == 0
    assert log.read_text()[len(before):].split() == ["1", "2"]     # seed 0 was not run again
    stored = json.loads(out.read_text())
    assert [r["seed"] for r in stored["runs"]] == [0, 1, 2] and stored["runs"][2]["reward_after"] == [2.5]
    release(out.parent / "ppo_check.runs")
    with pytest.raises(RunDirectoryError, match="ppo_check.json already exists; pass --overwrite"):
        pc.run(args)                                                 # a finished check is not replaced silently


# ---------------------------------------------------------------- method-bench

@pytest.mark.pipeline
def test_method_bench_keeps_finished_runs_when_stopped_and_resume_runs_only_the_rest(tmp_path, monkeypatch):
    import alignlib.bench.methods as mb
    from alignlib.training.checkpoint import prepare_results  # noqa: F401  (finished runs are kept beside --json)

    out = tmp_path / "bench.json"
    args = types.SimpleNamespace(model="tiny-random", steps=1, mode="lora", methods=["ppo", "raft"],
                                 threads=1, seeds=[0], held_out=2, json=str(out), resume=False, overwrite=False)
    real_popen, started, signal_at = subprocess.Popen, [], {"run": 2}

    def popen(*a, **kw):                       # SIGTERM as soon as the second run (RAFT, seed 0) has started
        proc = real_popen(*a, **kw)
        started.append(proc)
        if len(started) == signal_at["run"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(SystemExit) as stop:
        mb.run(args)
    assert stop.value.code == 128 + signal.SIGTERM
    assert started[1].returncode not in (None, 0)                   # RAFT's process was ended, not waited for
    stages = tmp_path / "bench.runs" / "stages"
    assert sorted(p.name for p in stages.iterdir()) == ["seed-0_ppo"]
    ppo = json.loads((stages / "seed-0_ppo" / "result.json").read_text())
    release(tmp_path / "bench.runs")
    with pytest.raises(RunDirectoryError, match="already holds a run; pass --resume.*--overwrite"):
        mb.run(args)

    with pytest.raises(RunDirectoryError, match="seeds: the run used \\[0\\], this command asks for \\[0, 1\\]"):
        mb.run(types.SimpleNamespace(**{**vars(args), "resume": True, "seeds": [0, 1]}))

    started.clear()
    signal_at["run"] = 0
    result = mb.run(types.SimpleNamespace(**{**vars(args), "resume": True}))
    assert len(started) == 1                                        # RAFT only; PPO was read back
    assert result["runs"]["0"]["ppo"]["history"] == ppo["history"] and set(result["runs"]["0"]) == {"ppo", "raft"}
    assert json.loads(out.read_text())["runs"]["0"]["raft"]["steps"] == 1
    release(tmp_path / "bench.runs")
    with pytest.raises(RunDirectoryError, match="bench.json already exists; pass --overwrite"):
        mb.run(args)
