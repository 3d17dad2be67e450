"""RRHF: rank responses to align language models with human feedback (Yuan et al. 2023, arXiv 2304.05302).

For each query x, k candidate responses y_1..y_k come from several sources (the policy itself, the initial
model, other models, responses stored in the data set such as chosen/rejected) and a reward function scores
them: r_i = R(x, y_i). The policy scores each candidate by its length-normalised log-likelihood

    p_i = sum_t log pi_theta(y_{i,t} | x, y_{i,<t}) / |y_i|^alpha            (alpha = 1 in the paper)

and learns to order these scores like the rewards, plus plain fine-tuning on the best candidate:

    L_rank = sum_{r_i < r_j} max(0, p_i - p_j)
    L_ft   = - 1/|y_i'| sum_t log pi_theta(y_{i',t} | x, y_{i',<t}),           i' = argmax_i r_i
    L      = L_rank + w * L_ft

Only the policy is trained, and no reference or value model is needed ("1-2 models": the policy, and a reward
model that can score candidates offline). With k = 1 there is no pair: RRHF is SFT on that response. With two
candidates whose rewards are the labels chosen > rejected, L_rank is a hinge version of the reward model's
pairwise loss with p in place of r(x, y): the policy *is* a reward model.

Deliberate differences from the reference code (GanjinZero/RRHF train.py):
- batches of several queries: the reference is written for one query per device batch (its rank loss
  flattens the batch's scores into one row, and with more than one query per batch it stops with a shape
  error). Here the pairs are formed **within each query** of a (Q, k) table, a batch of two queries gives
  exactly the sum of the two single-query losses, and the optimiser step divides by the number of queries;
- L_ft is the mean NLL per token of the best response (the reference averages over padded positions too);
- ``alpha`` is the length-penalty exponent (the reference's ``length_penalty``), 1 by default.

Memory. One step scores all Q x k candidates with gradients, so activations grow linearly with k: about
Q * k * T * (layers * hidden * c) floats, plus the LM head's Q * k * T_response * V logits. To bound it,
``chunk_size`` processes at most that many candidates per backward pass with the **exact** same gradient:
L is a function of the per-candidate numbers (p_i, nll_i) only, so a first pass without gradients computes
them, autograd gives dL/dp_i and dL/dnll_i on those detached values, and a second pass back-propagates
sum_i (dL/dp_i) p_i + (dL/dnll_i) nll_i chunk by chunk. It costs one extra forward pass; peak activations are
those of ``chunk_size`` sequences, whatever k is.
"""
from __future__ import annotations

import random
from contextlib import nullcontext
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .training.protocol import CheckpointState
from .training.distributed import gather_tensor, make_accelerator, mean_over_processes, query_seeds, shard
from .generation import generate
from .logprobs import divergence_from_reference, length_normalized_logprob
from .models import maybe_reference
from .sft import SFTBatch, encode_sft, make_optimizer, response_token_logprobs
from .rewards import score
from .utils import (PresetMixin, check_finite, check_sampling_fields, guarded_step, peak_memory_mb, seed_everything,
                    timer)


# ---------------------------------------------------------------- pure functions (graded in exercise 02)

def _check_candidates(scores: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if scores.dim() != 2 or scores.shape != rewards.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and rewards {tuple(rewards.shape)} must both be (Q, k): "
                         "one row per query, one column per candidate.")
    if valid is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if valid.shape != scores.shape:
        raise ValueError(f"valid {tuple(valid.shape)} must match scores {tuple(scores.shape)}.")
    return valid.bool()


def rank_loss(scores: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_rank = sum over queries q and pairs (i, j) with r_qi < r_qj of max(0, p_qi - p_qj).

    scores p (Q, k), rewards r (Q, k), valid (Q, k) bool (False marks a missing candidate) -> scalar.
    Ties (r_i = r_j) form no pair. Summed, not averaged, over queries.
    """
    valid = _check_candidates(scores, rewards, valid)
    diff = scores[:, :, None] - scores[:, None, :]                    # (Q, k, k): p_i - p_j
    worse = rewards[:, :, None] < rewards[:, None, :]                 # (Q, k, k): r_i < r_j
    pairs = worse & valid[:, :, None] & valid[:, None, :]
    return (torch.relu(diff) * pairs).sum()


def best_response_loss(nll: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_ft = sum over queries of the NLL of the highest-reward candidate (the first one on a tie).

    nll (Q, k): mean negative log-likelihood per token of each candidate; rewards (Q, k) -> scalar.
    """
    valid = _check_candidates(nll, rewards, valid)
    if not valid.any(-1).all():
        raise ValueError("every query needs at least one valid candidate.")
    best = rewards.masked_fill(~valid, float("-inf")).argmax(-1)       # (Q,)
    return nll.gather(1, best[:, None]).sum()


def rrhf_loss(scores: torch.Tensor, nll: torch.Tensor, rewards: torch.Tensor, ft_weight: float = 1.0,
              valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """L = L_rank + w * L_ft, summed over queries; also the two parts and the ranking accuracy of the scores."""
    l_rank = rank_loss(scores, rewards, valid)
    l_ft = best_response_loss(nll, rewards, valid)
    with torch.no_grad():
        v = _check_candidates(scores, rewards, valid)
        pairs = (rewards[:, :, None] < rewards[:, None, :]) & v[:, :, None] & v[:, None, :]
        agree = (scores[:, :, None] < scores[:, None, :]) & pairs
        accuracy = (agree.sum() / pairs.sum()).item() if pairs.any() else float("nan")
    return l_rank + ft_weight * l_ft, {"loss/rank": l_rank.item(), "loss/ft": l_ft.item(), "rank/accuracy": accuracy}


def candidate_scores(model, batch: SFTBatch, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-candidate p (length-normalised log-prob, exponent alpha) and NLL per token: (N,), (N,)."""
    lp = response_token_logprobs(model, batch)                        # (N, T)
    p = length_normalized_logprob(lp, batch.response_mask, alpha)
    nll = -length_normalized_logprob(lp, batch.response_mask, 1.0)
    return p, nll


# ---------------------------------------------------------------- configuration

@dataclass
class RRHFConfig(PresetMixin):
    """Hyper-parameters of RRHF. Presets: ``RRHFConfig.preset("cpu" | "lab-gpu")``."""

    steps: int = 12
    """Optimizer steps; each samples fresh candidates for ``batch_size`` queries."""
    batch_size: int = 8
    """Queries per step (Q)."""
    policy_samples: int = 2
    """Candidates sampled from the current policy per query."""
    initial_samples: int = 2
    """Candidates sampled from the initial model (the LoRA adapter switched off) per query."""
    data_responses: bool = True
    """Add the responses stored with a query as candidates: chosen and rejected of a preference pair, or answers
    of other models generated beforehand (``{"prompt": ..., "responses": [...]}``)."""
    max_new_tokens: int = 24
    """Length limit of sampled candidates."""
    temperature: float = 1.0
    """Sampling temperature of the candidates."""
    chat: bool = True
    """Wrap prompts in the chat template (False: continue raw text)."""
    alpha: float = 1.0
    """Length-penalty exponent of p_i = log pi(y_i | x) / |y_i|^alpha."""
    ft_weight: float = 1.0
    """w, the weight of the fine-tuning loss on the best candidate."""
    lr: float = 1e-4
    """AdamW learning rate."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold; 0 disables."""
    chunk_size: int | None = None
    """Candidates per backward pass (None: all Q*k at once). Bounds activation memory; exact same gradient."""
    seed: int = 0
    """Seeds sampling and the choice of queries."""
    seed_per_query: bool = False
    """Sample each query from its own random stream (``generate(row_seeds=...)``): a run under ``accelerate launch``
    with N processes then samples, and learns, what one process does. Needs the fast decoder."""

    PRESETS = {
        # measured on 2 CPU cores (see the README): the sentiment task of lecture 01, 4 policy + initial samples
        "cpu": dict(steps=14, batch_size=8, policy_samples=2, initial_samples=2, max_new_tokens=16, lr=3e-3,
                    chunk_size=8),
        "lab-gpu": dict(steps=400, batch_size=16, policy_samples=2, initial_samples=2, max_new_tokens=128,
                        lr=2e-5, chunk_size=16),
    }


    def __post_init__(self):
        if self.policy_samples < 0 or self.initial_samples < 0 or self.batch_size < 1:
            raise ValueError("policy_samples and initial_samples must be >= 0 and batch_size >= 1.")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}.")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be None or >= 1, got {self.chunk_size}.")
        check_sampling_fields(self)


# ---------------------------------------------------------------- candidates and the training loop

@dataclass
class Query:
    """A prompt and the responses stored with it (candidates from the data set, may be empty)."""

    prompt: str
    responses: list[str] = field(default_factory=list)


def as_queries(items) -> list[Query]:
    """Prompts (str) or dicts with ``prompt`` and optional ``chosen``/``rejected``/``responses`` -> Queries."""
    if isinstance(items, str) or not items:
        raise ValueError("queries must be a non-empty list of prompts or of {'prompt', 'chosen', 'rejected'} dicts.")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Query):
            out.append(item)
        elif isinstance(item, str):
            out.append(Query(item))
        elif isinstance(item, dict) and "prompt" in item:
            stored = list(item.get("responses", [])) + [item[k] for k in ("chosen", "rejected") if k in item]
            out.append(Query(item["prompt"], stored))
        else:
            raise TypeError(f"queries[{i}] must be a string or a dict with a 'prompt' key, got {type(item).__name__}.")
    return out


@dataclass
class Candidates:
    """The k candidates of Q queries, flattened query-major: row q * k + i is candidate i of query q."""

    prompts: list[str]
    responses: list[str]
    sources: list[str]
    finished: list[bool]          # False: cut at max_new_tokens (no EOS is trained on)
    k: int

    def __len__(self) -> int:
        return len(self.responses)


@dataclass
class RRHFTrainer(CheckpointState):
    """The policy (LoRA: its adapter-off base is the "initial model" source), a reward function and queries.

    Under ``accelerate launch`` each process takes its share of every step's queries
    (``alignlib.training.distributed``);
    ``sampler`` is the rollout phase (``generate``'s signature), the one function a serving engine replaces.
    """

    policy: torch.nn.Module
    tokenizer: object
    reward_fn: Callable
    queries: Sequence
    config: RRHFConfig = field(default_factory=RRHFConfig)
    ref_model: torch.nn.Module | None = None   # the initial model for a full (non-LoRA) policy
    log_kl: bool = True                        # also log KL and reference perplexity of the policy's samples
    accelerator: object = None                 # default: a new ``accelerate.Accelerator()``
    sampler: Callable = generate               # the rollout phase: (model, tokenizer, prompts, **kw) -> Rollout

    def __post_init__(self):
        self.queries = as_queries(self.queries)
        cfg = self.config
        k = cfg.policy_samples + cfg.initial_samples
        if cfg.data_responses:
            counts = {len(q.responses) for q in self.queries}
            if len(counts) > 1:
                raise ValueError(f"queries carry different numbers of stored responses {sorted(counts)}; with "
                                 "data_responses=True every query needs the same number.")
            k += counts.pop()
        if k < 1:
            raise ValueError("no candidate source: set policy_samples, initial_samples or data_responses.")
        if cfg.initial_samples and self.ref_model is None and not hasattr(self.policy, "disable_adapter"):
            raise TypeError("initial_samples needs a LoRA policy (lora=True) or ref_model=the initial model.")
        self.k = k
        seed_everything(cfg.seed)
        self.accelerator = make_accelerator(self.accelerator, cfg.seed_per_query, "RRHF")
        # self.model: what computes gradients (DDP/FSDP-wrapped under accelerate); self.policy: the plain module
        self.model, self.optimizer = self.accelerator.prepare(self.policy, make_optimizer(self.policy, cfg.lr))
        self.rng = random.Random(cfg.seed)
        self.history: list[dict] = []

    @torch.no_grad()
    def candidates(self, queries: list[Query], seeds: list[int] | None = None) -> Candidates:
        """k candidates per query from the configured sources, grouped by query (``seeds``: one per query)."""
        cfg = self.config
        prompts = [q.prompt for q in queries]
        per_query: list[list[tuple[str, str, bool]]] = [[] for _ in queries]
        samplers = [("policy", cfg.policy_samples, nullcontext(self.policy)),
                    ("initial", cfg.initial_samples, maybe_reference(self.policy, self.ref_model))]
        for offset, (source, n, model_context) in enumerate(samplers):
            if not n:
                continue
            streams = {} if seeds is None else {"row_seeds": [2 * s + offset for s in seeds]}  # one stream per source
            with model_context as model:
                roll = self.sampler(model, self.tokenizer, prompts, num_return_sequences=n,
                                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, chat=cfg.chat,
                                    **streams)
            for j, (text, done) in enumerate(zip(roll.responses, roll.finished.tolist())):
                per_query[j // n].append((text, source, done))
        if cfg.data_responses:
            for j, q in enumerate(queries):
                per_query[j].extend((r, "data", True) for r in q.responses)
        flat = [(q.prompt, *c) for q, cands in zip(queries, per_query) for c in cands]
        p, r, s, f = (list(col) for col in zip(*flat))
        return Candidates(p, r, s, f, self.k)

    def sample_queries(self) -> list[Query]:
        return [self.rng.choice(self.queries) for _ in range(self.config.batch_size)]

    def backward(self, batch: SFTBatch, rewards: torch.Tensor, n_queries: int) -> dict:
        """Accumulate the gradient of L / Q into the policy; return the loss statistics.

        Without ``chunk_size`` one forward pass over all candidates; with it, the two-pass exact scheme of the
        module docstring (scores without gradients, then chunked surrogate backward passes).
        """
        cfg = self.config
        N = len(batch)
        chunk = cfg.chunk_size or N

        def objective(p, nll):  # L / Q from the per-candidate numbers (N,), (N,)
            loss, stats = rrhf_loss(p.view(n_queries, -1), nll.view(n_queries, -1), rewards, cfg.ft_weight)
            loss = loss / n_queries
            check_finite(loss, "RRHF loss")
            return loss, {**stats, "loss/total": loss.item()}

        if chunk >= N:
            loss, stats = objective(*candidate_scores(self.model, batch, cfg.alpha))
            self.accelerator.backward(loss)
            return stats
        with torch.no_grad():  # pass 1: the per-candidate numbers, no activations kept
            parts = [candidate_scores(self.policy, batch.select(slice(i, i + chunk)), cfg.alpha)
                     for i in range(0, N, chunk)]
        p0 = torch.cat([a for a, _ in parts]).requires_grad_()
        nll0 = torch.cat([b for _, b in parts]).requires_grad_()
        loss, stats = objective(p0, nll0)
        g_p, g_nll = torch.autograd.grad(loss, (p0, nll0))                      # (N,), (N,): dL/dp, dL/dnll
        for i in range(0, N, chunk):  # pass 2: sum_i g_i * p_i has the same gradient as L, chunk by chunk
            last = i + chunk >= N     # processes average their gradients once, after the last chunk
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                p, nll = candidate_scores(self.model, batch.select(slice(i, i + chunk)), cfg.alpha)
                self.accelerator.backward((g_p[i:i + chunk] * p).sum() + (g_nll[i:i + chunk] * nll).sum())
        return stats

    @property
    def iterations(self) -> int:
        return self.config.steps

    def train_step(self) -> dict:
        return self.step()

    def step(self) -> dict:
        cfg = self.config
        metrics: dict = {"step": len(self.history)}
        start = time.perf_counter()
        queries = self.sample_queries()                      # the global batch, the same in every process
        seeds = query_seeds(cfg.seed, metrics["step"], len(queries)) if cfg.seed_per_query else None
        queries = shard(queries, self.accelerator)
        seeds = seeds and shard(seeds, self.accelerator)
        self.policy.eval()
        with timer(metrics, "time/generate_s"):
            cands = self.candidates(queries, seeds)
        with timer(metrics, "time/reward_s"):
            rewards = score(self.reward_fn, cands.prompts, cands.responses).view(len(queries), self.k)  # (Q, k)
        device = next(self.policy.parameters()).device
        batch = encode_sft(self.tokenizer, cands.prompts, cands.responses, cfg.chat, add_eos=cands.finished).to(device)
        rewards = rewards.to(device)
        by_source = {source: torch.tensor([s == source for s in cands.sources],
                                          device=device).view(len(queries), self.k)
                     for source in ("policy", "initial", "data")}                      # (Q, k) each
        src = by_source["policy"]
        if self.log_kl and src.any():  # the policy that drew the samples, before this step's update; one per query
            first = src.float().argmax(-1) + torch.arange(len(queries), device=device) * self.k
            pol = batch.select(first[src.any(-1)])
            with timer(metrics, "time/score_s"):
                div = divergence_from_reference(self.policy, pol.input_ids, pol.attention_mask, pol.response_mask,
                                                self.ref_model, temperature=cfg.temperature)
            metrics.update(mean_over_processes({"kl/ref": div["kl"].mean().item(),
                                                "ppl/ref": div["ref_nll"].mean().exp().item()}, self.accelerator))
        with timer(metrics, "time/train_s"):
            self.policy.train()
            self.optimizer.zero_grad(set_to_none=True)
            metrics.update(mean_over_processes(self.backward(batch, rewards, len(queries)), self.accelerator))
            metrics["grad/norm"] = guarded_step(self.optimizer, cfg.max_grad_norm, "RRHF",
                                                clip=self.accelerator.clip_grad_norm_)
            self.policy.eval()
        # the statistics of the global batch: every process's rows, in rank order
        rewards = gather_tensor(rewards, self.accelerator)
        by_source = {k: gather_tensor(v, self.accelerator) for k, v in by_source.items()}
        src = by_source["policy"]
        metrics.update({
            "reward/candidates_mean": rewards.mean().item(),
            "reward/best_mean": rewards.max(-1).values.mean().item(),
            "response/length": batch.response_mask.sum(-1).float().mean().item(),
        })
        if src.any():
            metrics["reward/mean"] = rewards[src].mean().item()  # the policy's own samples, as PPO reports
        for source, sel in by_source.items():
            if sel.any():
                metrics[f"reward/{source}"] = rewards[sel].mean().item()
        metrics["time/step_s"] = time.perf_counter() - start
        metrics["memory/peak_mb"] = peak_memory_mb(device)
        self.history.append(metrics)
        return metrics

    def train(self, steps: int | None = None, progress: bool = True) -> list[dict]:
        """Run ``steps`` RRHF steps (default ``config.steps``); return the history."""
        bar = tqdm(range(steps or self.config.steps), desc="RRHF", disable=not progress)
        for _ in bar:
            m = self.step()
            bar.set_postfix(loss=f"{m['loss/total']:.3f}", reward=f"{m['reward/candidates_mean']:+.3f}")
        return self.history


@torch.no_grad()
def preference_accuracy(model, tokenizer, pairs, alpha: float = 1.0, chat: bool = True, batch_size: int = 8) -> dict:
    """The policy as a reward model: how often p(chosen) > p(rejected) on preference pairs.

    pairs: dicts with ``prompt``, ``chosen``, ``rejected``. Returns ``accuracy`` and the margins p_c - p_r (n,).
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty.")
    device = next(model.parameters()).device
    margins = []
    model.eval()
    for i in range(0, len(pairs), batch_size):
        rows = pairs[i:i + batch_size]
        prompts = [r["prompt"] for r in rows] * 2
        responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        batch = encode_sft(tokenizer, prompts, responses, chat).to(device)
        p, _ = candidate_scores(model, batch, alpha)
        margins.append(p[:len(rows)] - p[len(rows):])
    margins = torch.cat(margins).cpu()
    return {"accuracy": (margins > 0).float().mean().item(), "margins": margins}
