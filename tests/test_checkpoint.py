"""The run protocol: checkpoints that resume exactly, run directories that are never replaced silently, and a
clean stop on SIGTERM."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from alignlib.training.checkpoint import (LOCK, MARKER, RunDirectoryError, StageStore, graceful_stop,
                                         latest_checkpoint, load_checkpoint, prepare_output, read_marker, read_record,
                                         release, save_checkpoint)
from alignlib.models import load_model
from alignlib.commands.reward_model import accuracy_over_seeds
from alignlib.training.loop import train_steps
from alignlib.utils import seed_everything

PROMPTS = ["Hello", "Name a colour.", "What is 2 + 2?", "Say something nice."]
VOLATILE = ("time/", "memory/")   # wall-clock and memory metrics differ between any two runs


def build(method: str):
    """A fresh trainer of ``method`` on the tiny model, as a resumed process would build it."""
    from alignlib.ppo import PPOConfig, PPOTrainer
    from alignlib.raft import RAFTConfig, RAFTTrainer
    from alignlib.rrhf import RRHFConfig, RRHFTrainer

    seed_everything(0)                     # as `prepare` does before loading: the same LoRA initialisation
    model, tok = load_model("tiny-random", lora=True)
    if method == "ppo":
        config = PPOConfig(steps=3, batch_size=4, mini_batch_size=2, max_new_tokens=6, adaptive_kl=True)
        return PPOTrainer(model, tok, vowels, PROMPTS, config)
    if method == "rrhf":
        config = RRHFConfig(steps=3, batch_size=2, policy_samples=2, initial_samples=1, max_new_tokens=6, lr=1e-2)
        return RRHFTrainer(model, tok, vowels, [{"prompt": p} for p in PROMPTS], config)
    config = RAFTConfig(stages=3, batch_size=2, k=2, max_new_tokens=6, lr=1e-2)
    return RAFTTrainer(model, tok, vowels, PROMPTS, config)


def stable(history: list[dict]) -> str:
    """The history without wall-clock and memory metrics, as JSON (so that NaN equals NaN)."""
    return json.dumps([{k: v for k, v in h.items() if not k.startswith(VOLATILE)} for h in history], sort_keys=True)


def vowels(prompts, responses) -> torch.Tensor:
    """A reward that differs between the tiny model's candidates (their lengths are all equal)."""
    return torch.tensor([float(sum(c in "aeiou" for c in r)) for r in responses])


@pytest.mark.unit
@pytest.mark.parametrize("method", ["ppo", "rrhf", "raft"])
def test_a_resumed_run_ends_exactly_where_the_uninterrupted_run_does(method, tmp_path):
    record = {"method": method}
    whole = build(method)
    train_steps(whole, tmp_path / "whole", 3, every=0, record=record, progress=False)

    first = build(method)
    train_steps(first, tmp_path / "cut", 2, every=0, record=record, progress=False)   # then the process dies
    del first
    resumed = build(method)
    assert load_checkpoint(tmp_path / "cut", resumed) == 2
    train_steps(resumed, tmp_path / "cut", 3, every=0, record=record, progress=False)

    assert stable(resumed.history) == stable(whole.history)
    a = dict(whole.trainable_module().named_parameters())
    b = dict(resumed.trainable_module().named_parameters())
    changed = [n for n, p in a.items() if p.requires_grad]
    assert changed and all(torch.equal(a[n], b[n]) for n in changed)
    assert latest_checkpoint(tmp_path / "cut").name == "step-000003"
    kept = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step-000002", "step-000003"]          # the newest, and the one before it as a fallback


@pytest.mark.unit
def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = prepare_output(tmp_path / "run")
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "stale.safetensors").write_text("old")
    release(out)
    with pytest.raises(RunDirectoryError, match="--resume.*--overwrite"):
        prepare_output(out)
    with pytest.raises(RunDirectoryError, match="no complete checkpoint"):
        prepare_output(out, resume=True)
    with pytest.raises(ValueError, match="exclude each other"):
        prepare_output(out, resume=True, overwrite=True)
    prepare_output(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, MARKER])   # nothing stale is left beside the new run
    prepare_output(tmp_path / "fresh" / "nested")         # a new directory is created


@pytest.mark.unit
def test_overwrite_deletes_only_what_the_run_protocol_wrote(tmp_path, monkeypatch):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    with pytest.raises(RunDirectoryError, match="not written by alignlib.*nothing was deleted"):
        prepare_output(mine, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "months of work"
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    for output, what in [("", "empty"), (".", "current directory"), ("data", "course data"),
                         ("data/..", "current directory"), (str(repo.parent), "parent of"), ("/", "root")]:
        with pytest.raises(RunDirectoryError, match=what):
            prepare_output(output, overwrite=True)
    assert (repo / "data" / "README.md").exists() and (repo / ".git").exists()
    monkeypatch.chdir(tmp_path / "notes")
    with pytest.raises(RunDirectoryError, match="parent of the current directory"):
        prepare_output(tmp_path, overwrite=True)


@pytest.mark.pipeline
def test_a_second_writer_is_refused_at_once(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from alignlib.training.checkpoint import "
                               "prepare_output; prepare_output(sys.argv[1]); print('held', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for overwrite in (False, True):
            with pytest.raises(RunDirectoryError, match=f"another process \\(pid {holder.pid}\\)"):
                prepare_output(out, overwrite=overwrite)
    finally:
        holder.kill()
        holder.wait()
    prepare_output(out, overwrite=True)            # the lock died with its process


def tiny_args(out, **change):
    return types.SimpleNamespace(**{**dict(preset="cpu", model="tiny-random", reward="length", steps=2, seed=0,
                                           output=str(out), resume=False, overwrite=False, checkpoint_every=0),
                                    **change})


@pytest.mark.pipeline
def test_resume_refuses_another_method_model_reward_seed_or_a_smaller_budget(tmp_path):
    from alignlib.commands.run import run_named

    out = tmp_path / "ppo"
    run_named("ppo", tiny_args(out, steps=2))
    release(out)
    with pytest.raises(RunDirectoryError, match="method: the run used 'ppo', this command asks for 'raft'"):
        run_named("raft", tiny_args(out, resume=True))
    with pytest.raises(RunDirectoryError, match="reward: .*'length'.*'sentiment'.*seed: the run used 0"):
        run_named("ppo", tiny_args(out, resume=True, reward="sentiment", seed=1))
    with pytest.raises(RunDirectoryError, match="steps: 1 is fewer than the 2"):
        run_named("ppo", tiny_args(out, resume=True, steps=1))
    with pytest.raises(RunDirectoryError, match="already finished its 2 steps"):
        run_named("ppo", tiny_args(out, resume=True, steps=None))
    assert read_record(out)["method"] == "ppo"                       # nothing was rewritten by the refusals
    record = run_named("ppo", tiny_args(out, resume=True, steps=3))           # a larger budget extends the run
    assert len(record["history"]) == 3 and read_marker(out)["identity"]["steps"] == 3


@pytest.mark.unit
def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path):
    whole = build("rrhf")
    train_steps(whole, tmp_path, 3, every=1, record={"method": "rrhf"}, progress=False)
    newest = latest_checkpoint(tmp_path)
    weights = newest / "trainable.safetensors"
    weights.write_bytes(os.urandom(weights.stat().st_size))          # same size, random bytes
    said = []
    resumed = build("rrhf")
    assert load_checkpoint(tmp_path, resumed, say=lambda *a, **k: said.append(a[0])) == 2
    assert "trainable.safetensors is damaged" in said[0]
    (tmp_path / "checkpoints" / "step-000002" / "state.json").write_text("{")
    with pytest.raises(RunDirectoryError, match="every checkpoint .* is damaged.*--overwrite"):
        load_checkpoint(tmp_path, build("rrhf"), say=lambda *a, **k: None)
    (tmp_path / MARKER).write_text(json.dumps({"identity": {}}))
    with pytest.raises(RunDirectoryError, match="--resume: every checkpoint .* is damaged"):
        prepare_output(tmp_path, resume=True)              # found before the model loads


@pytest.mark.unit
def test_a_full_disk_or_non_finite_weights_leave_the_last_good_checkpoint(tmp_path, monkeypatch):
    import errno

    import alignlib.training.checkpoint as ckpt

    trainer = build("raft")
    train_steps(trainer, tmp_path, 1, every=1, record={"method": "raft"}, progress=False)
    trainer.history.append({})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(RunDirectoryError, match="No space left.*last good checkpoint is .*step-000001.*--resume"):
        save_checkpoint(tmp_path, trainer)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000001"]
    with torch.no_grad():
        next(p for p in trainer.trainable_module().parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="not finite.*last good checkpoint is .*step-000001"):
        save_checkpoint(tmp_path, trainer)
    assert latest_checkpoint(tmp_path).name == "step-000001"


@pytest.mark.unit
def test_a_stage_store_resumes_with_the_rng_where_the_stage_ended(tmp_path):
    def draw():
        return {"torch": torch.rand(2).tolist(), "python": random.random(), "numpy": float(np.random.rand())}

    seed_everything(0)
    whole = [StageStore(tmp_path / "a").run(name, draw) for name in ("one", "two")]
    seed_everything(0)
    StageStore(tmp_path / "b").run("one", draw)            # then the process dies
    seed_everything(5)                                     # a new process, whatever its seed
    resumed = [StageStore(tmp_path / "b").run(name, draw) for name in ("one", "two")]
    assert resumed == whole
    result = tmp_path / "b" / "stages" / "two" / "result.json"
    result.write_text(result.read_text().replace("0", "1"))
    with pytest.raises(RunDirectoryError, match="the finished stage two is damaged.*result.json"):
        StageStore(tmp_path / "b").load("two")


@pytest.mark.unit
def test_the_same_signal_delivered_twice_is_one_stop_request():
    with graceful_stop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)              # terminal and accelerate launch both forward Ctrl-C
        assert stop.signum == signal.SIGINT


@pytest.mark.unit
def test_an_unwritable_output_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirectoryError, match="cannot write to the output directory"):
        prepare_output(blocker / "run")


@pytest.mark.pipeline
def test_sigterm_writes_a_checkpoint_and_resume_finishes_the_run(tmp_path, monkeypatch):
    from alignlib.ppo import PPOTrainer
    from alignlib.commands.run import run_named

    real_step, calls = PPOTrainer.step, []

    def step_then_signal(self):               # SIGTERM arrives while the second step is running
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self)

    monkeypatch.setattr(PPOTrainer, "step", step_then_signal)
    handler_before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "ppo"
    args = tiny_args(out, steps=3)
    with pytest.raises(SystemExit) as stop:
        run_named("ppo", args)
    assert stop.value.code == 128 + signal.SIGTERM
    record = read_record(out)
    assert record["status"] == "interrupted" and len(record["history"]) == 2   # the running step finished
    assert latest_checkpoint(out).name == "step-000002"
    assert signal.getsignal(signal.SIGTERM) == handler_before            # the run's handler is removed again

    with pytest.raises(RunDirectoryError, match="--resume"):
        run_named("ppo", args)                                            # the interrupted run is not replaced silently
    release(out)
    run_named("ppo", types.SimpleNamespace(**{**vars(args), "resume": True}))
    record = json.loads((out / "history.json").read_text())
    assert record["status"] == "finished" and len(record["history"]) == 3
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.pipeline
def test_report_to_tensorboard_logs_every_step_offline_with_gradient_checkpointing(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from alignlib.commands.run import run_named

    out = tmp_path / "rrhf"
    args = types.SimpleNamespace(preset="cpu", model="tiny-random", reward="length", steps=2, seed=0,
                                 output=str(out), resume=False, overwrite=False, checkpoint_every=0,
                                 report_to="tensorboard", gradient_checkpointing=True)
    record = run_named("rrhf", args)
    assert record["status"] == "finished"
    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    steps = [e.step for e in events.Scalars("reward/mean")]
    assert steps == [1, 2]
    assert [e.value for e in events.Scalars("grad/norm")] == pytest.approx([h["grad/norm"] for h in record["history"]])


@pytest.mark.pipeline
def test_reward_model_training_resumes_exactly_and_writes_its_run_directory(tmp_path):
    import alignlib.reward_model as rm
    from alignlib.data import load_course_dataset

    pairs = load_course_dataset("preference_pairs", "train").select(range(24))
    config = rm.RewardModelConfig(epochs=2, batch_size=8, max_length=1024, warmup_ratio=0.2)

    def build():
        model, tok = rm.load_reward_model("tiny-random", seed=0)
        return rm.RewardModelTrainer(model, tok, pairs, config, eval_pairs=pairs.select(range(8)))

    record = {"method": "reward-model"}
    whole = build()
    train_steps(whole, tmp_path / "whole", whole.total, every=0, record=record, progress=False)
    first = build()
    train_steps(first, tmp_path / "cut", 4, every=0, record=record, progress=False)   # mid-epoch 2, then killed
    resumed = build()
    assert load_checkpoint(tmp_path / "cut", resumed) == 4
    train_steps(resumed, tmp_path / "cut", resumed.total, every=0, record=record, progress=False)
    assert whole.total == 6 and stable(resumed.records()) == stable(whole.records())   # lr schedule and evals too
    a, b = whole.trainable_module().state_dict(), resumed.trainable_module().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    rows = accuracy_over_seeds(seeds=[0], epochs=1, max_train_pairs=16, model="tiny-random", max_length=1024,
                                  output=str(tmp_path / "cli"))
    saved = read_record(tmp_path / "cli" / "seed-0")
    assert saved["status"] == "finished" and saved["test"]["accuracy"] == rows[0]["test"]
    assert (tmp_path / "cli" / "seed-0" / "model" / "model.safetensors").exists()
    with pytest.raises(RunDirectoryError, match="--resume"):
        accuracy_over_seeds(seeds=[0], model="tiny-random", output=str(tmp_path / "cli"))


@pytest.mark.unit
def test_a_diverged_step_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = build("rrhf")
    train_steps(trainer, tmp_path, 1, every=1, record={"method": "rrhf"}, progress=False)

    def diverge():
        raise FloatingPointError("training: a weight became non-finite in this optimizer step.")

    monkeypatch.setattr(trainer, "step", diverge)
    with pytest.raises(FloatingPointError, match="non-finite.*last good checkpoint is .*step-000001: --resume"):
        train_steps(trainer, tmp_path, 2, every=1, record={"method": "rrhf"}, progress=False)
