"""PPO, RRHF and RAFT for two steps on the tiny model; writes each method's trained weights and history.

Run once with ``python tests/distributed_run.py OUT`` and once with ``accelerate launch --cpu --num_processes 2
tests/distributed_run.py OUT2``: ``tests/test_distributed.py`` checks that the two runs end with the same weights.
"""
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from alignlib.models import load_model
from alignlib.ppo import PPOConfig, PPOTrainer
from alignlib.raft import RAFTConfig, RAFTTrainer
from alignlib.rrhf import RRHFConfig, RRHFTrainer
from alignlib.utils import seed_everything

torch.set_num_threads(1)
PROMPTS = [f"Tell me about topic number {i}." for i in range(8)]


def reward(prompts, responses):
    """A deterministic text reward that varies between the tiny model's samples: their length in characters."""
    return torch.tensor([len(r) / 20.0 for r in responses])


def make(name, accelerator):
    seed_everything(0)
    model, tokenizer = load_model("tiny-random", lora=True, device="cpu")
    common = dict(chat=True, max_new_tokens=6, seed_per_query=True, seed=3)
    if name == "ppo":
        cfg = PPOConfig(steps=2, batch_size=4, mini_batch_size=4, ppo_epochs=2, lr=1e-2, **common)
        return PPOTrainer(model, tokenizer, reward, PROMPTS, cfg, accelerator=accelerator)
    if name == "rrhf":
        cfg = RRHFConfig(steps=2, batch_size=4, policy_samples=2, initial_samples=1, lr=1e-2, chunk_size=4, **common)
        return RRHFTrainer(model, tokenizer, reward, PROMPTS, cfg, accelerator=accelerator)
    cfg = RAFTConfig(stages=2, batch_size=4, k=3, lr=1e-2, sft_batch_size=4, selection="global", **common)
    return RAFTTrainer(model, tokenizer, reward, PROMPTS, cfg, accelerator=accelerator)


def main(out: Path):
    accelerator = Accelerator(cpu=True)
    for name in ("ppo", "rrhf", "raft"):
        trainer = make(name, accelerator)
        history = trainer.train(progress=False)
        module = accelerator.unwrap_model(getattr(trainer, "model"))
        weights = {k: v.detach().contiguous() for k, v in module.named_parameters() if v.requires_grad}
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_file(weights, str(out / f"{name}.safetensors"))
            keep = ("reward/mean", "loss/total", "loss/sft", "kl/ref", "grad/norm")
            record = {"processes": accelerator.num_processes,
                      "history": [{k: h[k] for k in keep if k in h} for h in history]}
            (out / f"{name}.json").write_text(json.dumps(record))
        accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
