"""Rewarded soups (Ramé et al. 2023, arXiv 2306.04488): Pareto-optimal alignment by weight interpolation.

One proxy reward is imperfect and people weigh rewards differently, so the goal is a *set* of policies, one per
trade-off, not one policy. With N rewards R_1..R_N:

- MORL (the baseline): one fine-tuning per weighting mu on the simplex, on R_mu = sum_i mu_i R_i. Covering the
  trade-offs needs M >> N trainings, each chosen before knowing who will use it.
- Rewarded soups (RS), three phases:
  1. *training*: N experts theta_1..theta_N, each fine-tuned on its own R_i **from one shared initialisation**;
  2. *selection*: for a user's weights mu, the soup theta(lambda) = sum_i lambda_i theta_i (lambda on the simplex)
     that maximises R_mu on validation prompts; no training at all, any number of users;
  3. *evaluation*: that soup on test prompts.

Two bets make this work, and the course measures both instead of assuming them:

- Hypothesis 1 (linear mode connectivity, LMC): for lambda in [0, 1] and every k,
  R_k(theta(lambda)) >= (1 - lambda) R_k(theta_1) + lambda R_k(theta_2): the soup is at least as good as the
  interpolation of the experts' rewards (``lmc_gaps``).
- Hypothesis 2 (Pareto optimality): the soups' front is close to the true Pareto front (which MORL approximates
  with M trainings); compared here by the hypervolume of both fronts (``hypervolume``). Lemma 1 of the paper:
  if each R_i is quadratic in theta with one shared Hessian, the soups *are* the Pareto front.

LoRA experts. An expert's weight is W_0 + s B_i A_i (``s = lora_alpha / r``). Interpolating the weights means

    product:  W(lambda) = W_0 + s sum_i lambda_i B_i A_i                    (``lora_soup(..., "product")``)

which is the soup of the full weights exactly. The reference code (alexrame/rewardedsoups) instead averages each
factor separately and multiplies the averages:

    factors:  W(lambda) = W_0 + s (sum_i lambda_i B_i)(sum_j lambda_j A_j)  = W_0 + s sum_ij lambda_i lambda_j B_i A_j

which adds the cross terms B_i A_j (i != j) and shrinks the own terms by lambda_i^2. Both agree at the vertices;
between them they differ unless all experts share A (A_i = A_0, as when only B moves). Both are built here and
compared in lecture 04.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .models import DEFAULT_MODEL
from .utils import PresetMixin


# ---------------------------------------------------------------- the simplex and weight arithmetic
# (graded in exercise 04)

def check_simplex(weights, n: int, name: str = "weights") -> list[float]:
    """``weights`` as a list of n floats >= 0 summing to 1 (to 1e-6), or a clear error."""
    w = [float(x) for x in (weights.tolist() if torch.is_tensor(weights) else weights)]
    if len(w) != n:
        raise ValueError(f"{name} has {len(w)} entries for {n} experts; give one weight per expert.")
    if any(not math.isfinite(x) or x < 0 for x in w) or abs(sum(w) - 1) > 1e-6:
        raise ValueError(f"{name} {w} is not on the simplex: each weight must be >= 0 and they must sum to 1.")
    return w


def check_experts(state_dicts: Sequence[dict], what: str = "expert", hint: str = "experts must share one "
                  "architecture (and, for LoRA, one adapter configuration).") -> list:
    """Check every expert before any arithmetic: expert i has expert 0's keys and shapes, and only finite values (a
    NaN expert would put NaN into every soup). Returns the keys; errors name the expert and the parameter."""
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:3]
            raise ValueError(f"{what} {i} has different parameters from {what} 0 (e.g. {diff}); {hint}")
        for k in keys:
            t = sd[k]
            if t.shape != state_dicts[0][k].shape:
                raise ValueError(f"{what} {i}'s {k} has shape {tuple(t.shape)}, {what} 0's "
                                 f"{tuple(state_dicts[0][k].shape)}; {hint}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{what} {i}'s {k} holds non-finite values (NaN or inf): that {what} diverged or "
                                 "its file is damaged; retrain it or load an earlier checkpoint.")
    return keys


def interpolate(state_dicts: Sequence[dict], weights) -> dict:
    """theta(lambda) = sum_i lambda_i theta_i, key by key: full weights (or any matching state dicts).

    state_dicts: N dicts name -> tensor with the same keys and shapes, finite values; weights: N numbers on the
    simplex.
    """
    if not state_dicts:
        raise ValueError("state_dicts is empty: pass one state dict per expert.")
    w = check_simplex(weights, len(state_dicts))
    keys = check_experts(state_dicts)
    return {k: sum(wi * sd[k] for wi, sd in zip(w, state_dicts)) for k in keys}


def lora_modules(adapter: dict) -> list[str]:
    """The module names of a LoRA state dict: ``<m>.lora_A.weight`` / ``<m>.lora_B.weight`` pairs -> ``<m>``."""
    names = sorted(k[:-len(".lora_A.weight")] for k in adapter if k.endswith(".lora_A.weight"))
    missing = [m for m in names if f"{m}.lora_B.weight" not in adapter]
    if not names or missing:
        raise ValueError("not a LoRA state dict: expected '<module>.lora_A.weight' and '<module>.lora_B.weight' "
                         f"pairs{f' (no lora_B for {missing[:2]})' if missing else ''}.")
    return names


def check_scaling(scaling, n: int) -> float:
    """The one LoRA scaling s = lora_alpha / r of N experts: a finite number, or one per expert, all equal (experts
    with different lora_alpha or r are not one adapter configuration, and one s for all would mix them silently)."""
    values = [float(x) for x in scaling] if isinstance(scaling, (list, tuple)) else [float(scaling)] * n
    if len(values) != n:
        raise ValueError(f"scaling has {len(values)} entries for {n} experts; give one scaling, or one per expert.")
    if not all(math.isfinite(x) for x in values):
        raise ValueError(f"scaling must be finite (lora_alpha / r), got {values}.")
    if len(set(values)) > 1:
        raise ValueError(f"the experts' LoRA scalings lora_alpha / r differ ({values}): their adapters were trained "
                         "with different lora_alpha or r. Soup experts of one LoRA configuration (the same r, "
                         "lora_alpha and target modules).")
    return values[0]


def lora_soup(adapters: Sequence[dict], weights, mode: str = "product", scaling: float | Sequence[float] = 1.0) -> dict:
    """The weight change Delta W of each LoRA module for the soup lambda: ``{module: (out, in) tensor}``.

    adapters: N LoRA state dicts (``<m>.lora_A.weight`` (r, in), ``<m>.lora_B.weight`` (out, r)) from one
    initialisation, finite, with the same modules and ranks; scaling: s = lora_alpha / r, one number or one per
    expert (then they must agree).
    mode ``"product"``: s sum_i lambda_i B_i A_i (the soup of the full weights);
    mode ``"factors"``: s (sum_i lambda_i B_i)(sum_i lambda_i A_i) (A and B averaged separately, as the
    reference code does).
    """
    if mode not in ("product", "factors"):
        raise ValueError(f"mode must be 'product' or 'factors', got {mode!r}.")
    if not adapters:
        raise ValueError("adapters is empty: pass one LoRA state dict per expert.")
    modules = lora_modules(adapters[0])
    for i, ad in enumerate(adapters[1:], 1):
        if lora_modules(ad) != modules:
            raise ValueError(f"adapter {i} adapts different modules from adapter 0; experts must share one LoRA "
                             "configuration (target modules and rank).")
    w = check_simplex(weights, len(adapters))
    scaling = check_scaling(scaling, len(adapters))
    check_experts(adapters, "adapter", "experts must share one LoRA configuration: different ranks give factors of "
                                       "different shapes.")
    out = {}
    for m in modules:
        A = [ad[f"{m}.lora_A.weight"] for ad in adapters]            # N x (r, in)
        B = [ad[f"{m}.lora_B.weight"] for ad in adapters]            # N x (out, r)
        if mode == "product":
            out[m] = scaling * sum(wi * (b @ a) for wi, a, b in zip(w, A, B))
        else:
            out[m] = scaling * (sum(wi * b for wi, b in zip(w, B)) @ sum(wi * a for wi, a in zip(w, A)))
    return out


# ---------------------------------------------------------------- Pareto fronts (graded in exercise 04)

def pareto_mask(points) -> torch.Tensor:
    """Which points no other point dominates (all rewards maximised): points (P, N) -> bool (P,).

    q dominates p if q >= p in every reward and q > p in at least one. Identical points do not dominate each
    other, so duplicates of a front point are all kept and duplicates of a dominated point all removed.
    """
    p = torch.as_tensor(points, dtype=torch.float64)
    if p.dim() != 2 or p.shape[0] == 0:
        raise ValueError(f"points must be (P, N) with P >= 1, got shape {tuple(p.shape)}.")
    ge = (p[:, None, :] >= p[None, :, :]).all(-1)                  # (P, P): q=row >= p=col everywhere
    gt = (p[:, None, :] > p[None, :, :]).any(-1)                   # (P, P): q > p somewhere
    return ~(ge & gt).any(0)


def hypervolume(points, reference) -> float:
    """The volume dominated by ``points`` (P, N) and bounded below by ``reference`` (N,), rewards maximised.

    Points that do not exceed the reference in every reward add nothing. Exact for any N by slicing along the
    last reward (N = 2: a sum of rectangles; N = 3: a sum of 2-D areas times slab heights).
    """
    p = torch.as_tensor(points, dtype=torch.float64)
    ref = torch.as_tensor(reference, dtype=torch.float64)
    if p.dim() != 2 or ref.shape != (p.shape[1],):
        raise ValueError(f"points must be (P, N) and reference (N,), got {tuple(p.shape)} and {tuple(ref.shape)}.")
    p = p[(p > ref).all(-1)]
    if p.shape[0] == 0:
        return 0.0
    p = p[pareto_mask(p)]
    if p.shape[1] == 1:
        return float(p.max() - ref[0])
    order = p[:, -1].argsort(descending=True)                      # slabs from the highest last reward down
    p = p[order]
    volume = 0.0
    for i in range(p.shape[0]):
        low = p[i + 1, -1] if i + 1 < p.shape[0] else ref[-1]
        height = float(p[i, -1] - low)
        if height > 0:                                             # points at or above this slab's top cover it
            volume += height * hypervolume(p[:i + 1, :-1], ref[:-1])
    return volume


def simplex_grid(n: int, steps: int) -> list[tuple[float, ...]]:
    """Every lambda on the N-simplex with coordinates in multiples of 1/steps (N=2, steps=10: 11 points)."""
    if n < 1 or steps < 1:
        raise ValueError(f"need n >= 1 and steps >= 1, got {n}, {steps}.")
    grid = [c for c in itertools.product(range(steps + 1), repeat=n) if sum(c) == steps]
    return [tuple(x / steps for x in c) for c in sorted(grid, reverse=True)]


# ---------------------------------------------------------------- the two hypotheses and the selection phase

def lmc_gaps(soup_rewards, expert_rewards, lambdas) -> torch.Tensor:
    """Hypothesis 1 for N = 2: R_k(theta(lambda)) - [(1 - lambda) R_k(theta_1) + lambda R_k(theta_2)].

    soup_rewards (L, K): reward k of the soup at lambdas[l] (lambda = weight of expert 2); expert_rewards (2, K).
    Returns (L, K); >= 0 where the hypothesis holds (the soup beats the straight line between the experts).
    """
    soup = torch.as_tensor(soup_rewards, dtype=torch.float64)
    ends = torch.as_tensor(expert_rewards, dtype=torch.float64)
    lam = torch.as_tensor(lambdas, dtype=torch.float64)[:, None]
    if ends.shape != (2, soup.shape[1]) or lam.shape[0] != soup.shape[0]:
        raise ValueError(f"soup_rewards (L, K) {tuple(soup.shape)}, expert_rewards (2, K) {tuple(ends.shape)} and "
                         f"{lam.shape[0]} lambdas do not match.")
    return soup - ((1 - lam) * ends[0] + lam * ends[1])


def select(user_weights, validation_rewards) -> int:
    """The selection phase: the index of the candidate maximising sum_k mu_k R_k on validation prompts.

    user_weights mu (K,) on the simplex; validation_rewards (C, K): each candidate's mean rewards. Ties go to
    the first candidate.
    """
    r = torch.as_tensor(validation_rewards, dtype=torch.float64)
    if r.dim() != 2 or r.shape[0] == 0:
        raise ValueError(f"validation_rewards must be (candidates, rewards), got {tuple(r.shape)}.")
    mu = torch.tensor(check_simplex(user_weights, r.shape[1], "user_weights"), dtype=torch.float64)
    return int((r @ mu).argmax())


# ---------------------------------------------------------------- LoRA experts on a real model

def adapter_state(model) -> tuple[dict, float]:
    """A LoRA model's adapter as a plain state dict (``<module>.lora_A.weight`` ...) and its scaling s."""
    from peft import get_peft_model_state_dict

    config = model.peft_config[model.active_adapter]
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return state, config.lora_alpha / config.r


def base_weight_name(module: str) -> str:
    """The plain model's weight of a LoRA module: ``base_model.model.X`` -> ``X.weight``."""
    prefix = "base_model.model."
    return (module[len(prefix):] if module.startswith(prefix) else module) + ".weight"


class SoupModel:
    """A plain copy of the base model whose adapted weights are set to W_0 + Delta W for any soup.

    ``set(delta)`` writes W_0 + Delta W for every module of ``delta`` (``lora_soup``'s output) and W_0 elsewhere;
    the initial weights are kept, so soups are set one after another without reloading. ``initial`` is a second
    plain copy that stays at W_0, for KL and perplexity to the initial model.
    """

    def __init__(self, model_name: str, device=None):
        from .models import load_model

        self.model, self.tokenizer = load_model(model_name, device=device)
        self.initial, _ = load_model(model_name, device=device)
        self.params = dict(self.model.named_parameters())
        self.w0: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def set(self, delta: dict) -> None:
        """Write W_0 + Delta W for every module of ``delta`` and W_0 elsewhere. All or nothing: every module is
        checked and its new weight computed before the first write, so a bad module leaves the model as it was."""
        new = {}
        for module, d in delta.items():
            name = base_weight_name(module)
            if name not in self.params:
                raise ValueError(f"the adapter's module {module} has no weight {name} in the base model; the "
                                 "experts were trained from a different base model.")
            w0 = self.w0.get(name, self.params[name])               # W_0: saved where a soup wrote, else in place
            if d.shape != w0.shape:
                raise ValueError(f"Delta W of {module} has shape {tuple(d.shape)}, the base weight "
                                 f"{tuple(w0.shape)}; the experts come from a different base model.")
            new[name] = w0 + d.to(w0)
            if not torch.isfinite(new[name]).all():
                raise ValueError(f"Delta W of {module} makes the weight {name} non-finite; the soup was not set. "
                                 "Check the experts (lora_soup refuses non-finite adapters) and the scaling.")
        self._write(new)

    @torch.no_grad()
    def set_full(self, state: dict) -> None:
        """Write full weights (``interpolate`` of fully fine-tuned experts' state dicts) into the model, W_0
        elsewhere; all or nothing, as ``set``."""
        missing = sorted(set(state) - set(self.params))
        if missing:
            raise ValueError(f"the soup has weights the base model lacks (e.g. {missing[:2]}); the experts were "
                             "fine-tuned from a different base model.")
        for name, value in state.items():
            if value.shape != self.params[name].shape:
                raise ValueError(f"the soup's {name} has shape {tuple(value.shape)}, the model's "
                                 f"{tuple(self.params[name].shape)}.")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"the soup's {name} holds non-finite values; the soup was not set. Check the "
                                 "experts' weights (interpolate refuses non-finite experts).")
        self._write(state)

    def _write(self, new: dict) -> None:
        """Copy ``new`` {weight name: value}, checked and computed in full, into the model; W_0 back wherever the
        last soup wrote and ``new`` does not."""
        for name in list(self.w0):
            if name not in new:
                self.params[name].copy_(self.w0.pop(name))
        for name, value in new.items():
            if name not in self.w0:
                self.w0[name] = self.params[name].detach().clone()
            self.params[name].copy_(value)

    @torch.no_grad()
    def evaluate(self, prompts: list[str], rewards: dict, max_new_tokens: int, temperature: float, samples: int,
                 chat: bool = True, seed: int = 1234) -> dict:
        """Sample ``samples`` answers per prompt from the current soup (the same seed for every soup, so soups
        are compared on common random numbers) and score them with every reward, batched.

        Returns ``rewards`` {name: per-answer list (P * samples,)}, ``kl`` and ``ppl`` (to the initial model, mean
        over answers), ``distinct2`` and a few ``examples``.
        """
        from .generation import generate
        from .logprobs import divergence_from_reference
        from .raft import distinct_n
        from .rewards import score

        roll = generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        num_return_sequences=samples, chat=chat, seed=seed)
        scored = {name: score(fn, roll.prompts, roll.responses).tolist() for name, fn in rewards.items()}
        div = divergence_from_reference(self.model, roll.input_ids, roll.attention_mask, roll.response_mask,
                                        ref_model=self.initial)
        return {"rewards": scored, "kl": div["kl"].mean().item(), "ppl": div["ref_nll"].mean().exp().item(),
                "distinct2": distinct_n(roll.responses, 2), "examples": roll.responses[:3]}


# ---------------------------------------------------------------- rewards, configuration, the three phases

def make_reward(name: str) -> Callable:
    """The soups' rewards by name: ``positive`` (VADER compound), ``neutral`` (VADER's neutral share: a
    matter-of-fact tone), ``concise`` (about six words: 0 at six, -1 at none or twelve), or ``rm:<model>``."""
    from .reward_model import build_reward
    from .rewards import LengthReward, SentimentReward

    named = {"positive": lambda: SentimentReward("positive"), "neutral": lambda: SentimentReward("neutral"),
             "concise": lambda: LengthReward(target=6)}
    if name in named:
        return named[name]()
    if name.startswith("rm:"):
        return build_reward(name)
    raise ValueError(f"unknown reward {name!r}; use one of {sorted(named)} or 'rm:<model>'.")


class Standardized:
    """(R(x, y) - m) / s: a reward in units of its spread on the initial model's answers, so that MORL's and the
    users' weights mean the same for rewards of different scales."""

    def __init__(self, reward: Callable, mean: float, std: float):
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be finite and > 0, got {std}; the initial answers' rewards do not vary.")
        self.reward, self.mean, self.std = reward, mean, std

    def __call__(self, prompts, responses) -> torch.Tensor:
        return (self.reward(prompts, responses) - self.mean) / self.std


@dataclass
class SoupsConfig(PresetMixin):
    """Rewarded soups against MORL. Presets: ``SoupsConfig.preset("cpu" | "lab-gpu")``."""

    model: str = DEFAULT_MODEL
    """The shared initialisation of every expert (a LoRA adapter on it is trained per reward)."""
    prompts: str = "course:movie_openings"
    """Training prompts (train split) and held-out prompts (test split: validation half, then test half)."""
    rewards: tuple = ("positive", "neutral", "concise")
    """N = 3 rewards (``make_reward`` names, or reward functions); the first two make the N = 2 front."""
    trainer: str = "ppo"
    """The fine-tuner of every expert and MORL run: ``ppo`` (lecture 01), ``raft`` or ``rrhf``."""
    trainer_preset: str = "cpu"
    """The fine-tuner's preset; its KL penalty keeps every expert in a KL budget (PPO)."""
    steps: int | None = None
    """Override the fine-tuner's steps (RAFT: stages)."""
    lambdas: int = 11
    """Soups on the N = 2 segment: lambda = 0, 1/(L-1), ..., 1."""
    simplex_steps: int = 4
    """The N = 3 simplex grid: coordinates in multiples of 1/simplex_steps (4: 15 soups)."""
    morl_mus: tuple = (0.25, 0.5, 0.75)
    """MORL's interior weightings of R_2 for N = 2 (mu = 0 and 1 are the experts themselves)."""
    morl_simplex: tuple = ((1 / 3, 1 / 3, 1 / 3),)
    """MORL's interior weightings for N = 3, beside its N = 2 runs and the experts."""
    eval_prompts: int = 40
    """Held-out prompts: the first half selects (validation), the second half reports (test)."""
    samples: int = 2
    """Answers per held-out prompt."""
    max_new_tokens: int = 16
    """Answer length of the evaluation (and of training, through the fine-tuner's config)."""
    temperature: float = 0.7
    """Sampling temperature of the evaluation and of training."""
    users: tuple = (("enthusiast", (0.8, 0.2)), ("matter-of-fact", (0.2, 0.8)))
    """Users of the selection phase: a name and weights on the first two (standardised) rewards."""
    seed: int = 0
    """One seed for the shared initialisation and every training, so runs differ only by their reward."""

    PRESETS = {
        "cpu": {},
        "lab-gpu": dict(model="qwen2.5-0.5b-instruct", prompts="hub:Anthropic/hh-rlhf", trainer_preset="lab-gpu",
                        rewards=("rm:OpenAssistant/reward-model-deberta-v3-large-v2",
                                 "rm:OpenAssistant/reward-model-deberta-v3-base", "positive"),
                        simplex_steps=10, morl_mus=tuple(i / 10 for i in range(1, 10)), eval_prompts=400,
                        samples=1, max_new_tokens=128, temperature=1.0),
    }

    def __post_init__(self):
        if len(self.rewards) < 2:
            raise ValueError(f"rewards needs at least 2 names (N = 2), got {self.rewards!r}.")
        if self.trainer not in ("ppo", "raft", "rrhf"):
            raise ValueError(f"trainer must be 'ppo', 'raft' or 'rrhf', got {self.trainer!r}.")
        if self.lambdas < 2 or self.eval_prompts < 2 or self.eval_prompts % 2 or self.samples < 1:
            raise ValueError("need lambdas >= 2, an even eval_prompts >= 2 (validation and test halves) and "
                             "samples >= 1.")
        for mu in self.morl_mus:
            if not 0 < mu < 1:
                raise ValueError(f"morl_mus must lie strictly between 0 and 1 (the ends are the experts), got {mu}.")
        for w in self.morl_simplex:
            check_simplex(w, 3, "morl_simplex")


def train_policy(config: SoupsConfig, reward: Callable, prompts: list[str], progress: bool = False) -> dict:
    """One fine-tuning from the shared initialisation (the same seed and adapter initialisation for every run):
    returns the adapter, its scaling, the history and the wall time."""
    import time

    from .models import load_model
    from .training.registry import make_trainer
    from .utils import seed_everything

    seed_everything(config.seed)                       # the shared initialisation: the same LoRA A_0 every time
    model, tokenizer = load_model(config.model, lora=True)
    whiten = {"whiten_rewards": True} if config.trainer == "ppo" else {}   # rewards of any scale learn alike
    start = time.perf_counter()
    trainer = make_trainer(config.trainer, model, tokenizer, reward, prompts, config.trainer_preset, config.steps,
                           seed=config.seed, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                           **whiten)
    history = trainer.train(progress=progress)
    seconds = time.perf_counter() - start
    adapter, scaling = adapter_state(model)
    keep = ("reward/mean", "kl/ref", "ppl/ref")
    return {"adapter": adapter, "scaling": scaling, "seconds": seconds,
            "history": [{k: h[k] for k in keep if k in h} for h in history]}


def _key(weights) -> str:
    return ",".join(f"{w:.4f}" for w in weights)


POINT_KINDS = ("initial", "expert", "rs", "rs-factors", "rs3", "morl", "morl3")


@dataclass(frozen=True)
class Point:
    """One policy of ``run``'s result, named in ``points`` and ``trainings`` by its ``label``, ``kind:key``.

    ``kind``: ``initial`` (the model before training, no key), ``expert`` (key: its reward's name), ``rs`` (a
    product soup of the first two experts), ``rs-factors`` (the factors soup of the same weights), ``rs3`` (a soup
    of three experts), ``morl`` (a policy trained on the weighted sum of the first two rewards) or ``morl3`` (of
    three). ``key`` (but an expert's): the weights as ``_key`` writes them, e.g. ``0.7500,0.2500``; a ``morl``
    evaluation lists the first two, its training every reward's. The JSON stores the labels; ``parse`` reads one.
    """

    kind: str
    key: str = ""

    def __post_init__(self):
        if self.kind not in POINT_KINDS:
            raise ValueError(f"unknown kind of point {self.kind!r}; the soups' points are {POINT_KINDS}.")
        if (self.kind == "initial") == bool(self.key):
            raise ValueError(f"a point of kind {self.kind!r} " + ("has no key" if self.key else "needs a key after ':'")
                             + f", got {self.label!r}.")

    @classmethod
    def parse(cls, label: str) -> Point:
        """The point a stored label names: ``Point.parse("rs:0.7500,0.2500") == Point("rs", "0.7500,0.2500")``."""
        kind, _, key = label.partition(":")
        return cls(kind, key)

    @classmethod
    def of(cls, kind: str, weights) -> Point:
        """The point of ``kind`` with these weights."""
        return cls(kind, _key(weights))

    @property
    def label(self) -> str:
        """The name ``run`` stores it under; ``Point.parse(p.label) == p``."""
        return f"{self.kind}:{self.key}" if self.key else self.kind


def _of_kind(labels, *kinds: str) -> list[str]:
    """The labels, in their order, of the points of one of ``kinds``."""
    return [x for x in labels if Point.parse(x).kind in kinds]


def _on_grid(result: dict, lam: float) -> bool:
    """Whether the weight ``lam`` lies on the N = 3 simplex grid of ``result``'s config (``simplex_steps``)."""
    steps = result["config"]["simplex_steps"]
    return abs(lam * steps - round(lam * steps)) < 1e-9


def run(config: SoupsConfig | None = None, out=None, progress: bool = True, stop=None) -> dict:
    """Train N experts and MORL's weightings, evaluate soups and MORL policies, and compare (JSON-ready dict).

    Every policy is evaluated on the same held-out prompts with the same sampling seed. ``points`` maps a name
    (``rs:<lambda>`` for a product soup, ``rs-factors:<lambda>``, ``morl:<mu>``, ``initial``: a ``Point``'s label) to
    its evaluation; ``trainings`` holds the wall time and history of each fine-tuning.

    With ``out`` (a run directory ``prepare_output`` has checked), every training and every evaluation is a stage
    of a ``StageStore`` in ``out/stages/``: a training's folder holds its adapter (``adapter.safetensors``), its
    history and seconds. A stage that finished before is read back instead of being computed again (the adapter
    bit-exact, the RNG states as they were at its end), so an interrupted run resumes after its last finished
    stage and ends with the result of the uninterrupted run. ``stop`` (``graceful_stop()``): a SIGINT/SIGTERM
    during a stage raises ``StopRun`` once that stage is stored.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from .training.checkpoint import StageStore
    from .data import load_task_prompts
    from .rewards import WeightedSum

    config = config or SoupsConfig()
    names = [r if isinstance(r, str) else getattr(r, "__name__", f"reward{i}") for i, r in enumerate(config.rewards)]
    rewards = {n: make_reward(r) if isinstance(r, str) else r for n, r in zip(names, config.rewards)}
    train_prompts = load_task_prompts(config.prompts, "train")
    held = load_task_prompts(config.prompts, "test", n=config.eval_prompts)
    if len(held) < config.eval_prompts:
        raise ValueError(f"{config.prompts} has {len(held)} test prompts; eval_prompts={config.eval_prompts}.")
    soup = SoupModel(config.model)
    ev = dict(prompts=held, rewards=rewards, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
              samples=config.samples)
    result = {"config": {k: getattr(config, k) if k != "rewards" else names for k in config.__dataclass_fields__},
              "rewards": names,
              "points": {}, "trainings": {}}
    points, trainings = result["points"], result["trainings"]
    store = StageStore(out) if out is not None else None

    def stage(name: str, compute):                                  # computed, or read back from ``out``
        return store.run(name.replace(":", "-"), compute, stop) if store is not None else compute()

    points["initial"] = stage("eval-initial", lambda: soup.evaluate(**ev))
    half = config.eval_prompts // 2 * config.samples                 # answers of the validation half
    norms = {n: (torch.tensor(points["initial"]["rewards"][n][:half]).mean().item(),
                 torch.tensor(points["initial"]["rewards"][n][:half]).std().item()) for n in names}
    result["norms"] = norms
    flat = [n for n, (_, std) in norms.items() if not std > 0]
    if flat:
        raise ValueError(f"the initial model's validation answers all get the same {flat} reward, so it cannot be "
                         "standardised or traded off; choose rewards that vary on this model's answers.")

    def train(label: str, weights: Sequence[float]) -> dict:
        name = label.replace(":", "-")
        if store is not None and store.done(name):                    # trained before: its stored adapter
            done = store.load(name)
            device = str(next(soup.model.parameters()).device)        # where the trained adapter lived
            done["adapter"] = load_file(str(store.path(name) / "adapter.safetensors"), device=device)
        else:
            if 1.0 in weights:                                        # an expert: its own reward
                reward = rewards[names[weights.index(1.0)]]
            else:                                                     # MORL: the weighted sum, standardised
                used = [(n, w) for n, w in zip(names, weights) if w > 0]
                reward = WeightedSum({n: Standardized(rewards[n], *norms[n]) for n, _ in used},
                                     [w for _, w in used])
            done = train_policy(config, reward, train_prompts, progress=progress)
            if store is not None:
                kept = {k: done[k] for k in ("scaling", "seconds", "history")}
                with store.stage(name, result_of=lambda: kept, stop=stop) as folder:
                    save_file({k: v.contiguous() for k, v in done["adapter"].items()},
                              str(folder / "adapter.safetensors"))
        trainings[label] = {"weights": list(weights), "seconds": done["seconds"], "history": done["history"]}
        return done

    def evaluate(label: str, adapters: list, weights, mode: str = "product") -> None:
        def compute():
            soup.set(lora_soup([a["adapter"] for a in adapters], weights, mode,
                               [a["scaling"] for a in adapters]))     # one per expert: they must agree
            return {"weights": list(weights), "mode": mode, **soup.evaluate(**ev)}
        points[label] = stage(f"eval-{label}", compute)

    n3 = len(names) >= 3
    vertices = [tuple(1.0 if j == i else 0.0 for j in range(len(names))) for i in range(len(names))]
    experts = [train(Point("expert", names[i]).label, v) for i, v in enumerate(vertices if n3 else vertices[:2])]
    grid2 = [i / (config.lambdas - 1) for i in range(config.lambdas)]
    bar = tqdm(grid2, desc="soups N=2", disable=not progress)
    for lam in bar:                                                   # lambda: the weight of expert 2
        evaluate(Point.of("rs", [1 - lam, lam]).label, experts[:2], [1 - lam, lam])
        if 0 < lam < 1:
            evaluate(Point.of("rs-factors", [1 - lam, lam]).label, experts[:2], [1 - lam, lam], "factors")
    for mu in tqdm(config.morl_mus, desc="MORL N=2", disable=not progress):
        w = [1 - mu, mu] + [0.0] * (len(names) - 2)
        evaluate(Point.of("morl", w[:2]).label, [train(Point.of("morl", w).label, w)], [1.0])
    if n3:
        for lam in tqdm(simplex_grid(3, config.simplex_steps), desc="soups N=3", disable=not progress):
            if Point.of("rs", lam[:2]).label in points and lam[2] == 0:
                continue                                              # already evaluated on the N = 2 segment
            evaluate(Point.of("rs3", lam).label, experts, lam)
        for w in config.morl_simplex:
            evaluate(Point.of("morl3", w).label, [train(Point.of("morl3", w).label, list(w))], [1.0])
    result["summary"] = summarize(result)
    return result


MARGIN = 0.1   # the hypervolume's reference point lies this fraction of each reward's range below the worst policy


def summarize(result: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """Fronts, hypervolumes (with bootstrap intervals over test prompts), the LMC check, the LoRA modes compared
    and the selection phase, from ``run``'s points. Rewards are standardised by the initial model's validation
    answers (``norms``). The hypervolume's reference point, stated in the output, is the componentwise minimum
    over every policy of the comparison (the initial model included) minus ``MARGIN`` times the range: with the
    minimum itself, the policy that is worst on one reward would add no volume however good it is on the other."""
    from .evaluation import bootstrap_mean

    cfg, names, pts = result["config"], result["rewards"], result["points"]
    P, S = cfg["eval_prompts"], cfg["samples"]
    half = P // 2

    def per_prompt(label: str) -> torch.Tensor:          # (P, K) standardised reward of each held-out prompt
        cols = [(torch.tensor(pts[label]["rewards"][n]) - result["norms"][n][0]) / result["norms"][n][1]
                for n in names]
        return torch.stack(cols, -1).view(P, S, len(names)).mean(1).double()

    table = {label: per_prompt(label) for label in pts}
    gen = torch.Generator().manual_seed(seed)
    boots = torch.randint(0, P - half, (n_boot, P - half), generator=gen) + half   # resampled test prompts

    def front_stats(rs: list[str], morl: list[str], k: int) -> dict:
        everyone = torch.stack([table[x][half:, :k].mean(0) for x in set(rs + morl + ["initial"])])
        low, high = everyone.min(0).values, everyone.max(0).values
        ref = low - MARGIN * (high - low)        # below every policy, so that no extreme point counts for nothing
        hv = lambda labels, rows: hypervolume(torch.stack([table[x][rows, :k].mean(0) for x in labels]), ref)  # noqa: E731
        ratios = []
        for b in boots:
            morl_hv = hv(morl, b)
            if morl_hv > 0:
                ratios.append(hv(rs, b) / morl_hv)
        ratios = torch.tensor(ratios or [float("nan")], dtype=torch.float64)
        test = slice(half, P)
        return {"reference": ref.tolist(), "hv_rs": hv(rs, test), "hv_morl": hv(morl, test),
                "ratio": hv(rs, test) / max(hv(morl, test), 1e-12),
                "ratio_interval": torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist(),
                "front_rs": [x for x, m in zip(rs, pareto_mask(torch.stack([table[x][test, :k].mean(0) for x in rs])))
                             if m],
                "trainings_rs": k, "trainings_morl": len(morl)}

    rs2 = sorted(_of_kind(pts, "rs"))
    e1, e2 = Point.of("rs", [1.0, 0.0]).label, Point.of("rs", [0.0, 1.0]).label
    morl2 = [e1, e2] + sorted(_of_kind(pts, "morl"))
    seconds = {label: t["seconds"] for label, t in result["trainings"].items()}
    experts = [Point("expert", n).label for n in names]
    out = {"n2": front_stats(rs2, morl2, 2)}
    out["n2"]["seconds_rs"] = sum(seconds[e] for e in experts[:2])
    out["n2"]["seconds_morl"] = out["n2"]["seconds_rs"] + sum(seconds[k] for k in _of_kind(seconds, "morl"))

    lams = [pts[x]["weights"][1] for x in rs2]
    lmc = {}
    for k, n in enumerate(names[:2]):
        rows = []
        for x, lam in zip(rs2, lams):
            gap = table[x][:, k] - ((1 - lam) * table[e1][:, k] + lam * table[e2][:, k])   # (P,) per prompt
            iv = bootstrap_mean(gap, n_boot=n_boot, seed=seed)
            rows.append({"lambda": lam, "gap": iv.mean, "low": iv.low, "high": iv.high})
        lmc[n] = rows
    out["lmc"] = lmc
    product = {f: Point("rs", Point.parse(f).key).label for f in _of_kind(pts, "rs-factors")}   # same weights
    out["factors_vs_product"] = [
        {"lambda": pts[f]["weights"][1], **{n: bootstrap_mean(table[f][:, k] - table[product[f]][:, k],
                                                             n_boot=n_boot, seed=seed).__dict__
                                             for k, n in enumerate(names[:2])},
         "kl_factors": pts[f]["kl"], "kl_product": pts[product[f]]["kl"]}
        for f in sorted(product)]

    if len(names) >= 3 and _of_kind(pts, "rs3"):
        rs3 = _of_kind(pts, "rs3") + [x for x in rs2 if _on_grid(result, pts[x]["weights"][1])]
        third = Point.of("rs3", [0.0, 0.0, 1.0]).label
        morl3 = [e1, e2, third] + sorted(_of_kind(pts, "morl", "morl3"))
        out["n3"] = front_stats(sorted(set(rs3)), morl3, 3)
        out["n3"]["seconds_rs"] = sum(seconds[e] for e in experts[:3])
        morl_seconds = sum(seconds[k] for k in _of_kind(seconds, "morl", "morl3"))
        out["n3"]["seconds_morl"] = out["n3"]["seconds_rs"] + morl_seconds

    users = {}
    for name, mu in cfg["users"]:
        mu_t = torch.tensor(check_simplex(mu, 2, f"user {name}"), dtype=torch.float64)
        pick = {}
        for method, cands in (("rs", rs2), ("morl", morl2)):
            val = torch.stack([table[x][:half, :2].mean(0) for x in cands])
            chosen = cands[select(mu, val)]
            test_u = table[chosen][half:, :2] @ mu_t                                   # (P/2,) user reward
            best = max(cands, key=lambda x: (table[x][half:, :2] @ mu_t).mean().item())
            pick[method] = {"chosen": chosen, "test": bootstrap_mean(test_u, n_boot=n_boot, seed=seed).__dict__,
                            "oracle": best, "oracle_test": (table[best][half:, :2] @ mu_t).mean().item()}
        users[name] = {"weights": list(mu), **pick}
    out["users"] = users
    out["means"] = {label: {"val": table[label][:half].mean(0).tolist(), "test": table[label][half:].mean(0).tolist(),
                            "raw": [torch.tensor(pts[label]["rewards"][n]).mean().item() for n in names],
                            "kl": pts[label]["kl"], "ppl": pts[label]["ppl"], "distinct2": pts[label]["distinct2"]}
                    for label in pts}
    return out


# ---------------------------------------------------------------- plots and the command line

def plot_front(result: dict, ax=None, split: str = "test"):
    """The N = 2 fronts in standardised rewards: RS (product and factors soups, lambda marked), MORL, the initial
    model. Returns the axes."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 4.5))[1]
    means, names = result["summary"]["means"], result["rewards"]
    pts = result["points"]
    rs = sorted((pts[x]["weights"][1], x) for x in _of_kind(pts, "rs"))
    fac = sorted((pts[x]["weights"][1], x) for x in _of_kind(pts, "rs-factors"))
    xy = lambda label: means[label][split][:2]  # noqa: E731
    ax.plot(*zip(*[xy(x) for _, x in rs]), "o-", color="C0", label="RS, product (N = 2 trainings)")
    for lam, x in rs:
        ax.annotate(f"{lam:.1f}", xy(x), textcoords="offset points", xytext=(4, 4), fontsize=7, color="C0")
    if fac:
        ends = [rs[0][1]] + [x for _, x in fac] + [rs[-1][1]]
        ax.plot(*zip(*[xy(x) for x in ends]), "s--", color="C2", ms=4, label="RS, A and B averaged separately")
    morl = _of_kind(pts, "morl")
    n_morl = len(morl) + 2
    ax.plot(*zip(*[xy(x) for x in [rs[0][1]] + sorted(morl, key=lambda x: pts[x]["weights"][0]) + [rs[-1][1]]]),
            "D", color="C3", ms=7, mfc="none", label=f"MORL (M = {n_morl} trainings)")
    ax.plot(*xy("initial"), "k*", ms=12, label="initial model")
    ax.set_xlabel(f"{names[0]} (standardised, {split} prompts)")
    ax.set_ylabel(f"{names[1]} (standardised, {split} prompts)")
    ax.set_title("Rewarded soups against MORL")
    ax.legend(fontsize=8)
    return ax


def plot_lmc(result: dict, ax=None):
    """Hypothesis 1: the soup's reward minus the straight line between the experts, per lambda, with intervals."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    for i, (name, rows) in enumerate(result["summary"]["lmc"].items()):
        lam = [r["lambda"] for r in rows]
        gap = [r["gap"] for r in rows]
        err = [[r["gap"] - r["low"] for r in rows], [r["high"] - r["gap"] for r in rows]]
        ax.errorbar([x + 0.008 * i for x in lam], gap, yerr=err, fmt="o-", capsize=3, label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("lambda (weight of expert 2)")
    ax.set_ylabel("R(soup) - interpolated R (std units)")
    ax.set_title("LMC check: above 0, the soup beats the line between the experts")
    ax.legend(fontsize=8)
    return ax


def plot_simplex(result: dict, reward: int = 0, ax=None):
    """N = 3: one standardised reward (test prompts) of every soup on the simplex, as a ternary scatter."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(5, 4.3))[1]
    means, names, pts = result["summary"]["means"], result["rewards"], result["points"]
    labels = _of_kind(pts, "rs3", "rs")
    w = [pts[x]["weights"] + [0.0] * (3 - len(pts[x]["weights"])) for x in labels]
    keep = [i for i, x in enumerate(labels) if Point.parse(x).kind == "rs3" or _on_grid(result, w[i][1])]
    corners = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 3 ** 0.5 / 2]])
    xy = torch.tensor([w[i] for i in keep]) @ corners
    val = [means[labels[i]]["test"][reward] for i in keep]
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=val, s=260, cmap="viridis")
    for (x, y), v in zip(xy.tolist(), val):
        ax.annotate(f"{v:+.2f}", (x, y), ha="center", va="center", fontsize=6, color="w")
    for (x, y), n in zip(corners.tolist(), names):
        ax.annotate(f"expert: {n}", (x, y), textcoords="offset points", xytext=(0, -14 if y == 0 else 10),
                    ha="center", fontsize=8)
    ax.figure.colorbar(sc, ax=ax, label=f"{names[reward]} (standardised)")
    ax.set_xlim(-0.2, 1.2)
    ax.set_ylim(-0.12, 0.98)
    ax.set_axis_off()
    ax.set_title(f"N = 3 soups on the simplex: {names[reward]}")
    return ax
