"""The trainer protocol: what the step loop (``alignlib.training.loop``) and the checkpoints
(``alignlib.training.checkpoint``) ask of a trainer, and nothing more.

A trainer holds its ``history`` (one metrics dict per iteration done) and knows its planned ``iterations``
(``config.steps``; RAFT counts stages). ``train_step()`` runs one iteration and returns its metrics dict (the same
dict it appends to ``history``). ``trainable_module()`` names the module whose trainable parameters a checkpoint
saves. ``checkpoint_state()`` returns what else resuming needs: the optimizer's and scheduler's state dicts (saved
with torch, tensors only), the trainer's own ``random.Random`` state and any ``extra`` JSON state (PPO's adaptive
KL coefficient, the reward model's evaluations); ``load_checkpoint_state`` puts it back.

``PPOTrainer``, ``RRHFTrainer``, ``RAFTTrainer`` and ``RewardModelTrainer`` conform (``tests/test_checkpoint.py``
checks it with ``isinstance(trainer, Trainer)``); ``CheckpointState`` gives them the common implementation.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

METRICS = {  # the namespaces of every trainer's metrics dict: "<namespace>/<name>", plus the index "step"/"stage"
    "reward": "rewards of the sampled (or ranked, kept, chosen) responses: mean, std, max, per source",
    "kl": "KL to the reference policy in nats per sequence (kl/ref) and PPO's coefficient (kl/coef)",
    "ppl": "perplexity of the responses under the reference policy (ppl/ref)",
    "diversity": "distinct-n of the responses (diversity/distinct1, diversity/distinct2)",
    "response": "length in tokens and the fraction that ended with EOS",
    "loss": "the losses minimised (loss/total and its terms: policy, value, rank, ft, sft)",
    "policy": "PPO's policy statistics: entropy, clip fraction, approximate KL of the update",
    "value": "PPO's value head: mean, clip fraction, explained variance",
    "returns": "PPO's GAE returns",
    "rank": "RRHF: how often the policy ranks the candidates as the reward does",
    "kept": "RAFT: samples and prompts kept for fine-tuning",
    "eval": "the reward model's held-out loss, accuracy and margin",
    "data": "pairs used and skipped",
    "params": "parameter counts",
    "grad": "the global gradient norm before clipping",
    "optim": "optimizer state worth watching: the learning rate of a schedule (optim/lr)",
    "time": "seconds (names end in _s): generate, reward, score, train, the whole step",
    "memory": "peak memory in MB (memory/peak_mb)",
}
"""The metric vocabulary shared by PPO, RRHF, RAFT, SFT and the reward model (``tests/test_metrics.py``)."""


@runtime_checkable
class Trainer(Protocol):
    history: list[dict]

    @property
    def iterations(self) -> int: ...

    def train_step(self) -> dict: ...

    def trainable_module(self) -> torch.nn.Module: ...

    def checkpoint_state(self) -> dict: ...

    def load_checkpoint_state(self, state: dict) -> None: ...


class CheckpointState:
    """``checkpoint_state``/``load_checkpoint_state`` from ``self.optimizer``, ``self.scheduler`` (None: no
    scheduler), ``self.rng`` and the hooks ``extra_state()``/``load_extra_state(state)`` (JSON; default none);
    ``trainable_module`` is the accelerate-unwrapped ``self.model``."""

    scheduler = None

    def trainable_module(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def extra_state(self) -> dict | None:
        return None

    def load_extra_state(self, state: dict) -> None:
        raise ValueError(f"{type(self).__name__} keeps no extra state, but the checkpoint holds some: {sorted(state)}")

    def checkpoint_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "rng": self.rng.getstate(), "extra": self.extra_state()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.rng.setstate(state["rng"])
        if state["extra"] is not None:
            self.load_extra_state(state["extra"])
