"""Data parallelism: two processes under ``accelerate launch`` (gloo on CPU) equal one process, same global batch."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from alignlib.generation import generate
from alignlib.ppo import PPOConfig, PPOTrainer
from alignlib.raft import RAFTConfig, RAFTTrainer
from alignlib.rrhf import RRHFConfig, RRHFTrainer
from alignlib.training.checkpoint import RunDirectoryError, latest_checkpoint, prepare_output, read_record
from alignlib.training.distributed import make_accelerator, query_seeds, shard
from alignlib.utils import seed_everything

SCRIPT = Path(__file__).with_name("distributed_run.py")
CONFIGS = Path(__file__).parents[1] / "configs" / "accelerate"


def run(out: Path, processes: int) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    # the shipped DDP file, with 2 CPU processes over gloo in fp32 instead of its 8 GPUs in bf16
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
              "--num_processes", str(processes), "--mixed_precision", "no"]
    cmd = (launch if processes > 1 else [sys.executable]) + [str(SCRIPT), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.distributed
def test_two_processes_learn_what_one_process_learns(tmp_path):
    run(tmp_path / "one", 1)
    run(tmp_path / "two", 2)
    for method in ("ppo", "rrhf", "raft"):
        one, two = (json.loads((tmp_path / d / f"{method}.json").read_text()) for d in ("one", "two"))
        assert (one["processes"], two["processes"]) == (1, 2)
        for a, b in zip(one["history"], two["history"], strict=True):
            assert a.keys() == b.keys()
            for key in a:   # the gradient norm catches a loss normalised by the wrong count (Adam would not)
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (method, key)
        w1, w2 = (load_file(tmp_path / d / f"{method}.safetensors") for d in ("one", "two"))
        assert w1.keys() == w2.keys()
        moved = max(w1[k].abs().max().item() for k in w1 if "lora_B" in k)
        assert moved > 1e-3, f"{method} did not train, so equality would prove nothing"
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-3, msg=f"{method}: {k}")


@pytest.mark.unit
def test_row_seeds_make_a_prompts_samples_independent_of_its_batch(tiny):
    model, tokenizer = tiny
    prompts = [f"Say something about number {i}." for i in range(4)]   # same token length: same padding
    seeds = query_seeds(7, 0, 4)
    both = generate(model, tokenizer, prompts, max_new_tokens=5, num_return_sequences=2, row_seeds=seeds)
    alone = generate(model, tokenizer, prompts[2:3], max_new_tokens=5, num_return_sequences=2, row_seeds=seeds[2:3])
    assert both.responses[4:6] == alone.responses
    other = generate(model, tokenizer, prompts[2:3], max_new_tokens=5, num_return_sequences=2, row_seeds=[seeds[2] + 1])
    assert other.responses != alone.responses or other.response_ids.tolist() != alone.response_ids.tolist()
    with pytest.raises(ValueError, match="one per prompt"):
        generate(model, tokenizer, prompts, max_new_tokens=3, row_seeds=seeds[:2])
    # model.generate (sharded models, other architectures) draws the same tokens from the same streams
    slow = generate(model, tokenizer, prompts, max_new_tokens=5, num_return_sequences=2, row_seeds=seeds, fast=False)
    assert slow.response_ids.tolist() == both.response_ids.tolist()


@pytest.mark.unit
def test_shard_splits_evenly_or_says_how_to_fix_it():
    class Acc:
        process_index, num_processes = 1, 2
    assert shard(list(range(6)), Acc()) == [3, 4, 5]
    with pytest.raises(ValueError, match="multiple of 2"):
        shard(list(range(5)), Acc())


@pytest.mark.unit
@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero2", "DEEPSPEED"),
                                        ("zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_parse(name, kind):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


@pytest.mark.unit
def test_the_rollout_is_one_replaceable_function_in_every_trainer(tiny_lora):
    """A serving engine replaces ``sampler``; every trainer's sampling goes through it and nowhere else."""
    calls = []

    def engine(model, tokenizer, prompts, **kw):
        calls.append(len(prompts))
        return generate(model, tokenizer, prompts, **kw)

    model, tok = tiny_lora
    reward = lambda p, r: torch.tensor([float(len(x)) for x in r])  # noqa: E731
    prompts = ["Hi", "Name a fruit."]
    small = dict(max_new_tokens=4)
    PPOTrainer(model, tok, reward, prompts, PPOConfig(batch_size=2, mini_batch_size=2, **small), sampler=engine).step()
    RRHFTrainer(model, tok, reward, prompts, RRHFConfig(batch_size=2, **small), sampler=engine).step()
    RAFTTrainer(model, tok, reward, prompts, RAFTConfig(batch_size=2, k=2, **small), sampler=engine).stage()
    assert calls == [2, 2, 2, 2]   # PPO once; RRHF for its policy and initial samples; RAFT once


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: clear it so this test may choose bf16, and so no later test
    inherits bf16."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.unit
@pytest.mark.parametrize("method", ["ppo", "rrhf", "raft"])
def test_each_trainer_takes_a_bf16_step_under_accelerate_mixed_precision(method, fresh_accelerate_state, tiny_lora):
    """The lab-gpu configs' bf16 autocast (here on CPU): no dtype mismatch anywhere, a finite step that trains."""
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model, tok = tiny_lora
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    reward = lambda p, r: torch.tensor([float(len(x)) for x in r])  # noqa: E731
    trainer, config = {"ppo": (PPOTrainer, PPOConfig(batch_size=2, mini_batch_size=2, max_new_tokens=4)),
                       "rrhf": (RRHFTrainer, RRHFConfig(batch_size=2, chunk_size=2, max_new_tokens=4)),
                       "raft": (RAFTTrainer, RAFTConfig(batch_size=2, k=2, max_new_tokens=4))}[method]
    trainer = trainer(model, tok, reward, ["Hi", "Name a fruit."], config, accelerator=accelerator)
    metrics = trainer.stage() if method == "raft" else trainer.step()
    metrics = metrics[0] if isinstance(metrics, tuple) else metrics
    assert torch.isfinite(torch.tensor(metrics["grad/norm"])) and metrics["grad/norm"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.unit
@pytest.mark.parametrize("method", ["ppo", "rrhf", "raft"])
def test_several_processes_without_per_prompt_seeds_are_refused(method, tiny):
    class TwoProcesses:
        process_index, num_processes = 0, 2

    model, tok = tiny
    trainer, config = {"ppo": (PPOTrainer, PPOConfig()), "rrhf": (RRHFTrainer, RRHFConfig(initial_samples=0)),
                       "raft": (RAFTTrainer, RAFTConfig())}[method]
    with pytest.raises(ValueError, match="seed_per_query=True"):
        trainer(model, tok, lambda p, r: torch.zeros(len(r)), ["Hi"], config, ref_model=model,
                accelerator=TwoProcesses())


@pytest.mark.unit
def test_a_launch_whose_processes_did_not_join_one_group_is_refused(monkeypatch):
    """N independent copies of a run, each believing it is alone, would be silently wrong."""
    class Alone:
        process_index, num_processes = 0, 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="cpu=True"):
        make_accelerator(Alone())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert isinstance(make_accelerator(Alone()), Alone)


@pytest.mark.distributed
def test_the_cli_under_accelerate_launch_writes_one_run(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "-m", "alignlib", "raft", "--model", "tiny-random",
           "--reward", "length", "--steps", "2", "--output", str(tmp_path / "raft")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("[raft] wrote") == 1          # only the main process writes and reports
    record = json.loads((tmp_path / "raft" / "history.json").read_text())
    assert record["status"] == "finished" and record["config"]["seed_per_query"] and len(record["history"]) == 2


@pytest.mark.unit
@pytest.mark.parametrize("method", ["ppo", "raft"])
def test_micro_batches_accumulate_the_same_step(method, fresh_tiny):
    """Gradient accumulation: a mini-batch in micro-batches of 1 gives the step of the whole mini-batch."""
    def run(micro):
        seed_everything(0)
        model, tok = fresh_tiny(lora=True)
        reward = lambda p, r: torch.tensor([float(len(x)) for x in r])  # noqa: E731
        if method == "ppo":
            config = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=6, micro_batch_size=micro)
            trainer = PPOTrainer(model, tok, reward, ["Hi", "Name a fruit.", "Say yes", "Count"], config)
        else:
            config = RAFTConfig(batch_size=4, k=2, max_new_tokens=6, sft_batch_size=4, sft_micro_batch_size=micro)
            trainer = RAFTTrainer(model, tok, reward, ["Hi", "Name a fruit.", "Say yes", "Count"], config)
        metrics = trainer.stage() if method == "raft" else trainer.step()[0]
        return metrics, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, w_whole = run(None)
    parts, w_parts = run(1)
    assert parts["grad/norm"] == pytest.approx(whole["grad/norm"], rel=1e-4)
    for name in w_whole:
        torch.testing.assert_close(w_parts[name], w_whole[name], atol=1e-5, rtol=1e-4)


@pytest.mark.distributed
def test_ctrl_c_under_accelerate_launch_writes_the_interrupt_checkpoint_and_resumes(tmp_path):
    """The terminal sends SIGINT to the whole process group and accelerate forwards it again to each worker: the
    workers agree on one step, the main process checkpoints, and the same launch with --resume finishes the run."""
    out = tmp_path / "rrhf"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
              "--num_processes", "2", "--mixed_precision", "no", "-m", "alignlib", "rrhf", "--model", "tiny-random",
              "--reward", "length", "--steps", "60", "--output", str(out), "--checkpoint-every", "0"]
    job = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    seen = ""
    while "held-out reward before" not in seen:
        line = job.stdout.readline()
        assert line, f"the launch ended before training:\n{seen[-3000:]}"
        seen += line
    time.sleep(3)                                            # a few steps into training
    os.killpg(job.pid, signal.SIGINT)                        # what Ctrl-C in a terminal does
    seen += job.stdout.read()
    job.wait(timeout=120)
    record = read_record(out)
    assert record["status"] == "interrupted", seen[-3000:]
    done = len(record["history"])
    assert 0 < done < 60 and latest_checkpoint(out).name == f"step-{done:06d}"
    with pytest.raises(RunDirectoryError, match="processes: the run used 2, this command asks for 1"):
        prepare_output(out, resume=True, identity={"processes": 1})
    finished = subprocess.run(launch + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resuming {out} after step {done} of 60" in finished.stdout
    assert read_record(out)["status"] == "finished" and len(read_record(out)["history"]) == 60
