"""RAFT: reward-ranked fine-tuning (Dong et al. 2023, arXiv 2304.06767), Algorithm 1.

Each stage t of RAFT is three separate steps:

1. **data collection**: sample a batch of b prompts x_1..x_b and, for each, k responses y ~ pi_t(. | x) at a
   temperature (no gradients: generation is decoupled from training and can run in any inference engine);
2. **data ranking**: score every response, r = R(x, y), and keep the best 1/k of them:
   - local (per prompt):  B = { (x_i, argmax_j r(x_i, y_ij)) : i = 1..b }                  (b samples kept)
   - global:              B = the b highest-reward pairs among all b * k                       (b samples kept)
3. **fine-tuning**: pi_{t+1} = argmin  - sum_{(x, y) in B} log pi(y | x)  (prompt-masked SFT, ``alignlib.sft``),
   starting from pi_t; then the next stage samples from pi_{t+1}.

RAFT is "best-of-k distilled into the policy": its training phase is plain SFT on b sequences, with no
reference, value model or importance ratio. What keeps it near the initial model is only that it imitates its
own (filtered) samples; the metrics below watch for the price of that:

- ``reward/mean``: the policy's samples this stage; ``reward/kept_mean``: the kept set B;
- ``kl/ref`` (summed k1 per sample) and ``ppl/ref`` (perplexity of the samples under the initial model), the
  x-axis of the reward-vs-perplexity trade-off (the paper's Fig. 8), both on the first sample of each prompt,
  with both models' logits at the sampling temperature (as PPO computes them);
- ``diversity/distinct1``, ``diversity/distinct2``: distinct n-grams / all n-grams of the stage's samples.
  Reward hacking shows up as rising reward with collapsing diversity (the same phrase for every prompt).

Global ranking keeps more samples from prompts that are easy to please; local ranking keeps one per prompt
and so keeps the prompt distribution. Ties go to the lower index (the earlier sample).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .training.protocol import CheckpointState
from .training.distributed import gather_objects, make_accelerator, mean_over_processes, query_seeds, shard
from .generation import check_prompts, generate
from .rewards import score
from .logprobs import divergence_from_reference
from .sft import SFTConfig, make_optimizer, train_sft
from .utils import PresetMixin, check_sampling_fields, peak_memory_mb, seed_everything, timer


# ---------------------------------------------------------------- pure functions (graded in exercise 03)

def select_local(rewards: torch.Tensor) -> torch.Tensor:
    """Best response of each prompt: rewards (P, k) -> flat indices (P,) into the P*k samples (row-major)."""
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards must be (prompts, k) with at least one sample, got shape {tuple(rewards.shape)}.")
    k = rewards.shape[1]
    return torch.arange(rewards.shape[0], device=rewards.device) * k + rewards.argmax(-1)


def select_global(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """The top 1/k of all samples: rewards (any shape, N values) -> sorted flat indices of the N // k best.

    Equal rewards are broken in favour of the earlier sample. Raises if N < k (nothing would be kept).
    """
    flat = rewards.flatten()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    keep = flat.numel() // k
    if keep < 1:
        raise ValueError(f"{flat.numel()} samples and k={k}: the top 1/k is empty; sample at least k responses.")
    # a stable sort by descending reward keeps the earlier sample first among equals
    order = torch.sort(flat, descending=True, stable=True).indices
    return order[:keep].sort().values


def raft_select(rewards: torch.Tensor, mode: str = "local") -> torch.Tensor:
    """RAFT's ranking step on rewards (P, k): ``local`` (best per prompt) or ``global`` (best P of all P*k)."""
    if mode == "local":
        return select_local(rewards)
    if mode == "global":
        return select_global(rewards, rewards.shape[-1])
    raise ValueError(f"mode must be 'local' or 'global', got {mode!r}.")


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over the texts (lower-cased words).

    1.0 means no n-gram repeats anywhere in the set; a policy that says the same thing to every prompt scores
    near 0. Returns 0.0 when no text has n words.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.lower().split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------- configuration

@dataclass
class RAFTConfig(PresetMixin):
    """Hyper-parameters of RAFT. Presets: ``RAFTConfig.preset("cpu" | "lab-gpu")``."""

    stages: int = 10
    """Stages of Algorithm 1 (collect, rank, fine-tune)."""
    batch_size: int = 8
    """b: prompts per stage; b samples are kept."""
    k: int = 4
    """Samples per prompt; the best 1/k are kept."""
    selection: str = "local"
    """'local': the best sample of each prompt; 'global': the best b of all b*k samples."""
    max_new_tokens: int = 24
    """Length limit of samples."""
    temperature: float = 1.0
    """Sampling temperature (higher: more varied candidates to choose from)."""
    chat: bool = True
    """Wrap prompts in the chat template (False: continue raw text)."""
    lr: float = 1e-4
    """AdamW learning rate of the fine-tuning step (one optimizer kept across stages)."""
    sft_epochs: int = 1
    """Passes over the kept set per stage."""
    sft_batch_size: int = 8
    """Kept samples per optimizer step."""
    sft_micro_batch_size: int | None = None
    """Kept samples per forward/backward pass (None: the whole SFT batch); gradients accumulate exactly."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold; 0 disables."""
    seed: int = 0
    """Seeds sampling and the choice of prompts."""
    seed_per_query: bool = False
    """Sample each prompt from its own random stream (``generate(row_seeds=...)``): a run under ``accelerate launch``
    with N processes then samples, ranks and learns what one process does. Needs the fast decoder."""

    PRESETS = {
        # measured on 2 CPU cores (see the README): the sentiment task of lecture 01
        "cpu": dict(stages=14, batch_size=8, k=4, max_new_tokens=16, lr=3e-3, sft_epochs=2),
        "lab-gpu": dict(stages=20, batch_size=512, k=8, max_new_tokens=128, lr=2e-5, sft_epochs=2,
                        sft_batch_size=32, temperature=1.0),
    }


    def __post_init__(self):
        if self.selection not in ("local", "global"):
            raise ValueError(f"selection must be 'local' or 'global', got {self.selection!r}.")
        if self.k < 1 or self.batch_size < 1 or self.stages < 1:
            raise ValueError(f"need k >= 1 ({self.k}), batch_size >= 1 ({self.batch_size}), "
                             f"stages >= 1 ({self.stages}).")
        check_sampling_fields(self)


# ---------------------------------------------------------------- the loop

@dataclass
class RAFTTrainer(CheckpointState):
    """Algorithm 1: ``train()`` runs the stages and returns a history with one record per stage.

    Under ``accelerate launch`` each process samples its share of the stage's prompts; the samples are gathered,
    ranked once (local or global ranking see every sample) and the kept set is fine-tuned on with each SFT batch
    split over the processes. ``sampler`` is the data-collection step (``generate``'s signature), the one
    function a serving engine replaces.
    """

    policy: torch.nn.Module
    tokenizer: object
    reward_fn: Callable
    prompts: Sequence[str]
    config: RAFTConfig = field(default_factory=RAFTConfig)
    ref_model: torch.nn.Module | None = None   # the initial model, for kl/ref of a full (non-LoRA) policy
    log_kl: bool = True                        # log kl/ref and ppl/ref (one extra scoring pass per stage)
    accelerator: object = None                 # default: a new ``accelerate.Accelerator()``
    sampler: Callable = generate               # data collection: (model, tokenizer, prompts, **kw) -> Rollout

    def __post_init__(self):
        self.prompts = check_prompts(self.prompts)
        if self.log_kl and self.ref_model is None and not hasattr(self.policy, "disable_adapter"):
            raise TypeError("log_kl needs a LoRA policy (lora=True) or ref_model=the initial model; "
                            "or pass log_kl=False.")
        seed_everything(self.config.seed)
        self.accelerator = make_accelerator(self.accelerator, self.config.seed_per_query, "RAFT")
        # self.model: what computes gradients (DDP/FSDP-wrapped under accelerate); self.policy: the plain module
        self.model, self.optimizer = self.accelerator.prepare(self.policy, make_optimizer(self.policy, self.config.lr))
        self.rng = random.Random(self.config.seed)
        self.history: list[dict] = []
        self.kept: list[dict] = []     # every kept (prompt, response, reward), stage by stage

    def sample_prompts(self) -> list[str]:
        b = self.config.batch_size
        if b <= len(self.prompts):
            return self.rng.sample(self.prompts, b)
        return [self.rng.choice(self.prompts) for _ in range(b)]

    def fine_tune(self, kept: list[dict], seed: int = 0) -> list[dict]:
        """Step 3: prompt-masked SFT on the kept samples, with the optimizer kept across stages."""
        cfg = self.config
        sft = SFTConfig(epochs=cfg.sft_epochs, batch_size=cfg.sft_batch_size, micro_batch_size=cfg.sft_micro_batch_size,
                        chat=cfg.chat, max_grad_norm=cfg.max_grad_norm, seed=seed)
        return train_sft(self.model, self.tokenizer, [r["prompt"] for r in kept], [r["response"] for r in kept],
                         sft, optimizer=self.optimizer, add_eos=[r["finished"] for r in kept],
                         accelerator=self.accelerator)

    @property
    def iterations(self) -> int:
        return self.config.stages

    def train_step(self) -> dict:
        """One RAFT stage (the step loop's iteration)."""
        return self.stage()

    def stage(self) -> dict:
        cfg = self.config
        metrics: dict = {"stage": len(self.history)}
        start = time.perf_counter()
        prompts = self.sample_prompts()                      # the global batch, the same in every process
        seeds = query_seeds(cfg.seed, metrics["stage"], len(prompts)) if cfg.seed_per_query else None
        local = shard(prompts, self.accelerator)
        streams = {} if seeds is None else {"row_seeds": shard(seeds, self.accelerator)}
        # 1. data collection (no gradients; nothing of it is kept for backpropagation)
        with timer(metrics, "time/generate_s"), torch.no_grad():
            roll = self.sampler(self.policy, self.tokenizer, local, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, chat=cfg.chat, num_return_sequences=cfg.k, **streams)
        with timer(metrics, "time/reward_s"):
            local_rewards = score(self.reward_fn, roll.prompts, roll.responses).cpu()      # (b*k / processes,)
        # every process's samples, in the global batch's order: ranking sees all b*k of them
        samples = gather_objects([{"prompt": p, "response": r, "reward": x, "finished": f} for p, r, x, f in
                                  zip(roll.prompts, roll.responses, local_rewards.tolist(), roll.finished.tolist())],
                                 self.accelerator)
        rewards = torch.tensor([x["reward"] for x in samples])                            # (b*k,)
        responses = [x["response"] for x in samples]
        # 2. data ranking
        idx = raft_select(rewards.view(len(prompts), cfg.k), cfg.selection).tolist()
        kept = [{"stage": metrics["stage"], **samples[i]} for i in idx]         # prompt, response, reward, finished
        self.kept.extend(kept)
        if self.log_kl:  # on the first sample of each prompt (1/k of the cost), at the sampling temperature
            first = slice(0, len(roll), cfg.k)
            with timer(metrics, "time/score_s"):
                div = divergence_from_reference(self.policy, roll.input_ids[first], roll.attention_mask[first],
                                                roll.response_mask[first], self.ref_model,
                                                temperature=cfg.temperature)
            metrics.update(mean_over_processes({"kl/ref": div["kl"].mean().item(),
                                                "ppl/ref": div["ref_nll"].mean().exp().item()}, self.accelerator))
        # 3. fine-tuning on the kept set (EOS is a target only where the sample really ended)
        with timer(metrics, "time/train_s"):
            steps = self.fine_tune(kept, seed=cfg.seed + metrics["stage"])
        metrics.update({
            "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "reward/kept_mean": sum(r["reward"] for r in kept) / len(kept),
            "reward/max": rewards.max().item(), "kept/count": len(kept),
            "kept/prompts": len({r["prompt"] for r in kept}),
            "loss/sft": sum(s["loss/sft"] for s in steps) / len(steps),
            "grad/norm": sum(s["grad/norm"] for s in steps) / len(steps),
            "diversity/distinct1": distinct_n(responses, 1), "diversity/distinct2": distinct_n(responses, 2),
            "response/eos_frac": sum(x["finished"] for x in samples) / len(samples),
            **mean_over_processes({"response/length": roll.response_mask.sum(-1).float().mean().item()},
                                  self.accelerator),
        })
        metrics["time/step_s"] = time.perf_counter() - start
        metrics["memory/peak_mb"] = peak_memory_mb(next(self.policy.parameters()).device)
        self.history.append(metrics)
        return metrics

    def train(self, stages: int | None = None, progress: bool = True) -> list[dict]:
        """Run ``stages`` stages (default ``config.stages``); return the history (one record per stage)."""
        bar = tqdm(range(self.config.stages if stages is None else stages), desc="RAFT", disable=not progress)
        for _ in bar:
            m = self.stage()
            bar.set_postfix(reward=f"{m['reward/mean']:+.3f}", kept=f"{m['reward/kept_mean']:+.3f}")
        return self.history
