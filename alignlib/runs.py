"""Full runs behind the CLI's method commands: load the preset's pieces, train, evaluate, save.

Each ``run_<method>(args)`` writes ``<output>/history.json`` (one dict of metrics per step, plus the config and
before/after evaluation) and the trained LoRA adapter (safetensors) to ``<output>/adapter``.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

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


def save_run(output: str | Path, model, record: dict) -> Path:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(record, indent=1, default=str))
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out / "adapter", safe_serialization=True)
    return out


def prepare(args):
    """The preset's task, a LoRA policy, the reward function, train prompts and held-out prompts."""
    task = get_task(args.preset)
    seed_everything(args.seed)
    model, tokenizer = load_model(args.model or task.model, lora=True)
    reward_fn = build_reward(args.reward or task.reward)
    held_out = load_task_prompts(task.prompts, "test", n=task.eval_prompts)
    return task, model, tokenizer, reward_fn, held_out


def run_method(name: str, args, make_trainer) -> dict:
    """Evaluate, train with ``make_trainer(task, model, tokenizer, reward_fn) -> (trainer, config)``, evaluate,
    save. The same before/after protocol for every method, so their ``history.json`` files compare."""
    task, model, tokenizer, reward_fn, held_out = prepare(args)
    trainer, config = make_trainer(task, model, tokenizer, reward_fn)
    before = evaluate(model, tokenizer, reward_fn, held_out, config.max_new_tokens, task.chat,
                      temperature=config.temperature)
    print(f"[{name}] held-out reward before: {before['reward/mean']:+.3f}")
    history = trainer.train()
    after = evaluate(model, tokenizer, reward_fn, held_out, config.max_new_tokens, task.chat,
                     temperature=config.temperature)
    last = history[-1]
    print(f"[{name}] held-out reward after {len(history)} steps: {after['reward/mean']:+.3f} "
          f"(KL to reference {last.get('kl/ref', float('nan')):.2f} nats, peak memory {last['memory/peak_mb']:.0f} MB, "
          f"{sum(h['time/step_s'] for h in history):.0f} s)")
    record = {"method": name, "config": asdict(config), "task": asdict(task), "before": before, "after": after,
              "history": history}
    out = save_run(args.output, model, record)
    print(f"[{name}] wrote {out}/history.json and {out}/adapter")
    return record


def run_ppo(args) -> dict:
    from .ppo import PPOConfig, PPOTrainer

    def make(task, model, tokenizer, reward_fn):
        config = PPOConfig.preset(args.preset, chat=task.chat, seed=args.seed, **steps_override(args, "steps"))
        return PPOTrainer(model, tokenizer, reward_fn, load_task_prompts(task.prompts, "train"), config), config

    return run_method("ppo", args, make)


def run_rrhf(args) -> dict:
    """RRHF on the preset's task; stored chosen/rejected responses join the candidates where the data has them."""
    from .presets import load_task_queries
    from .rrhf import RRHFConfig, RRHFTrainer

    def make(task, model, tokenizer, reward_fn):
        config = RRHFConfig.preset(args.preset, chat=task.chat, seed=args.seed, **steps_override(args, "steps"))
        return RRHFTrainer(model, tokenizer, reward_fn, load_task_queries(task.prompts, "train"), config), config

    return run_method("rrhf", args, make)


def run_raft(args) -> dict:
    from .raft import RAFTConfig, RAFTTrainer

    def make(task, model, tokenizer, reward_fn):
        config = RAFTConfig.preset(args.preset, chat=task.chat, seed=args.seed, **steps_override(args, "stages"))
        return RAFTTrainer(model, tokenizer, reward_fn, load_task_prompts(task.prompts, "train"), config), config

    return run_method("raft", args, make)


def steps_override(args, field: str) -> dict:
    """``--steps N`` as the config field that counts iterations (``steps``, or ``stages`` for RAFT)."""
    steps = getattr(args, "steps", None)
    return {} if steps is None else {field: steps}  # 0 or a negative count reaches the config, which rejects it


RUNS = {"ppo": run_ppo, "rrhf": run_rrhf, "raft": run_raft}
