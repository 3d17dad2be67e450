"""Evaluation helpers shared by the lectures: bootstrap intervals over prompts, paired differences, Elo.

A comparison of two methods (or of a policy before and after training) on the same prompts is *paired*: each
prompt gives one difference d_i = score_after(x_i) - score_before(x_i). The interval reported is the percentile
bootstrap of the mean of d over prompts (Efron & Tibshirani 1993, ch. 13): resample the prompts with
replacement B times, take the mean each time, and read the (1 - level) / 2 and (1 + level) / 2 quantiles.

Several policies compared on the same prompts are ranked by Elo (``elo_scores``): Bradley-Terry strengths fitted to
pairwise outcomes (``pairwise_outcomes`` turns per-prompt scores into them), on the Elo scale, with bootstrap
intervals over the outcomes (``elo_intervals``); lecture 05 ranks the stages of Constitutional AI this way.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

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


# ---------------------------------------------------------------- Elo

def elo_scores(outcomes: Sequence[tuple], players: Sequence[str], iters: int = 2000, prior: float = 0.01) -> dict:
    """Elo scores from pairwise outcomes, the slides' Fig. 13 axis.

    ``outcomes``: (a, b, s) with s = 1 if a won, 0 if b won, 0.5 for a tie (or any soft score). Fits Bradley-Terry
    strengths beta by maximum likelihood, P(a beats b) = sigma(beta_a - beta_b), with a small L2 ``prior`` so a
    player who always wins stays finite; Elo = 400 / ln 10 * beta, shifted so that ``players[0]`` has 0.
    """
    players = list(players)
    index = {p: i for i, p in enumerate(players)}
    if len(index) < 2:
        raise ValueError(f"players must name at least two distinct players, got {players}.")
    if not outcomes:
        raise ValueError("outcomes is empty: pass (a, b, score) triples.")
    unknown = {x for a, b, _ in outcomes for x in (a, b)} - set(index)
    if unknown:
        raise ValueError(f"outcomes name players {sorted(unknown)} that are not in players {players}.")
    a = torch.tensor([index[o[0]] for o in outcomes])
    b = torch.tensor([index[o[1]] for o in outcomes])
    s = torch.tensor([float(o[2]) for o in outcomes], dtype=torch.float64)
    if ((s < 0) | (s > 1)).any():
        raise ValueError("every outcome score must lie in [0, 1].")
    beta = torch.zeros(len(players), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta], max_iter=iters, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        d = beta[a] - beta[b]
        loss = -(s * torch.nn.functional.logsigmoid(d) + (1 - s) * torch.nn.functional.logsigmoid(-d)).sum()
        loss = loss + prior * (beta ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    elo = 400 / torch.log(torch.tensor(10.0, dtype=torch.float64)) * (beta.detach() - beta.detach()[0])
    return {p: float(elo[i]) for p, i in index.items()}


def elo_intervals(outcomes: Sequence[tuple], players: Sequence[str], n_boot: int = 200, level: float = 0.95,
                  seed: int = 0) -> dict:
    """Each player's Elo and a bootstrap interval over the outcomes: {player: (elo, low, high)}."""
    point = elo_scores(outcomes, players)
    rng = random.Random(seed)
    draws = {p: [] for p in players}
    for _ in range(n_boot):
        sample = [outcomes[rng.randrange(len(outcomes))] for _ in outcomes]
        for p, v in elo_scores(sample, players).items():
            draws[p].append(v)
    lo, hi = (1 - level) / 2, (1 + level) / 2
    out = {}
    for p in players:
        v = sorted(draws[p])
        out[p] = (point[p], v[int(lo * (n_boot - 1))], v[int(round(hi * (n_boot - 1)))])
    return out


def pairwise_outcomes(scores: dict[str, Sequence[float]], tie: float = 1e-6) -> list[tuple]:
    """Every pair of stages compared prompt by prompt: ``scores[stage][i]`` is a score of stage's answer to prompt
    i (higher is better); a is the winner when its score is higher, a tie within ``tie`` scores 0.5."""
    names = list(scores)
    n = {len(v) for v in scores.values()}
    if len(n) != 1:
        raise ValueError("every stage needs one score per prompt; got lengths "
                         f"{ {k: len(v) for k, v in scores.items()} }.")
    out = []
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            for sx, sy in zip(scores[x], scores[y]):
                out.append((x, y, 0.5 if abs(sx - sy) <= tie else float(sx > sy)))
    return out
