"""Full runs behind the CLI's method commands: load the preset's pieces, train with checkpoints, evaluate, save.

Every method writes the same run directory (``alignlib.checkpoint``): ``<output>/history.json`` (config, task,
held-out evaluation before and after, one dict of metrics per step, status), rewritten at every checkpoint;
``<output>/checkpoints/`` (the newest complete checkpoint, every ``--checkpoint-every`` steps, at the end and on
SIGINT/SIGTERM); and ``<output>/adapter`` (the trained LoRA adapter, safetensors) at the end. An existing run
directory is refused unless ``--resume`` (continue from its checkpoint) or ``--overwrite`` is given, and the
directory is checked before the model is loaded.

Under ``accelerate launch`` (``accelerate launch [--config_file configs/accelerate/ddp.yaml] -m alignlib rrhf``)
every process trains its share of each batch (``alignlib.distributed``, sampling seeded per prompt) and only the
main process writes the run directory.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import (CHECKPOINT_EVERY, _good_copy, graceful_stop, load_checkpoint, prepare_output, read_marker,
                         read_record, save_checkpoint, write_record)
from .distributed import process_state
from .generation import generate
from .models import load_model
from .presets import build_reward, get_task, load_task_prompts
from .utils import seed_everything

@torch.no_grad()
def evaluate(model, tokenizer, reward_fn, prompts: list[str], max_new_tokens: int, chat: bool, seed: int = 1234,
             temperature: float = 1.0) -> dict:
    """Mean reward of sampled responses on held-out prompts (fixed seed: before/after are comparable)."""
    roll = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat, seed=seed,
                    temperature=temperature)
    rewards = reward_fn(roll.prompts, roll.responses)
    return {"reward/mean": rewards.mean().item(), "samples": list(zip(roll.prompts[:4], roll.responses[:4]))}


def prepare(args):
    """The preset's task, a LoRA policy, the reward function, train prompts and held-out prompts."""
    task = get_task(args.preset)
    seed_everything(args.seed)
    model, tokenizer = load_model(args.model or task.model, lora=True)
    if getattr(args, "gradient_checkpointing", False):
        model.enable_input_require_grads()       # LoRA: the frozen embeddings' output must carry gradients
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    reward_fn = build_reward(args.reward or task.reward)
    held_out = load_task_prompts(task.prompts, "test", n=task.eval_prompts)
    return task, model, tokenizer, reward_fn, held_out


def make_tracker(report_to: str, out: Path, record: dict):
    """``--report-to``: accelerate's TensorBoard (offline, ``<output>/tensorboard``) or W&B tracker, or None."""
    if report_to in (None, "none"):
        return None
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    if report_to == "tensorboard":
        tracker = TensorBoardTracker(record["method"], out / "tensorboard")
    elif report_to == "wandb":
        tracker = WandBTracker(record["method"])
    else:
        raise ValueError(f"--report-to must be none, tensorboard or wandb, got {report_to!r}.")
    tracker.start()
    tracker.store_init_configuration({k: v for k, v in record["config"].items() if isinstance(v, (int, float, str, bool))})
    return tracker


def train_steps(trainer, out, total: int, every: int, record: dict, progress: bool = True, tracker=None) -> int | None:
    """Step ``trainer`` until its history holds ``total`` steps; checkpoint every ``every`` steps (0: never in
    between), after the last one, and when SIGINT/SIGTERM asks to stop. Returns the signal number if stopped.
    Only the main process writes (the others hold the same weights)."""
    step = trainer.stage if hasattr(trainer, "stage") else trainer.step   # RAFT counts stages
    main = process_state().is_main_process
    bar = tqdm(total=total, initial=len(trainer.history), desc=record["method"].upper(),
               disable=not (progress and main))
    with graceful_stop() as stop:
        while len(trainer.history) < total:
            try:
                metrics = step()
            except FloatingPointError as err:       # name the checkpoint that holds good weights
                raise FloatingPointError(f"{err} {_good_copy(out)}") from None
            metrics = metrics[0] if isinstance(metrics, tuple) else metrics          # PPO also returns its rollout
            bar.update(1)
            shown = "reward/mean" if "reward/mean" in metrics else "loss/total"    # a reward model has no reward
            bar.set_postfix({shown.split("/")[0]: f"{metrics[shown]:+.3f}"})
            done = len(trainer.history)
            if tracker is not None and main:
                tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=done)
            signum = agreed_stop(stop.signum)
            if main and (signum or done == total or (every and done % every == 0)):
                save_checkpoint(out, trainer)
                status = "interrupted" if signum and done < total else "training"
                write_record(out, {**record, "history": trainer.history, "status": status})
            if signum:
                return signum
    bar.close()
    return None


def agreed_stop(signum: int | None) -> int | None:
    """The stop request of any process, so that all processes of a launch stop after the same step (only the
    main process writes the checkpoint; a process that stopped alone would leave the others waiting)."""
    state = process_state()
    if state.num_processes == 1:
        return signum
    flag = torch.tensor([signum or 0], device=state.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) or None


def resume_run(name: str, out: Path, trainer, total: int, say=print) -> None:
    """Load ``out``'s newest checkpoint into ``trainer`` and say where the run continues."""
    say(f"[{name}] resuming {out} after step {load_checkpoint(out, trainer)} of {total}")


def stop_run(name: str, out: Path, trainer, total: int, signum: int, say=print):
    """After SIGINT/SIGTERM (the checkpoint is written): say how to continue, exit with 128 + the signal."""
    say(f"[{name}] stopped after step {len(trainer.history)} of {total}; checkpoint written to {out}. "
        f"Run the same command with --resume to continue.", flush=True)
    raise SystemExit(128 + signum)


def run_identity(name: str, args, steps: int | None) -> dict:
    """What a run directory is a run of: ``--resume`` refuses to continue it with anything else (``steps`` may
    grow). ``steps`` None: the stored budget on resume."""
    task = get_task(args.preset)
    return {"method": name, "model": getattr(args, "model", None) or task.model, "preset": args.preset,
            "prompts": task.prompts, "reward": getattr(args, "reward", None) or task.reward, "seed": args.seed,
            "processes": process_state().num_processes, "steps": steps}


def run_method(name: str, args, make_trainer, identity: dict | None = None) -> dict:
    """Check the output, evaluate, train with ``make_trainer(task, model, tokenizer, reward_fn, steps) ->
    (trainer, config)`` and checkpoints, evaluate, save. The same protocol for every method, so their run
    directories compare. ``identity`` (``run_identity``) is stored with the run and compared on ``--resume``."""
    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite", False)
    every = getattr(args, "checkpoint_every", CHECKPOINT_EVERY)
    if every is None or every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0 (0: only at the end and when stopped), got {every}.")
    state = process_state()
    main = state.is_main_process
    identity = identity or run_identity(name, args, getattr(args, "steps", None))
    if main:
        out = prepare_output(args.output, resume=resume, overwrite=overwrite, identity=identity)
        identity = read_marker(out)["identity"]
    else:
        out = Path(args.output)
    state.wait_for_everyone()                                                   # checked before minutes of loading
    if state.num_processes > 1:                                                 # the resolved budget, on every rank
        shared = [identity]
        torch.distributed.broadcast_object_list(shared, src=0)
        identity = shared[0]
    task, model, tokenizer, reward_fn, held_out = prepare(args)
    trainer, config = make_trainer(task, model, tokenizer, reward_fn, identity["steps"])
    total = config.stages if name == "raft" else config.steps
    if resume:
        before = read_record(out)["before"]
        resume_run(name, out, trainer, total, state.print)
    else:
        before = evaluate(model, tokenizer, reward_fn, held_out, config.max_new_tokens, task.chat,
                          temperature=config.temperature)
        state.print(f"[{name}] held-out reward before: {before['reward/mean']:+.3f}")
    record = {"method": name, "identity": identity, "config": asdict(config), "task": asdict(task), "before": before}
    if main:
        write_record(out, {**record, "history": trainer.history, "status": "training"})
    tracker = make_tracker(getattr(args, "report_to", "none"), out, record) if main else None
    signum = train_steps(trainer, out, total, every, record, tracker=tracker)
    if tracker is not None:
        tracker.finish()
    if signum is not None:
        stop_run(name, out, trainer, total, signum, state.print)
    history = trainer.history
    after = evaluate(model, tokenizer, reward_fn, held_out, config.max_new_tokens, task.chat,
                     temperature=config.temperature)
    last = history[-1]
    state.print(f"[{name}] held-out reward after {len(history)} steps: {after['reward/mean']:+.3f} "
          f"(KL to reference {last.get('kl/ref', float('nan')):.2f} nats, peak memory {last['memory/peak_mb']:.0f} MB, "
          f"{sum(h['time/step_s'] for h in history):.0f} s)")
    record.update(after=after, history=history, status="finished")
    if main:
        write_record(out, record)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(out / "adapter", safe_serialization=True)
        state.print(f"[{name}] wrote {out}/history.json, {out}/adapter and {out}/checkpoints")
    state.wait_for_everyone()
    return record


TRAINERS = {  # method -> (module, config class, trainer class, the config field that counts iterations)
    "ppo": ("ppo", "PPOConfig", "PPOTrainer", "steps"),
    "rrhf": ("rrhf", "RRHFConfig", "RRHFTrainer", "steps"),
    "raft": ("raft", "RAFTConfig", "RAFTTrainer", "stages"),
}


def make_trainer(method: str, policy, tokenizer, reward_fn, prompts, preset: str = "cpu", steps: int | None = None,
                 **overrides):
    """PPO, RRHF or RAFT from its config ``preset`` with ``overrides``; ``steps`` sets the iteration count (RAFT:
    stages; 0 or a negative count reaches the config, which rejects it). The CLI, the tour and the soups use it."""
    if method not in TRAINERS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(TRAINERS)}.")
    module, config_class, trainer_class, field = TRAINERS[method]
    module = importlib.import_module(f".{module}", __package__)
    config = getattr(module, config_class).preset(preset, **overrides, **({} if steps is None else {field: steps}))
    return getattr(module, trainer_class)(policy, tokenizer, reward_fn, prompts, config)


def run_named(method: str, args) -> dict:
    """A method on the preset's task, through ``run_method``. RRHF gets the prompts with their stored chosen and
    rejected responses (they join its candidates where the data has them)."""
    from .presets import load_task_queries

    module, config_class, _, field = TRAINERS[method]
    steps = getattr(args, "steps", None)
    if steps is None and not getattr(args, "resume", False):           # a new run records the preset's budget
        config = getattr(importlib.import_module(f".{module}", __package__), config_class)
        steps = getattr(config.preset(args.preset), field)

    def make(task, model, tokenizer, reward_fn, steps):
        load = load_task_queries if method == "rrhf" else load_task_prompts
        trainer = make_trainer(method, model, tokenizer, reward_fn, load(task.prompts, "train"), args.preset,
                               steps, chat=task.chat, seed=args.seed, **several_processes())
        return trainer, trainer.config

    return run_method(method, args, make, run_identity(method, args, steps))


def run_ppo(args) -> dict:
    return run_named("ppo", args)


def run_rrhf(args) -> dict:
    return run_named("rrhf", args)


def run_raft(args) -> dict:
    return run_named("raft", args)


def several_processes() -> dict:
    """Under ``accelerate launch`` with N > 1 processes, sample every prompt from its own stream (the run then
    learns what one process with ``seed_per_query=True`` learns)."""
    return {"seed_per_query": True} if process_state().num_processes > 1 else {}


RUNS = {"ppo": run_ppo, "rrhf": run_rrhf, "raft": run_raft}
