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
def evaluate(model, tokenizer, reward_fn, prompts: list[str], max_new_tokens: int, chat: bool, seed: int = 1234) -> dict:
    """Mean reward of sampled responses on held-out prompts (fixed seed: before/after are comparable)."""
    roll = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat, seed=seed)
    rewards = reward_fn(roll.prompts, roll.responses)
    return {"reward/mean": rewards.mean().item(), "samples": list(zip(roll.prompts[:4], roll.responses[:4]))}


def save_run(output: str | Path, model, record: dict) -> Path:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(record, indent=1, default=str))
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out / "adapter", safe_serialization=True)
    return out


def run_ppo(args) -> dict:
    from .ppo import PPOConfig, PPOTrainer

    task = get_task(args.preset)
    seed_everything(args.seed)
    overrides = {"chat": task.chat, "seed": args.seed}
    if args.steps:
        overrides["steps"] = args.steps
    config = PPOConfig.preset(args.preset, **overrides)
    model, tokenizer = load_model(args.model or task.model, lora=True)
    reward_fn = build_reward(args.reward or task.reward)
    prompts = load_task_prompts(task.prompts, "train")
    held_out = load_task_prompts(task.prompts, "test", n=task.eval_prompts)
    before = evaluate(model, tokenizer, reward_fn, held_out, config.max_new_tokens, task.chat)
    print(f"[ppo] held-out reward before: {before['reward/mean']:+.3f}")
    trainer = PPOTrainer(model, tokenizer, reward_fn, prompts, config)
    history = trainer.train()
    after = evaluate(model, tokenizer, reward_fn, held_out, config.max_new_tokens, task.chat)
    print(f"[ppo] held-out reward after {len(history)} steps: {after['reward/mean']:+.3f} "
          f"(KL to reference {history[-1]['kl/ref']:.2f} nats, peak memory {history[-1]['memory/peak_mb']:.0f} MB)")
    record = {"config": asdict(config), "task": asdict(task), "before": before, "after": after, "history": history}
    out = save_run(args.output, model, record)
    print(f"[ppo] wrote {out}/history.json and {out}/adapter")
    return record
