"""Pairwise (Bradley-Terry) reward model: the second stage of the InstructGPT pipeline (Ouyang et al. 2022).

A reward model r_theta(x, y) maps a prompt x and a response y to one number. People (or an AI judge) only
say which of two responses they prefer, so the model is fitted to comparisons. The Bradley-Terry model
says the preferred response y_c beats the other one y_r with probability

    P(y_c > y_r | x) = sigma(r_theta(x, y_c) - r_theta(x, y_r)),

and training maximises the likelihood of the observed preferences (InstructGPT eq. 1):

    L(theta) = -E_{(x, y_c, y_r) ~ D} [ log sigma(r_theta(x, y_c) - r_theta(x, y_r)) ].

Only differences of rewards enter the loss, so r is defined up to an additive constant (the PPO stage
whitens or normalises it). Held-out quality is the pairwise accuracy: the fraction of pairs with
r(x, y_c) > r(x, y_r) (ties count as errors).

Implementation:
- The model is any ``AutoModelForSequenceClassification`` with ``num_labels=1`` (a transformer with a
  scalar head). Backbones (``reward_backbones.load_reward_model``): ``minilm`` (the default on CPU: the 22M-parameter
  MiniLM encoder of ``all-MiniLM-L6-v2``, pooled at [CLS]), ``smollm2-135m-instruct`` (the course's policy
  with a new ``score`` head, pooled at the last real token), ``tiny-random`` (tests), any Hub id or directory.
- Text format (``reward_backbones.text_format``), the same for training and scoring: a tokenizer with a chat template
  formats (x, y) as a user turn and an assistant turn; a tokenizer without one (MiniLM, DeBERTa reward
  models) encodes the text pair ``[CLS] x [SEP] y [SEP]``.
- Chosen and rejected responses go through the model in one batch of 2B sequences.
- Nothing is truncated: a pair longer than ``max_length`` tokens stops training with an error, or is
  skipped and counted (``overlength="skip"``, reported as ``data/skipped_pairs``).

Deviations from InstructGPT: InstructGPT shows each labeller K = 4..9 responses and trains on all
C(K, 2) comparisons of one prompt in one batch element; the course data has one pair per prompt, so each
pair is its own example. InstructGPT initialises the reward model from the 6B SFT model; on a CPU the
default is a small encoder, which the course's 190 training pairs fine-tune in one to two minutes on 2 cores.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .training.checkpoint import CHECKPOINT_EVERY
from .training.protocol import CheckpointState
from .reward_backbones import (MINILM, format_chat, load_reward_model, pair_rewards, reward_scores, set_trainable,
                               text_format, token_lengths)
# the rest of reward_backbones, importable from here as before it was split off (alignlib.reward_model.encode, ...)
from .reward_backbones import BACKBONES, MINILM_MODULE, MINILM_PACKAGE, _tokenize, encode  # noqa: F401
from .reward_backbones import minilm_dir, tiny_reward_model  # noqa: F401
from .rewards import LengthReward, RewardModelReward, SentimentReward, check_pairs, check_rewards, reward_name
from .utils import PresetMixin, check_finite, guarded_step, peak_memory_mb, seed_everything

PAIR_FIELDS = ("prompt", "chosen", "rejected")


# ---------------------------------------------------------------- the loss

def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       target: torch.Tensor | None = None) -> torch.Tensor:
    """L = -mean_i log sigma(r_c[i] - r_r[i]) (InstructGPT eq. 1), a scalar.

    Args:
        r_chosen: (B,) rewards of the preferred responses.
        r_rejected: (B,) rewards of the other responses of the same prompts.
        target: optional (B,) soft labels p_i = P(chosen better) in [0, 1], as AI feedback gives them
            (Constitutional AI): L = -mean_i [p_i log sigma(d_i) + (1 - p_i) log sigma(-d_i)], d = r_c - r_r,
            the cross-entropy to the soft label; p = 1 is the hard loss, p = 1/2 asks for d = 0.

    ``logsigmoid`` is used instead of ``log(sigmoid(.))``: for a difference of -100 the latter is log(0).
    At r_c == r_r the loss is log 2; its gradient is -sigma(r_r - r_c) / B for r_c and the opposite for
    r_r, so a step of gradient descent raises r_c and lowers r_r, less and less as the margin grows.
    """
    if not isinstance(r_chosen, torch.Tensor) or not isinstance(r_rejected, torch.Tensor):
        raise TypeError("r_chosen and r_rejected must be tensors of shape (B,).")
    if r_chosen.dim() != 1 or r_chosen.shape != r_rejected.shape or r_chosen.numel() == 0:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} must both "
                         "have shape (B,) with B >= 1: one reward per pair (squeeze a (B, 1) head output).")
    diff = r_chosen - r_rejected
    if target is None:
        return -F.logsigmoid(diff).mean()
    target = torch.as_tensor(target, dtype=diff.dtype, device=diff.device)
    if target.shape != diff.shape or not ((target >= 0) & (target <= 1)).all():
        raise ValueError(f"target {tuple(target.shape)} must hold one probability in [0, 1] per pair, like r_chosen "
                         f"{tuple(diff.shape)}.")
    return -(target * F.logsigmoid(diff) + (1 - target) * F.logsigmoid(-diff)).mean()


def preference_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict:
    """Accuracy (fraction with r_c > r_r, ties are errors), mean margin r_c - r_r, and the mean BT loss."""
    r_chosen, r_rejected = r_chosen.detach().float(), r_rejected.detach().float()
    loss = bradley_terry_loss(r_chosen, r_rejected)  # checks the shapes
    diff = r_chosen - r_rejected  # (B,)
    return {"accuracy": (diff > 0).float().mean().item(), "margin": diff.mean().item(), "loss": loss.item()}


# ---------------------------------------------------------------- data

def check_preference_pairs(pairs, name: str = "pairs") -> list[dict]:
    """Validate preference pairs: a ``datasets.Dataset`` or a list of dicts with string prompt/chosen/rejected."""
    if pairs is None:
        raise ValueError(f"{name} is None; pass load_course_dataset('preference_pairs', 'train') or a list of "
                         "{'prompt', 'chosen', 'rejected'} dicts.")
    if isinstance(pairs, (str, dict)):
        raise TypeError(f"{name} must be a datasets.Dataset or a list of dicts, got a {type(pairs).__name__}; "
                        "wrap a single pair in a list.")
    rows = pairs.to_list() if hasattr(pairs, "to_list") else list(pairs)
    if not rows:
        raise ValueError(f"{name} is empty: a reward model needs at least one (prompt, chosen, rejected) pair.")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"{name}[{i}] is a {type(row).__name__}; each pair must be a dict with keys {PAIR_FIELDS}.")
        missing = [k for k in PAIR_FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{name}[{i}] lacks string fields {missing}; each pair needs {list(PAIR_FIELDS)} "
                             "(map other column names first, e.g. dataset.rename_column('question', 'prompt')).")
        if "p" in row and not (isinstance(row["p"], (int, float)) and 0 <= row["p"] <= 1):
            raise ValueError(f"{name}[{i}]['p'] = {row['p']!r}: a soft label must be a probability in [0, 1] that "
                             "chosen is better (leave it out for a hard label).")
    return rows






# ---------------------------------------------------------------- config

@dataclass
class RewardModelConfig(PresetMixin):
    """Hyper-parameters of reward-model training. Presets: ``RewardModelConfig.preset("cpu" | "lab-gpu")``."""

    model: str = MINILM
    """Backbone for ``load_reward_model`` (used by ``run``)."""
    dataset: str = "preference_pairs"
    """A course preference set, or ``"Anthropic/hh-rlhf"`` (used by ``run``)."""
    max_train_pairs: int | None = None
    """Keep the first n training pairs (None: all)."""
    lr: float = 1e-4
    """AdamW learning rate (peak, after warm-up)."""
    epochs: int = 3
    """Passes over the training pairs."""
    batch_size: int = 8
    """Pairs per gradient step (2 x batch_size sequences per forward pass)."""
    max_length: int = 256
    """Tokens per formatted prompt+response; longer pairs raise (or are skipped, see ``overlength``)."""
    overlength: str = "error"
    """What to do with a pair over ``max_length``: ``"error"`` stops before training, ``"skip"`` drops it
    and reports the count as ``data/skipped_pairs``. Never truncated."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of the steps over which the learning rate rises linearly from 0; then it decays linearly to 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (global L2 norm)."""
    train_layers: str | int = "all"
    """``"all"``, ``"head"``, or k: only the last k transformer blocks and the head (faster on CPU)."""
    seed: int = 0
    """Seeds the head's initialisation, the shuffling and dropout."""

    PRESETS = {
        "cpu": dict(model=MINILM, dataset="preference_pairs", lr=1e-4, epochs=2, batch_size=8, max_length=256),
        "lab-gpu": dict(model="qwen2.5-0.5b-instruct", dataset="Anthropic/hh-rlhf", max_train_pairs=None, lr=1e-5,
                        epochs=1, batch_size=32, max_length=1024, overlength="skip", warmup_ratio=0.03),
    }

    def __post_init__(self):
        if self.overlength not in ("error", "skip"):
            raise ValueError(f"overlength must be 'error' or 'skip', got {self.overlength!r}.")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")


# ---------------------------------------------------------------- training and evaluation

def _check_lengths(model, tokenizer, rows: list[dict], config: RewardModelConfig, style: str,
                   name: str = "pairs") -> tuple[list[dict], int]:
    """Drop (and count) or reject the pairs whose longer side exceeds ``config.max_length`` tokens."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and config.max_length > limit:
        raise ValueError(f"max_length={config.max_length} exceeds the backbone's {limit} positions; lower it.")
    prompts = [r["prompt"] for r in rows]
    n_c = token_lengths(tokenizer, prompts, [r["chosen"] for r in rows], style)
    n_r = token_lengths(tokenizer, prompts, [r["rejected"] for r in rows], style)
    longest = [max(a, b) for a, b in zip(n_c, n_r)]
    over = [i for i, n in enumerate(longest) if n > config.max_length]
    if over and config.overlength == "error":
        raise ValueError(f"{len(over)} of {len(rows)} {name} exceed max_length={config.max_length} tokens (longest: "
                         f"{max(longest)}, pair {longest.index(max(longest))}); nothing is truncated. Fix: raise "
                         "max_length, or set overlength='skip' to drop and count them.")
    keep = [row for row, n in zip(rows, longest) if n <= config.max_length]
    if not keep:
        raise ValueError(f"every one of the {name} exceeds max_length={config.max_length}; raise it.")
    return keep, len(over)


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, pairs, batch_size: int = 16, max_length: int | None = None) -> dict:
    """Score every pair and compare: accuracy = fraction with r(x, y_c) > r(x, y_r).

    Args:
        model: a reward model (sequence classifier with one output), or, with ``tokenizer=None``, any reward
            function ``(prompts, responses) -> (B,)`` (e.g. ``rewards.LengthReward()`` as a baseline).
        pairs: a ``datasets.Dataset`` or list of dicts with prompt/chosen/rejected.

    Returns: ``{"accuracy", "margin" (mean r_c - r_r), "loss" (mean BT loss), "n", "chosen" (N,), "rejected" (N,)}``.
    """
    rows = check_preference_pairs(pairs)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if tokenizer is None:
        if not callable(model):
            raise TypeError("with tokenizer=None, model must be a reward function (prompts, responses) -> (B,).")
        prompts, name = [r["prompt"] for r in rows], reward_name(model)
        r_c = check_rewards(model(prompts, [r["chosen"] for r in rows]), len(rows), name, tensor_only=False)
        r_r = check_rewards(model(prompts, [r["rejected"] for r in rows]), len(rows), name, tensor_only=False)
    else:
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        for i in range(0, len(rows), batch_size):
            c, r = pair_rewards(model, tokenizer, rows[i:i + batch_size], max_length)  # (b,), (b,)
            chosen.append(c.cpu())
            rejected.append(r.cpu())
        model.train(was_training)
        r_c, r_r = torch.cat(chosen), torch.cat(rejected)  # (N,), (N,)
    return {**preference_metrics(r_c, r_r), "n": len(rows), "chosen": r_c, "rejected": r_r}


class RewardModelTrainer(CheckpointState):
    """Bradley-Terry training one gradient step at a time (``step()``), so the run protocol of
    ``alignlib.training.checkpoint`` (checkpoints, exact resume, clean stop) applies as to the policy trainers.

    ``history`` holds one record per gradient step; ``evals`` the evaluations on ``eval_pairs`` (before training
    and after each epoch); ``records()`` interleaves them as ``train_reward_model`` returns them.
    """

    def __init__(self, model, tokenizer, pairs, config: RewardModelConfig | None = None, eval_pairs=None,
                 callback: Callable[[dict], None] | None = None):
        self.config = config = config or RewardModelConfig()
        rows = check_preference_pairs(pairs, "pairs")
        eval_rows = check_preference_pairs(eval_pairs, "eval_pairs") if eval_pairs is not None else None
        self.style = text_format(tokenizer)
        self.rows, skipped = _check_lengths(model, tokenizer, rows, config, self.style)
        self.info = {"data/pairs": len(self.rows), "data/skipped_pairs": skipped}
        if eval_rows is not None:
            eval_rows, self.info["data/eval_skipped_pairs"] = _check_lengths(model, tokenizer, eval_rows, config,
                                                                             self.style, "eval_pairs")
        self.eval_rows = eval_rows
        self.reward_model, self.tokenizer, self.callback = model, tokenizer, callback
        self.device = next(model.parameters()).device
        seed_everything(config.seed)
        counts = set_trainable(model, config.train_layers)
        self.info.update({"params/trainable": counts["trainable"], "params/total": counts["total"]})
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.rows) / config.batch_size)
        self.total = config.epochs * self.steps_per_epoch
        warmup = int(config.warmup_ratio * self.total)

        def lr_factor(step: int) -> float:  # linear warm-up, then linear decay to 0
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (self.total - step) / max(1, self.total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.rng = random.Random(config.seed)   # unused by training; part of every trainer's checkpoint
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.train_s = 0.0
        self._order: tuple[int, list[int]] = (0, [])    # (epoch, its order), the last one drawn

    def order(self, epoch: int) -> list[int]:
        """The shuffled pair order of ``epoch`` (1-based): the epoch-th permutation drawn from the seed, so a
        resumed run needs no generator state."""
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.seed)
            for _ in range(epoch):
                perm = torch.randperm(len(self.rows), generator=generator).tolist()
            self._order = (epoch, perm)
        return self._order[1]

    def evaluate(self, step: int, epoch: int) -> dict:
        m = pairwise_accuracy(self.reward_model, self.tokenizer, self.eval_rows, batch_size=2 * self.config.batch_size,
                              max_length=self.config.max_length)
        return {"step": step, "epoch": epoch, "eval/accuracy": m["accuracy"], "eval/margin": m["margin"],
                "eval/loss": m["loss"], "time/train_s": self.train_s, "memory/peak_mb": peak_memory_mb(self.device)}

    def _log(self, record: dict, to: list) -> dict:
        if self.info:                                 # the data and parameter counts go into the first record
            record, self.info = {**self.info, **record}, {}
        to.append(record)
        if self.callback is not None:
            self.callback(record)
        return record

    def step(self) -> dict:
        """One gradient step on the next batch of pairs (an evaluation before the first and after each epoch)."""
        cfg, done = self.config, len(self.history)
        if done >= self.total:
            raise RuntimeError(f"all {self.total} steps ({cfg.epochs} epochs) are done.")
        if done == 0 and self.eval_rows is not None and not self.evals:
            self._log(self.evaluate(0, 0), self.evals)
        epoch, start = done // self.steps_per_epoch + 1, (done % self.steps_per_epoch) * cfg.batch_size
        self.reward_model.train()
        t0 = time.perf_counter()
        batch = [self.rows[i] for i in self.order(epoch)[start:start + cfg.batch_size]]
        r_c, r_r = pair_rewards(self.reward_model, self.tokenizer, batch, cfg.max_length, self.style)  # (B,), (B,)
        soft = torch.tensor([float(row.get("p", 1.0)) for row in batch], device=r_c.device)  # (B,) P(chosen better)
        loss = bradley_terry_loss(r_c, r_r, soft if any("p" in row for row in batch) else None)
        check_finite(loss, "loss/total (the Bradley-Terry loss)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = guarded_step(self.optimizer, cfg.max_grad_norm, "reward model")   # checks gradient and weights
        self.scheduler.step()
        self.train_s += time.perf_counter() - t0
        m = preference_metrics(r_c, r_r)
        record = self._log({"step": done + 1, "epoch": epoch, "loss/total": loss.item(),
                            "reward/accuracy": m["accuracy"], "reward/margin": m["margin"],
                            "reward/chosen": r_c.mean().item(), "reward/rejected": r_r.mean().item(),
                            "grad/norm": grad_norm, "optim/lr": lr, "time/train_s": self.train_s,
                            "memory/peak_mb": peak_memory_mb(self.device)}, self.history)
        if (done + 1) % self.steps_per_epoch == 0:
            if self.eval_rows is not None:
                self._log(self.evaluate(done + 1, epoch), self.evals)
            self.reward_model.eval()
        return record

    def records(self) -> list[dict]:
        """Evaluations and steps in the order they happened (an evaluation follows the step it is taken after)."""
        out = [e for e in self.evals if e["epoch"] == 0]
        after = {e["step"]: e for e in self.evals if e["epoch"] > 0}
        for record in self.history:
            out.append(record)
            if record["step"] in after:
                out.append(after[record["step"]])
        return out

    def trainable_module(self) -> nn.Module:
        return self.reward_model

    @property
    def iterations(self) -> int:
        return self.total

    def train_step(self) -> dict:
        return self.step()

    def extra_state(self) -> dict:
        """What a checkpoint needs beyond weights, optimizer and RNGs (``alignlib.training.checkpoint``)."""
        return {"evals": self.evals, "train_s": self.train_s, "info": self.info}

    def load_extra_state(self, state: dict) -> None:
        self.evals[:], self.train_s, self.info = state["evals"], state["train_s"], state["info"]


def train_reward_model(model, tokenizer, pairs, config: RewardModelConfig | None = None, eval_pairs=None,
                       progress: bool = True, callback: Callable[[dict], None] | None = None) -> list[dict]:
    """Fit r_theta to preference pairs with the Bradley-Terry loss; return the history of metrics.

    One record per gradient step: ``step``, ``epoch``, ``loss/total`` (the BT loss of the batch),
    ``reward/accuracy``, ``reward/margin``, ``reward/chosen``, ``reward/rejected`` (batch means),
    ``grad/norm`` (before clipping), ``lr``, ``time/train_s`` (cumulative), ``memory/peak_mb``. With
    ``eval_pairs``, one more record before training and after each epoch with ``eval/accuracy``,
    ``eval/margin``, ``eval/loss``. The first record carries ``data/pairs`` and ``data/skipped_pairs``.
    The model is left in eval mode. A non-finite loss or gradient stops training before the update.
    """
    from tqdm.auto import tqdm

    trainer = RewardModelTrainer(model, tokenizer, pairs, config, eval_pairs, callback)
    bar = tqdm(total=trainer.total, desc="reward model", disable=not progress)
    while len(trainer.history) < trainer.total:
        record = trainer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss/total']:.3f}", acc=f"{record['reward/accuracy']:.2f}")
    bar.close()
    model.eval()
    return trainer.records()


# ---------------------------------------------------------------- as a reward function

class BradleyTerryReward(RewardModelReward):
    """A trained reward model as a reward function ``(prompts, responses) -> (B,)``, scoring exactly as
    ``train_reward_model`` formats and tokenizes (chat template, or the text pair ``[CLS] x [SEP] y [SEP]``).
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int = 512):
        style = text_format(tokenizer)
        super().__init__(model, tokenizer, chat=style == "chat", batch_size=batch_size, max_length=max_length)
        self.style = style

    def format(self, prompt: str, response: str) -> str:
        """The text the model reads (for display; the pair style is tokenized as two segments)."""
        if self.style == "chat":
            return format_chat(self.tokenizer, prompt, response)
        return f"{prompt} {self.tokenizer.sep_token or '|'} {response}"

    @torch.no_grad()
    def __call__(self, prompts, responses) -> torch.Tensor:
        prompts, responses = check_pairs(prompts, responses)
        was_training = self.model.training
        self.model.eval()
        scores = [reward_scores(self.model, self.tokenizer, prompts[i:i + self.batch_size],
                                responses[i:i + self.batch_size], self.max_length, self.style).cpu()
                  for i in range(0, len(prompts), self.batch_size)]
        self.model.train(was_training)
        return torch.cat(scores)  # (B,)


def as_reward_function(model, tokenizer, batch_size: int = 16, max_length: int = 512) -> BradleyTerryReward:
    """The trained model behind the reward signature of ``alignlib.rewards`` (for PPO, RAFT, RRHF, soups)."""
    return BradleyTerryReward(model, tokenizer, batch_size=batch_size, max_length=max_length)


# ---------------------------------------------------------------- one call: config -> trained model

def load_preference_data(config: RewardModelConfig):
    """(train, test) pairs named by ``config.dataset``: a course set or ``Anthropic/hh-rlhf`` (lab machines)."""
    from .data import COURSE_SETS, HUB_SETS, load_course_dataset, load_hub_dataset

    if config.dataset in COURSE_SETS:
        train, test = load_course_dataset(config.dataset, "train"), load_course_dataset(config.dataset, "test")
    elif HUB_SETS.get(config.dataset) == "preference":
        train = load_hub_dataset(config.dataset, "train", n=config.max_train_pairs)
        test = load_hub_dataset(config.dataset, "test")
    else:
        raise ValueError(f"dataset {config.dataset!r} is not a preference set; use 'preference_pairs' or "
                         "'Anthropic/hh-rlhf'.")
    if config.max_train_pairs is not None:
        train = train.select(range(min(config.max_train_pairs, len(train))))
    return train, test


def run(config: RewardModelConfig | None = None, device=None, progress: bool = True, out: Path | None = None,
        resume: bool = False, every: int = CHECKPOINT_EVERY) -> dict:
    """Load the backbone and data named by ``config``, train, and evaluate on the test split.

    With ``out`` (a directory ``prepare_output`` has checked), the run protocol of the method commands applies:
    checkpoints every ``every`` steps, at the end and on SIGINT/SIGTERM, ``resume`` from the last one, and at
    the end ``history.json`` and the trained model (safetensors) in ``out/model``.
    Returns ``{"model", "tokenizer", "history", "test"}`` (``test`` as returned by ``pairwise_accuracy``).
    """
    config = config or RewardModelConfig()
    model, tokenizer = load_reward_model(config.model, device=device, seed=config.seed)
    train, test = load_preference_data(config)
    if out is None:
        history = train_reward_model(model, tokenizer, train, config, eval_pairs=test, progress=progress)
    else:
        from dataclasses import asdict

        from .training.checkpoint import write_record
        from .training.loop import resume_run, stop_run, train_steps

        trainer = RewardModelTrainer(model, tokenizer, train, config, eval_pairs=test)
        record = {"method": "reward-model", "config": asdict(config)}
        if resume:
            resume_run("reward-model", out, trainer, trainer.total)
        signum = train_steps(trainer, out, trainer.total, every, record, progress)
        if signum is not None:
            stop_run("reward-model", out, trainer, trainer.total, signum)
        history = trainer.records()
    model.eval()
    style = text_format(tokenizer)
    test_rows, _ = _check_lengths(model, tokenizer, check_preference_pairs(test, "test"), config, style, "test pairs")
    result = pairwise_accuracy(model, tokenizer, test_rows, batch_size=2 * config.batch_size,
                               max_length=config.max_length)
    if out is not None:
        write_record(out, {**record, "history": history, "test": {"accuracy": result["accuracy"]},
                           "status": "finished"})
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(out / "model", safe_serialization=True)
            tokenizer.save_pretrained(out / "model")
    return {"model": model, "tokenizer": tokenizer, "history": history, "test": result}


def build_reward(spec: str, device=None):
    """A reward function from its name: ``sentiment``, ``length`` or ``rm:<model>``."""
    if spec == "sentiment":
        return SentimentReward()
    if spec == "length":
        return LengthReward()
    if spec.startswith("rm:"):
        model, tokenizer = load_reward_model(spec[3:], device=device)
        return as_reward_function(model, tokenizer)
    raise ValueError(f"unknown reward {spec!r}; use 'sentiment', 'length' or 'rm:<model>'.")
