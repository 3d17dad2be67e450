"""Evaluation helpers shared by the lectures: bootstrap intervals over prompts and paired differences.

A comparison of two methods (or of a policy before and after training) on the same prompts is *paired*: each
prompt gives one difference d_i = score_after(x_i) - score_before(x_i). The interval reported is the percentile
bootstrap of the mean of d over prompts (Efron & Tibshirani 1993, ch. 13): resample the prompts with
replacement B times, take the mean each time, and read the (1 - level) / 2 and (1 + level) / 2 quantiles.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .generation import generate


@dataclass(frozen=True)
class Interval:
    """A mean with a bootstrap interval, e.g. ``+0.21 [+0.08, +0.35]``."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap_mean(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``values`` (N,) and its percentile-bootstrap interval over the N items."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("values is empty: the bootstrap needs at least one value.")
    if not torch.isfinite(x).all():
        raise ValueError("values holds NaN or inf; drop or fix those items before bootstrapping.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (n_boot, x.numel()), generator=gen)  # (n_boot, N)
    means = x[idx].mean(-1)
    low, high = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return Interval(x.mean().item(), low.item(), high.item())


def paired_difference(after, before, **kwargs) -> Interval:
    """Mean of ``after - before`` over the same items, with its bootstrap interval (see ``bootstrap_mean``)."""
    a, b = torch.as_tensor(after, dtype=torch.float64), torch.as_tensor(before, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"after {tuple(a.shape)} and before {tuple(b.shape)} must score the same items.")
    return bootstrap_mean(a - b, **kwargs)


@torch.no_grad()
def evaluate(model, tokenizer, reward_fn, prompts: list[str], max_new_tokens: int, chat: bool, seed: int = 1234,
             temperature: float = 1.0) -> dict:
    """Mean reward of sampled responses on held-out prompts (fixed seed: before/after are comparable)."""
    roll = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat, seed=seed,
                    temperature=temperature)
    rewards = reward_fn(roll.prompts, roll.responses)
    return {"reward/mean": rewards.mean().item(), "samples": list(zip(roll.prompts[:4], roll.responses[:4]))}
