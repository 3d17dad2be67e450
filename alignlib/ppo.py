"""RLHF with PPO for language models (Ouyang et al. 2022; Ziegler et al. 2019; Schulman et al. 2017).

One PPO step = a rollout phase (no gradients) and a learning phase:

1. sample responses y ~ pi_theta(. | x) for a batch of prompts;
2. score them: R(x, y) from the reward function (+ a penalty if y never ended);
3. per-token reward  r_t = -beta * KL_t  (+ R(x, y) on the last response token), with
   KL_t = log pi_theta(y_t | s_t) - log rho(y_t | s_t)             (k1, unbiased)
   KL_t = (rho/pi - 1) - log(rho/pi)                                (k3, unbiased, always >= 0)
   where rho is the reference (the base model: the LoRA adapter switched off);
4. GAE (Schulman et al. 2016) on the response tokens:
   delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma * lambda * A_{t+1},   G_t = A_t + V(s_t),
   then whiten A over the batch's response tokens;
5. ``ppo_epochs`` passes over shuffled mini-batches minimising
   L = -min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t)                                   (clipped policy loss)
       + c_v * 1/2 max((V - G)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - G)^2)     (clipped value loss)
       - c_H * H_t                                                                      (entropy bonus)
   with rho_t = pi_theta(y_t | s_t) / pi_old(y_t | s_t), averaged over response tokens, gradients clipped;
6. the adaptive KL controller (Ziegler et al. 2019) moves beta toward a target KL:
   beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon).

"PPO needs 4 models": policy, reference, value and reward. Here the reference is the policy's base with its
adapter off, and the value head shares the policy's trunk (or has its own copy, ``value_model="separate"``).

Implementation details worth knowing (in the spirit of cleanrl's list):
- values are aligned with log-probs: column t holds V(s_t) for the state that produced token t, read from the
  hidden state at t-1 (the same shift as the logits);
- advantages are whitened over response tokens only; padding never enters a mean;
- the KL in ``kl/ref`` is the summed per-sequence k1 estimate of the sampling policy, the number InstructGPT
  reports; the optimiser never sees the reference's gradients (it runs under ``no_grad``);
- a non-finite loss stops training before the optimiser step (``FloatingPointError``).
"""
from __future__ import annotations

import copy
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .training.protocol import CheckpointState
from .training.distributed import gather_tensor, make_accelerator, mean_over_processes, query_seeds, shard, world
from .generation import Rollout, check_prompts, generate
from .logprobs import (length_normalized_logprob, masked_mean, position_ids_from_mask, token_entropy_from_logits,
                       token_logprobs_from_logits)
from .models import maybe_reference
from .rewards import score
from .utils import PresetMixin, check_finite, guarded_step, peak_memory_mb, seed_everything, timer


# ---------------------------------------------------------------- configuration

@dataclass
class PPOConfig(PresetMixin):
    """Hyper-parameters of PPO for language models. Presets: ``PPOConfig.preset("cpu" | "lab-gpu")``."""

    steps: int = 12
    """PPO steps (rollout + learning phase each)."""
    batch_size: int = 16
    """Prompts per step (the rollout's size), split into mini-batches for learning."""
    mini_batch_size: int = 8
    """Sequences per gradient step."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward pass (None: the whole mini-batch, per process). Gradients accumulate over a
    mini-batch's micro-batches, each weighted by its share of the tokens: the same step, in less memory."""
    ppo_epochs: int = 2
    """Passes over each rollout."""
    max_new_tokens: int = 24
    """Response length limit in tokens."""
    temperature: float = 1.0
    """Sampling temperature of the rollout (1.0 = the policy itself, as PPO's ratio assumes)."""
    chat: bool = True
    """Wrap prompts in the chat template (False: continue raw text, as in the review task)."""
    lr: float = 3e-4
    """AdamW learning rate of the LoRA adapters (and of the value head unless ``value_head_lr`` is set)."""
    value_head_lr: float | None = None
    """Learning rate of the value head alone (None: ``lr``). The head reads hidden states whose L1 norm is in the
    hundreds (SmolLM2: about 550), so one Adam step moves every value by up to that norm times the rate; it usually
    needs a smaller rate than the adapters (the cpu preset: 1e-4 against 1e-3)."""
    kl_coef: float = 0.05
    """beta, the weight of the per-token KL penalty to the reference."""
    kl_estimator: str = "k1"
    """'k1': log pi - log rho (unbiased, can be negative per token); 'k3': (rho/pi - 1) - log(rho/pi) (>= 0)."""
    adaptive_kl: bool = False
    """Adapt beta toward ``kl_target`` (Ziegler et al. 2019) instead of keeping it fixed."""
    kl_target: float = 6.0
    """Target summed KL per sequence (nats) for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in samples."""
    gamma: float = 1.0
    """Discount of GAE (1.0: the episode is one response)."""
    lam: float = 0.95
    """lambda of GAE: 0 = one-step TD, 1 = Monte-Carlo returns."""
    cliprange: float = 0.2
    """epsilon of the clipped policy ratio."""
    cliprange_value: float = 0.2
    """epsilon_v of the clipped value loss."""
    vf_coef: float = 0.1
    """c_v, the weight of the value loss."""
    ent_coef: float = 0.0
    """c_H, the weight of the entropy bonus."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (global L2 norm)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from R(x, y) when a response hits ``max_new_tokens`` without EOS (0 disables)."""
    whiten_rewards: bool = False
    """Whiten the scores R over the batch before shaping (useful when the reward's scale is unknown)."""
    value_model: str = "shared"
    """'shared': the value head reads the policy's last hidden state (one forward pass); 'separate': a copy
    of the base model with its own LoRA adapter carries the value head (twice the memory, no interference)."""
    seed: int = 0
    """Seeds sampling, shuffling and the value head's initialisation."""
    seed_per_query: bool = False
    """Sample each prompt from its own random stream (``generate(row_seeds=...)``): needed under ``accelerate
    launch`` with N processes, where each process rolls out its 1/N of the batch. Needs the fast decoder."""

    PRESETS = {
        # lecture 01's run: SmolLM2 answers movie-review openings (chat), VADER reward. Chosen with
        # `python -m alignlib ppo-check` so that the held-out reward rises with readable answers, stable entropy,
        # positive explained variance and a KL inside 12 nats for seeds 0-2 on 1 and 2 threads (README)
        "cpu": dict(steps=10, batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=16, temperature=0.7,
                    lr=1e-3, value_head_lr=1e-4),
        "lab-gpu": dict(steps=200, batch_size=64, mini_batch_size=16, ppo_epochs=4, max_new_tokens=128, lr=1e-5,
                        adaptive_kl=True, kl_target=6.0, missing_eos_penalty=1.0, whiten_rewards=True),
    }

    def __post_init__(self):
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}.")
        if self.value_model not in ("shared", "separate"):
            raise ValueError(f"value_model must be 'shared' or 'separate', got {self.value_model!r}.")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be None or >= 1, got {self.micro_batch_size}.")
        if self.batch_size < 1 or self.mini_batch_size < 1 or self.mini_batch_size > self.batch_size:
            raise ValueError(f"need 1 <= mini_batch_size ({self.mini_batch_size}) <= batch_size ({self.batch_size}).")
        if self.steps < 1 or self.ppo_epochs < 1 or self.max_new_tokens < 1:
            raise ValueError(f"steps ({self.steps}), ppo_epochs ({self.ppo_epochs}) and max_new_tokens "
                             f"({self.max_new_tokens}) must be >= 1.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}; "
                             "1.0 samples the policy.")
        for name in ("lr", "value_head_lr", "kl_coef", "cliprange"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")


# ---------------------------------------------------------------- pure functions (graded in exercise 01)

def same_shape(fn: str, **tensors: torch.Tensor) -> None:
    """Raise a ValueError naming the first argument of ``fn`` whose shape differs from the first one's (instead of
    torch's broadcasting error, or a silent broadcast). Compares shapes only: no tensor work."""
    (first, ref), *rest = tensors.items()
    for name, t in rest:
        if t.shape != ref.shape:
            raise ValueError(f"{fn}: {first} has shape {tuple(ref.shape)} but {name} has shape {tuple(t.shape)}; "
                             "pass tensors of one shape (B, T), one entry per response token.")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate from log-probs of the sampled tokens: (B, T), (B, T) -> (B, T).

    k1 = log pi - log rho;  k3 = (rho/pi - 1) - log(rho/pi)  (Schulman, "Approximating KL divergence", 2020).
    """
    same_shape("kl_penalty", logp=logp, ref_logp=ref_logp)
    log_ratio = logp - ref_logp  # log pi/rho
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"estimator must be 'k1' or 'k3', got {estimator!r}.")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -beta * KL_t on response tokens, plus the score R on the last response token.

    scores (B,), kl (B, T), mask (B, T) with at least one 1 per row -> (B, T), zero off the mask.
    """
    same_shape("shaped_rewards", kl=kl, mask=mask)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"shaped_rewards: scores has shape {tuple(scores.shape)} but kl has shape {tuple(kl.shape)}; "
                         "scores must be (B,), one score per row of kl (B, T).")
    if (mask.sum(-1) == 0).any():
        raise ValueError("every row needs at least one response token in mask.")
    rewards = -kl_coef * kl * mask
    last = mask.shape[1] - 1 - mask.flip(-1).float().argmax(-1)  # (B,) column of the last 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked positions of each row.

    rewards, values, mask: (B, T); positions with mask 0 are skipped (the episode is the response tokens,
    which are contiguous). Returns advantages and returns G = A + V, both (B, T), zero off the mask.
    """
    same_shape("compute_gae", rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"compute_gae: rewards has shape {tuple(rewards.shape)}; rewards, values and mask must be "
                         "(B, T).")
    B, T = rewards.shape
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # off the mask (right padding after the response, or the prompt before it) nothing carries over
        next_value = torch.where(m.bool(), values[:, t], next_value * 0)
        next_adv = torch.where(m.bool(), adv, next_adv * 0)
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions (mean kept if ``shift_mean=False``); zero off the mask."""
    same_shape("whiten", values=values, mask=mask)
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        cliprange: float = 0.2) -> tuple[torch.Tensor, dict]:
    """L^CLIP = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps)) over response tokens.

    All inputs (B, T). Returns the loss and statistics (clip fraction, approximate KL pi_old || pi).
    """
    same_shape("clipped_policy_loss", logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "policy/approxkl": masked_mean(0.5 * log_ratio ** 2, mask).item()}
    return loss, stats


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict]:
    """L^V = 1/2 mean_t max((V - G)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - G)^2); inputs (B, T)."""
    same_shape("clipped_value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"value/clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask).item()}
    return loss, stats


def whiten_across(values: torch.Tensor, mask: torch.Tensor, accelerator) -> torch.Tensor:
    """``whiten`` with the mean and variance of the masked positions of every process (the global batch)."""
    def total(x):
        return accelerator.reduce(x.detach().clone(), reduction="sum")
    count = total(mask.sum())
    mean = total((values * mask).sum()) / count
    var = total((((values - mean) ** 2) * mask).sum()) / count
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


class AdaptiveKLController:
    """beta_{n+1} = beta_n * (1 + clip(KL / target - 1, -0.2, 0.2) * n_samples / horizon)  (Ziegler et al. 2019)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_samples / self.horizon


# ---------------------------------------------------------------- the policy with a value head

class PolicyWithValue(nn.Module):
    """A causal LM policy plus a scalar value head V(s_t), aligned with per-token log-probs.

    ``forward`` returns logits (B, T, V) and values (B, T) where values[:, t] = V(state before token t),
    read from the hidden state at t - 1 (column 0 is 0), exactly like ``token_logprobs_from_logits``.
    """

    def __init__(self, policy: nn.Module, value_model: str = "shared"):
        super().__init__()
        self.policy = policy
        self.separate = value_model == "separate"
        if self.separate:
            from .models import with_lora

            value_trunk = copy.deepcopy(policy)
            if hasattr(value_trunk, "merge_and_unload"):  # a plain model again: fold the policy's adapter in
                value_trunk = value_trunk.merge_and_unload()
            for p in value_trunk.parameters():
                p.requires_grad_(False)
            self.value_trunk = with_lora(value_trunk)
        hidden = policy.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        # zero init: V = 0 everywhere at the start, so the first advantages are the (whitened) returns and the
        # explained variance starts at 0 instead of below it (the trunk's last hidden states have a large norm,
        # and a random head would add noise of that size to every advantage)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(policy.parameters()).device)

    def forward(self, input_ids, attention_mask, logits_to_keep: int = 0):
        """logits (B, L, V) of the last L = ``logits_to_keep`` positions (0: all) and values (B, T)."""
        kw = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        out = self.policy(**kw, output_hidden_states=not self.separate, logits_to_keep=logits_to_keep)
        hidden = (self.value_trunk(**kw, output_hidden_states=True) if self.separate else out).hidden_states[-1]
        v = self.value_head(hidden.float()).squeeze(-1)  # (B, T): V after reading token t
        values = torch.nn.functional.pad(v[:, :-1], (1, 0))  # (B, T): V(state before token t)
        return out.logits, values


# ---------------------------------------------------------------- training loop

@dataclass
class PPOBatch:
    """Everything the learning phase needs from one rollout, all (B, T) unless noted."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor            # response tokens
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    logits_to_keep: int = 0       # last positions whose logits predict response tokens (0: all)

    def select(self, idx: torch.Tensor) -> "PPOBatch":
        return PPOBatch(**{k: v[idx] if torch.is_tensor(v) else v for k, v in self.__dict__.items()})


@dataclass
class PPOTrainer(CheckpointState):
    """Holds the policy (+ value head), the reward function and the optimiser; ``train()`` returns a history.

    ``policy`` must be a LoRA model (``load_model(..., lora=True)``): its adapter-off base is the reference.
    Under ``accelerate launch`` with N processes each process rolls out and learns on its 1/N of every batch and
    mini-batch (``alignlib.training.distributed``); reward and advantage whitening and the token means of the losses are
    taken over the whole batch, so N processes with one mini-batch per epoch compute what one process does. With
    several mini-batches, each process shuffles its own rows into them. ``sampler`` is the rollout's generation
    (``generate``'s signature), the one function a serving engine replaces.
    """

    policy: nn.Module
    tokenizer: object
    reward_fn: Callable
    prompts: list[str]
    config: PPOConfig = field(default_factory=PPOConfig)
    ref_model: nn.Module | None = None  # pass a frozen copy to train a full (non-LoRA) policy
    accelerator: object = None
    sampler: Callable = generate       # the rollout's generation: (model, tokenizer, prompts, **kw) -> Rollout

    def __post_init__(self):
        self.prompts = check_prompts(self.prompts)   # a list of strings, not one string, not empty
        if self.ref_model is None and not hasattr(self.policy, "disable_adapter"):
            raise TypeError("policy has no LoRA adapter; load it with lora=True or pass ref_model=a frozen copy.")
        seed_everything(self.config.seed)
        self.accelerator = make_accelerator(self.accelerator, self.config.seed_per_query, "PPO")
        processes = world(self.accelerator)[1]
        if self.config.mini_batch_size % processes:
            raise ValueError(f"mini_batch_size={self.config.mini_batch_size} does not split over {processes} "
                             f"processes; use a multiple of {processes}.")
        self.model = PolicyWithValue(self.policy, self.config.value_model)
        head = list(self.model.value_head.parameters())
        head_ids = {id(p) for p in head}
        trunk = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]
        self.optimizer = torch.optim.AdamW([{"params": trunk, "lr": self.config.lr},
                                            {"params": head, "lr": self.config.value_head_lr or self.config.lr}])
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.kl_ctl = (AdaptiveKLController(self.config.kl_coef, self.config.kl_target, self.config.kl_horizon)
                       if self.config.adaptive_kl else None)
        self.rng = random.Random(self.config.seed)
        self.history: list[dict] = []

    @property
    def kl_coef(self) -> float:
        return self.kl_ctl.value if self.kl_ctl else self.config.kl_coef

    def sample_prompts(self) -> list[str]:
        """The step's global batch of prompts (the same in every process: each then takes its share)."""
        return [self.rng.choice(self.prompts) for _ in range(self.config.batch_size)]

    @torch.no_grad()
    def rollout(self, metrics: dict) -> tuple[Rollout, PPOBatch, torch.Tensor]:
        cfg = self.config
        unwrapped = self.accelerator.unwrap_model(self.model)
        prompts = self.sample_prompts()
        streams = ({"row_seeds": shard(query_seeds(cfg.seed, len(self.history), len(prompts)), self.accelerator)}
                   if cfg.seed_per_query else {})
        with timer(metrics, "time/generate_s"):
            roll = self.sampler(unwrapped.policy, self.tokenizer, shard(prompts, self.accelerator),
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, chat=cfg.chat,
                                **streams)
        with timer(metrics, "time/reward_s"):
            scores = score(self.reward_fn, roll.prompts, roll.responses).to(roll.input_ids.device)  # (B,)
        raw_scores = scores.clone()
        if cfg.missing_eos_penalty:
            scores = scores - cfg.missing_eos_penalty * (~roll.finished).float()
        if cfg.whiten_rewards and len(prompts) > 1:   # over the global batch
            everyone = gather_tensor(scores, self.accelerator)
            scores = (scores - everyone.mean()) / (everyone.std() + 1e-8)
        keep = roll.input_ids.shape[1] - roll.prompt_width + 1  # logits that predict response tokens
        with timer(metrics, "time/score_s"):
            self.model.eval()
            parts = [self.score_chunk(unwrapped, roll.input_ids[i:i + cfg.mini_batch_size],
                                      roll.attention_mask[i:i + cfg.mini_batch_size], keep)
                     for i in range(0, len(roll), cfg.mini_batch_size)]
            logp, values, entropy, ref_logp = (torch.cat(t) for t in zip(*parts))  # each (B, T)
        mask = roll.response_mask.float()
        kl = kl_penalty(logp, ref_logp, cfg.kl_estimator) * mask
        rewards = shaped_rewards(scores, kl, mask, self.kl_coef)
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask) if world(self.accelerator)[1] == 1 else \
            whiten_across(advantages, mask, self.accelerator)
        seq_kl = (kl_penalty(logp, ref_logp, "k1") * mask).sum(-1)  # (B,) summed k1 per sequence
        raw_all = gather_tensor(raw_scores, self.accelerator)
        metrics.update({
            "reward/mean": raw_all.mean().item(), "reward/std": raw_all.std().item() if len(raw_all) > 1 else 0.0,
            "reward/shaped_mean": scores.mean().item(),
            "kl/ref": seq_kl.mean().item(), "kl/coef": self.kl_coef,
            "ppl/ref": (-length_normalized_logprob(ref_logp, mask)).mean().exp().item(),  # as RRHF and RAFT log it
            "policy/entropy": masked_mean(entropy, mask).item(),
            "response/length": mask.sum(-1).mean().item(), "response/eos_frac": roll.finished.float().mean().item(),
            "value/mean": masked_mean(values, mask).item(), "returns/mean": masked_mean(returns, mask).item(),
        })
        local = ("kl/ref", "ppl/ref", "policy/entropy", "response/length", "response/eos_frac", "value/mean",
                 "returns/mean")
        metrics.update(mean_over_processes({k: metrics[k] for k in local}, self.accelerator))
        batch = PPOBatch(roll.input_ids, roll.attention_mask, mask, logp, values, advantages, returns, keep)
        return roll, batch, seq_kl

    def score_chunk(self, unwrapped, input_ids, attention_mask, keep: int):
        """Log-probs, values and entropy under the policy, and log-probs under the reference: 4 x (b, T).

        Scored in mini-batches and with the LM head on the response positions only (``logits_to_keep``):
        the (B, T, 49152) logits of a whole rollout are the largest tensor PPO would otherwise hold.
        """
        T = input_ids.shape[1]
        logits, values = self.model(input_ids, attention_mask, logits_to_keep=keep)
        logits = logits / self.config.temperature  # score the distribution the rollout sampled from
        logp = token_logprobs_from_logits(logits, input_ids)
        entropy = token_entropy_from_logits(logits, T)
        del logits
        with maybe_reference(unwrapped.policy, self.ref_model) as ref:
            ref_logits = ref(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             position_ids=position_ids_from_mask(attention_mask), logits_to_keep=keep).logits
        ref_logp = token_logprobs_from_logits(ref_logits / self.config.temperature, input_ids)
        return logp, values, entropy, ref_logp

    def part_loss(self, part: PPOBatch) -> tuple[torch.Tensor, dict]:
        """L = L^CLIP + c_v L^V - c_H H, token means over ``part`` (a mini-batch or a micro-batch of one)."""
        cfg = self.config
        logits, values = self.model(part.input_ids, part.attention_mask, logits_to_keep=part.logits_to_keep)
        logits = logits / cfg.temperature  # the same tempered policy as the rollout's old log-probs
        logp = token_logprobs_from_logits(logits, part.input_ids)
        pg_loss, pg_stats = clipped_policy_loss(logp, part.old_logprobs, part.advantages, part.mask, cfg.cliprange)
        vf_loss, vf_stats = clipped_value_loss(values, part.old_values, part.returns, part.mask, cfg.cliprange_value)
        loss = pg_loss + cfg.vf_coef * vf_loss
        if cfg.ent_coef:
            ent = masked_mean(token_entropy_from_logits(logits, part.input_ids.shape[1]), part.mask)
            loss = loss - cfg.ent_coef * ent
        check_finite(loss, "PPO loss")
        return loss, {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), "loss/total": loss.item(),
                      **pg_stats, **vf_stats}

    def learn(self, batch: PPOBatch, metrics: dict) -> None:
        cfg = self.config
        self.model.train()
        stats: dict[str, list[float]] = {}
        n = batch.input_ids.shape[0]
        processes = world(self.accelerator)[1]
        size = cfg.mini_batch_size // processes         # this process's share of a mini-batch
        micro = cfg.micro_batch_size or size            # sequences per forward/backward pass
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n)
            for start in range(0, n, size):
                mb = batch.select(order[start:start + size])
                parts = [mb.select(slice(i, i + micro)) for i in range(0, len(mb.input_ids), micro)]
                tokens = mb.mask.sum()                                      # of the mini-batch, all processes
                if processes > 1:
                    tokens = self.accelerator.reduce(tokens.clone(), reduction="sum")
                self.optimizer.zero_grad(set_to_none=True)
                for k, part in enumerate(parts):
                    last = k == len(parts) - 1          # processes average their gradients once, after the last part
                    with nullcontext() if last else self.accelerator.no_sync(self.model):
                        loss, part_stats = self.part_loss(part)
                        if processes > 1 or len(parts) > 1:   # a part's token mean, weighted to the mini-batch's
                            loss = loss * part.mask.sum() * processes / tokens
                        self.accelerator.backward(loss)
                    for key, v in part_stats.items():
                        stats.setdefault(key, []).append(v)
                norm = guarded_step(self.optimizer, cfg.max_grad_norm, "PPO", clip=self.accelerator.clip_grad_norm_)
                stats.setdefault("grad/norm", []).append(norm)
        metrics.update(mean_over_processes({k: sum(v) / len(v) for k, v in stats.items()}, self.accelerator))
        var_returns = masked_mean((batch.returns - masked_mean(batch.returns, batch.mask)) ** 2, batch.mask)
        resid = masked_mean((batch.returns - batch.old_values
                             - masked_mean(batch.returns - batch.old_values, batch.mask)) ** 2, batch.mask)
        metrics["value/explained_var"] = (1 - resid / var_returns).item() if var_returns > 0 else float("nan")

    @property
    def iterations(self) -> int:
        return self.config.steps

    def train_step(self) -> dict:
        """One PPO step for the step loop: its metrics (``step()`` also returns the rollout)."""
        return self.step()[0]

    def extra_state(self) -> dict | None:
        return {"kl_coef": self.kl_ctl.value} if self.kl_ctl else None

    def load_extra_state(self, state: dict) -> None:
        self.kl_ctl.value = state["kl_coef"]

    def step(self) -> tuple[dict, Rollout]:
        metrics: dict = {"step": len(self.history)}
        start = time.perf_counter()
        roll, batch, seq_kl = self.rollout(metrics)
        with timer(metrics, "time/train_s"):
            self.learn(batch, metrics)
        if self.kl_ctl:
            everyone = gather_tensor(seq_kl, self.accelerator)
            self.kl_ctl.update(everyone.mean().item(), len(everyone))
        metrics["time/step_s"] = time.perf_counter() - start
        metrics["memory/peak_mb"] = peak_memory_mb(self.accelerator.device)
        self.history.append(metrics)
        return metrics, roll

    def train(self, steps: int | None = None, progress: bool = True, callback: Callable | None = None) -> list[dict]:
        """Run ``steps`` PPO steps (default ``config.steps``); return the history (one dict of metrics per step)."""
        bar = tqdm(range(steps or self.config.steps), desc="PPO", disable=not progress)
        for _ in bar:
            metrics, roll = self.step()
            bar.set_postfix(reward=f"{metrics['reward/mean']:+.3f}", kl=f"{metrics['kl/ref']:.2f}")
            if callback:
                callback(metrics, roll)
        return self.history
