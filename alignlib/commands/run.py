"""Full runs behind the CLI's method commands: load the preset's pieces, train with checkpoints, evaluate, save.

Every method writes the same run directory (``alignlib.training.checkpoint``): ``<output>/history.json`` (config, task,
held-out evaluation before and after, one dict of metrics per step, status), rewritten at every checkpoint;
``<output>/checkpoints/`` (the newest complete checkpoint, every ``--checkpoint-every`` steps, at the end and on
SIGINT/SIGTERM); and ``<output>/adapter`` (the trained LoRA adapter, safetensors) at the end. An existing run
directory is refused unless ``--resume`` (continue from its checkpoint) or ``--overwrite`` is given, and the
directory is checked before the model is loaded.

Under ``accelerate launch`` (``accelerate launch [--config_file configs/accelerate/ddp.yaml] -m alignlib rrhf``)
every process trains its share of each batch (``alignlib.training.distributed``, sampling seeded per prompt) and
only the main process writes the run directory.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ..data import load_task_prompts
from ..evaluation import evaluate
from ..models import load_model
from ..reward_model import build_reward
from ..training.checkpoint import CHECKPOINT_EVERY, prepare_output, read_marker, read_record, write_record
from ..training.loop import make_tracker, resume_run, stop_run, train_steps
from ..training.registry import get_method, make_trainer
from ..training.distributed import process_state
from .args import check_report_to
from .presets import get_task
from ..utils import seed_everything


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


def run_identity(name: str, args, steps: int | None, config: dict | None = None) -> dict:
    """What a run directory is a run of: ``--resume`` refuses to continue it with anything else (``steps`` may
    grow). ``steps`` None: the stored budget on resume; ``config``: the config fields set by flags or ``--config``
    (None on resume: the stored ones)."""
    task = get_task(args.preset)
    return {"method": name, "model": getattr(args, "model", None) or task.model, "preset": args.preset,
            "prompts": task.prompts, "reward": getattr(args, "reward", None) or task.reward, "seed": args.seed,
            "processes": process_state().num_processes, "steps": steps, "config": config}


def run_method(name: str, args, make_trainer, identity: dict | None = None) -> dict:
    """Check the output, evaluate, train with ``make_trainer(task, model, tokenizer, reward_fn, steps, overrides) ->
    (trainer, config)`` and checkpoints, evaluate, save. The same protocol for every method, so their run
    directories compare. ``identity`` (``run_identity``) is stored with the run and compared on ``--resume``."""
    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite", False)
    every = getattr(args, "checkpoint_every", CHECKPOINT_EVERY)
    if every is None or every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0 (0: only at the end and when stopped), got {every}.")
    check_report_to(getattr(args, "report_to", "none"))
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
    trainer, config = make_trainer(task, model, tokenizer, reward_fn, identity["steps"], identity.get("config") or {})
    total = trainer.iterations
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


def run_named(method: str, args) -> dict:
    """A method on the preset's task, through ``run_method``; config fields given as flags or in ``--config``
    override the preset's. RRHF gets the prompts with their stored chosen and rejected responses (they join its
    candidates where the data has them)."""
    from ..data import load_task_queries
    from .args import config_overrides

    spec = get_method(method)
    overrides = config_overrides(args)
    steps = overrides.pop(spec.iterations, None) or getattr(args, "steps", None)
    resume = getattr(args, "resume", False)
    if steps is None and not resume:                                    # a new run records the preset's budget
        steps = getattr(spec.config.preset(args.preset), spec.iterations)

    def make(task, model, tokenizer, reward_fn, steps, overrides):
        load = load_task_queries if method == "rrhf" else load_task_prompts
        fields = {"chat": task.chat, "seed": args.seed, **several_processes(), **overrides}
        trainer = make_trainer(method, model, tokenizer, reward_fn, load(task.prompts, "train"), args.preset,
                               steps, **fields)
        return trainer, trainer.config

    spec.config.preset(args.preset, **overrides)          # a wrong field fails here, before any model loads
    config = overrides or (None if resume else {})
    return run_method(method, args, make, run_identity(method, args, steps, config))


def several_processes() -> dict:
    """Under ``accelerate launch`` with N > 1 processes, sample every prompt from its own stream (the run then
    learns what one process with ``seed_per_query=True`` learns)."""
    return {"seed_per_query": True} if process_state().num_processes > 1 else {}

