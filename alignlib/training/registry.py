"""The policy trainers by name: PPO, RRHF and RAFT, each with its config class and its iteration count.

The command line, the tour, the soups and RL-CAI build trainers through ``make_trainer``; a reader follows a
method's name to its classes here, in plain imports.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ppo import PPOConfig, PPOTrainer
from ..raft import RAFTConfig, RAFTTrainer
from ..rrhf import RRHFConfig, RRHFTrainer


@dataclass(frozen=True)
class Method:
    config: type          # the config dataclass (``PresetMixin``: ``.preset(name, **overrides)``)
    trainer: type         # the trainer class: ``trainer(policy, tokenizer, reward_fn, prompts, config)``
    iterations: str       # the config field that counts iterations (RAFT counts stages)


TRAINERS = {
    "ppo": Method(PPOConfig, PPOTrainer, "steps"),
    "rrhf": Method(RRHFConfig, RRHFTrainer, "steps"),
    "raft": Method(RAFTConfig, RAFTTrainer, "stages"),
}


def get_method(method: str) -> Method:
    if method not in TRAINERS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(TRAINERS)}.")
    return TRAINERS[method]


def make_trainer(method: str, policy, tokenizer, reward_fn, prompts, preset: str = "cpu", steps: int | None = None,
                 **overrides):
    """PPO, RRHF or RAFT from its config ``preset`` with ``overrides``; ``steps`` sets the iteration count (RAFT:
    stages; 0 or a negative count reaches the config, which rejects it). The CLI, the tour and the soups use it."""
    spec = get_method(method)
    config = spec.config.preset(preset, **overrides, **({} if steps is None else {spec.iterations: steps}))
    return spec.trainer(policy, tokenizer, reward_fn, prompts, config)
