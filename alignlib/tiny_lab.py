"""Small, exact experiments on the tiny random model: the graded experiments of the exercises.

Each exercise ends with a choice a practitioner makes by experiment (a temperature, a KL coefficient, a length
penalty, a best-of-k budget). The measurements live here so that a student's search and the grader see the
same numbers: every function is deterministic (fixed prompts, fixed weights, fixed sampling seeds) and takes
well under a second on a CPU. The model is ``tiny-random`` (2 layers, 64 wide, byte-level tokens): its text is
gibberish, but its distributions are peaked like a language model's, so the trade-offs have the same shape.

- ``mean_entropy(T)``: mean entropy (nats) of the next-token distribution softmax(z / T) over ``PROMPTS``.
- ``tilted_optimum(beta)``: the KL-regularised optimum pi*(a) = rho(a) exp(R(a) / beta) / Z over the next
  token, with R(a) = 1 for a vowel and 0 otherwise; its exact KL(pi* || rho) and expected reward.
- ``length_correlation(alpha)``: RRHF's score p_i = log pi(y_i | x) / |y_i|^alpha of candidates of 4-32
  tokens; its Pearson correlation with the length |y_i|.
- ``best_of_k(k, T)``: RAFT's selection step: k samples per prompt at temperature T, the best kept by the
  vowel reward; the kept samples' mean reward and their fluency (mean log-prob per token at T = 1).
- ``soup_utility(lam, mu, shared_hessian)``: rewarded soups' Lemma 1 in closed form (no model): two quadratic
  rewards around two experts, the soup (1 - lam) theta_1 + lam theta_2, and a user's utility
  (1 - mu) R_1 + mu R_2 of it.
"""
from __future__ import annotations

import functools
import math

import torch

PROMPTS = ["The film was", "I think that", "Once upon a time", "The answer is", "My favourite meal",
           "In the morning", "She said that", "We went to the"]
VOWELS = "aeiouAEIOU"
LENGTHS = (4, 8, 16, 32)     # candidate lengths of length_correlation
SAMPLE_SEED = 2024
RAFT_TOKENS = 12             # new tokens per sample in best_of_k


@functools.lru_cache(maxsize=1)
def model_and_tokenizer():
    """The tiny random model (weights seed 0) in eval mode, loaded once per process."""
    from .models import load_model

    model, tok = load_model("tiny-random")
    return model.eval(), tok


@functools.lru_cache(maxsize=1)
def next_token_logits() -> torch.Tensor:
    """(P, V) logits of the token after each of ``PROMPTS`` (raw text, no chat template)."""
    model, tok = model_and_tokenizer()
    with torch.no_grad():
        rows = [model(**tok(p, return_tensors="pt")).logits[0, -1] for p in PROMPTS]
    return torch.stack(rows).float()


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def mean_entropy(temperature: float) -> float:
    """Mean over ``PROMPTS`` of H(softmax(z / T)) in nats."""
    t = _check_positive("temperature", temperature)
    logp = torch.log_softmax(next_token_logits() / t, dim=-1)          # (P, V)
    return float(-(logp.exp() * logp).sum(-1).mean())


@functools.lru_cache(maxsize=1)
def vowel_reward() -> torch.Tensor:
    """(V,) reward of each token: 1.0 if it decodes to a single vowel letter, else 0.0."""
    _, tok = model_and_tokenizer()
    return torch.tensor([1.0 if tok.decode([i]) in VOWELS and tok.decode([i]) else 0.0 for i in range(len(tok))])


def tilted_optimum(beta: float) -> dict:
    """The optimum of E_pi[R] - beta KL(pi || rho) over next-token distributions, rho the tiny model.

    pi*(a | x) = rho(a | x) exp(R(a) / beta) / Z(x). Returns the means over ``PROMPTS`` of ``kl`` (KL(pi* || rho),
    nats), ``reward`` (E_pi*[R]) and ``reference_reward`` (E_rho[R]).
    """
    b = _check_positive("beta", beta)
    ref = torch.log_softmax(next_token_logits().double(), dim=-1)       # (P, V) log rho
    r = vowel_reward().double()                                         # (V,)
    opt = torch.log_softmax(ref + r / b, dim=-1)                        # (P, V) log pi*
    p = opt.exp()
    return {"kl": float((p * (opt - ref)).sum(-1).mean()), "reward": float((p * r).sum(-1).mean()),
            "reference_reward": float((ref.exp() * r).sum(-1).mean())}


def _response_logprobs(model, roll) -> torch.Tensor:
    """(B, T) log-probs of the response tokens, 0 elsewhere (no graded function is used: see ``checks``)."""
    from .logprobs import token_logprobs

    with torch.no_grad():
        lp = token_logprobs(model, roll.input_ids, roll.attention_mask)
    return lp * roll.response_mask


@functools.lru_cache(maxsize=1)
def candidate_scores() -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) sequence log-probs log pi(y | x) and (N,) lengths of sampled candidates, 2 per prompt and length."""
    from .generation import generate

    model, tok = model_and_tokenizer()
    logps, lengths = [], []
    for i, n in enumerate(LENGTHS):
        roll = generate(model, tok, PROMPTS, max_new_tokens=n, chat=False,
                        seed=SAMPLE_SEED + i, num_return_sequences=2)
        logps.append(_response_logprobs(model, roll).sum(-1))
        lengths.append(roll.response_mask.sum(-1).float())
    return torch.cat(logps).double(), torch.cat(lengths).double()


def length_correlation(alpha: float) -> float:
    """Pearson correlation over the candidates of p_i = log pi(y_i | x) / |y_i|^alpha with |y_i|."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    logp, length = candidate_scores()
    p = logp / length ** alpha
    return float(torch.corrcoef(torch.stack([p, length]))[0, 1])


def best_of_k(k: int, temperature: float) -> dict:
    """RAFT's ranking step on the tiny model: sample k answers per prompt at ``temperature``, keep the best.

    The reward of a sample is the fraction of its tokens that are vowels (``vowel_reward``). Returns, over the
    kept samples (one per prompt): ``reward`` (mean), ``fluency`` (mean log-prob per token under the model at
    temperature 1: how far the kept text is from what the model would write) and ``distinct2`` (distinct token
    bigrams over all bigrams: tokens, not words as in ``alignlib.raft.distinct_n``, since the tiny model's
    bytes form few words).
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 8:
        raise ValueError(f"k must be an integer from 1 to 8, got {k!r}")
    return dict(_best_of_k(k, _check_positive("temperature", temperature)))   # a copy: the cache stays intact


@functools.lru_cache(maxsize=256)
def _best_of_k(k: int, t: float) -> dict:
    """``best_of_k``'s measurement, once per (k, temperature) in a process: it is deterministic (fixed seeds),
    and a student's search and each regrade ask for the same points again."""
    from .generation import generate

    model, tok = model_and_tokenizer()
    roll = generate(model, tok, PROMPTS, max_new_tokens=RAFT_TOKENS, chat=False, temperature=t,
                    seed=SAMPLE_SEED, num_return_sequences=k)
    mask = roll.response_mask.float()                                                   # (P*k, T)
    n = mask.sum(-1)                                                                    # (P*k,)
    reward = (vowel_reward()[roll.input_ids] * mask).sum(-1) / n                        # (P*k,)
    fluency = _response_logprobs(model, roll).sum(-1) / n                               # (P*k,)
    rows = torch.arange(len(PROMPTS)) * k + reward.view(len(PROMPTS), k).argmax(-1)    # (P,) flat, ties: first
    pairs = [pair for r in rows.tolist() for pair in _token_bigrams(roll.input_ids[r], roll.response_mask[r])]
    return {"reward": float(reward[rows].mean()), "fluency": float(fluency[rows].mean()),
            "distinct2": len(set(pairs)) / max(len(pairs), 1)}


def _token_bigrams(ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, int]]:
    """Consecutive pairs of response tokens of one row (byte tokens: the tiny model's text has few spaces)."""
    tokens = ids[mask.bool()].tolist()
    return list(zip(tokens, tokens[1:]))


# ---------------------------------------------------------------- rewarded soups (exercise 04)

EXPERTS = (torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64))
HESSIANS = {True: (torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)),
            False: (torch.diag(torch.tensor([9.0, 1.0], dtype=torch.float64)), torch.eye(2, dtype=torch.float64))}


def soup_utility(lam: float, mu: float = 0.5, shared_hessian: bool = False) -> float:
    """A user's utility (1 - mu) R_1(theta) + mu R_2(theta) of the soup theta = (1 - lam) theta_1 + lam theta_2.

    R_i(theta) = -(theta - theta_i)^T H_i (theta - theta_i) / 2, with experts theta_1 = (1, 0), theta_2 = (0, 1).
    With ``shared_hessian`` (H_1 = H_2, Lemma 1's assumption) the best soup for the user is lam = mu; without it
    (H_1 = diag(9, 1), H_2 = I) the selection phase has to search for it.
    """
    lam, mu = float(lam), float(mu)
    for name, value in (("lam", lam), ("mu", mu)):
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"{name} must be a number in [0, 1], got {value}.")
    theta = (1 - lam) * EXPERTS[0] + lam * EXPERTS[1]
    h1, h2 = HESSIANS[bool(shared_hessian)]
    r = [-0.5 * (theta - e) @ h @ (theta - e) for e, h in zip(EXPERTS, (h1, h2))]
    return float((1 - mu) * r[0] + mu * r[1])


# ---------------------------------------------------------------- AI feedback from a judge (exercise 05)

JUDGE_PAIRS = 400          # comparisons in the fixed pair set
JUDGE_SIGNAL = 1.5         # s: log-odds per unit of oracle quality difference
JUDGE_BIAS = 1.0           # b: log-odds added to the letter (A), whatever it shows
JUDGE_NOISE = 1.0          # sigma: standard deviation of each reading's noise (independent between orders)
JUDGE_SEED = 5


@functools.lru_cache(maxsize=1)
def judge_readings() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A simulated judge on ``JUDGE_PAIRS`` fixed comparisons: (delta, d_first, d_swapped), each (N,) float64.

    delta_i ~ N(0, 1) is the oracle's quality difference (first response minus second: the first is better iff
    delta_i > 0). Each reading is the judge's log-odds of the letter (A) over (B): with the first response shown as
    (A), d_first = s delta + b + e_1; swapped (the first shown as (B)), d_swapped = -s delta + b + e_2, with
    e ~ N(0, sigma^2).
    The letter bias b and the noise are what a small judge shows (lecture 05 measures the real one); s, b and sigma
    are set here, not measured, so this is a model of a judge, not a judge.
    """
    gen = torch.Generator().manual_seed(JUDGE_SEED)
    delta = torch.randn(JUDGE_PAIRS, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, JUDGE_PAIRS, generator=gen, dtype=torch.float64) * JUDGE_NOISE
    return delta, JUDGE_SIGNAL * delta + JUDGE_BIAS + noise[0], -JUDGE_SIGNAL * delta + JUDGE_BIAS + noise[1]


def judge_labels(both_orders: bool, margin: float) -> dict:
    """AI labels of the simulated judge (``judge_readings``), kept when confident, validated against the oracle.

    The soft label is p = sigmoid(d_first) (one order) or 1/2 [sigmoid(d_first) + sigmoid(-d_swapped)] (both orders,
    Bai et al. 2022's debiasing; ``feedback.soft_labels``). A pair is kept when |p - 1/2| >= ``margin``. Returns
    ``kept`` (fraction of the pairs kept), ``accuracy`` (fraction of the kept pairs whose label, p > 1/2, agrees with
    the oracle; 0.0 if none is kept) and ``mean_p`` (mean label over all pairs: 1/2 for an unbiased judge).
    """
    if not isinstance(both_orders, bool):
        raise ValueError(f"both_orders must be True or False, got {both_orders!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 0.5:
        raise ValueError(f"margin must be a number in [0, 0.5), got {margin!r}")
    delta, first, swapped = judge_readings()
    p = torch.sigmoid(first)
    if both_orders:
        p = 0.5 * (p + torch.sigmoid(-swapped))
    keep = (p - 0.5).abs() >= margin
    right = (p > 0.5) == (delta > 0)
    n = int(keep.sum())
    return {"kept": n / len(p), "accuracy": float(right[keep].double().mean()) if n else 0.0,
            "mean_p": float(p.mean())}


# ---------------------------------------------------------------- the novelty filter of self-instruct (exercise 06)

NOVELTY_SEEDS = ("Write a short poem about the sea.", "Explain how vaccines work.", "Give me a recipe for bread.",
                 "What is the capital of Peru?", "Plan a trip to Rome on a budget.", "Why do cats purr?")
NOVELTY_BASES = ("Describe the water cycle for a child.", "Compare trains and planes for short trips.",
                 "Suggest a name for a bakery.", "List three reasons to learn history.",
                 "Summarise this news story in two lines.", "Translate good morning into French.",
                 "How do I fix a flat bicycle tyre?", "Write a haiku about autumn leaves.",
                 "What causes thunder and lightning?", "Help me write a thank-you note to my teacher.",
                 "Name five animals that live in the desert.", "How does a refrigerator keep food cold?",
                 "Draft an email asking for a day off.", "Tell me a joke about computers.",
                 "What should I pack for a week of hiking?", "Give tips for sleeping better.",
                 "Explain the rules of chess to a beginner.", "Recommend a book for a long flight.")
NOVELTY_FILLERS = ("please", "quickly", "today", "again", "simply", "now", "briefly", "for me")
NOVELTY_CANDIDATES = 48
NOVELTY_SEED = 6


def _near_duplicate(rng, text: str) -> str:
    """``text`` with a word added, removed or replaced: what a model writes when it repeats an instruction."""
    words = text.rstrip(".?!").split()
    kind = rng.randrange(3)
    if kind == 0:
        words.insert(rng.randint(0, len(words)), rng.choice(NOVELTY_FILLERS))
    elif kind == 1 and len(words) > 3:
        del words[rng.randrange(1, len(words))]
    else:
        words[rng.randrange(1, len(words))] = rng.choice(NOVELTY_FILLERS)
    return " ".join(words) + rng.choice((".", "?", ""))


@functools.lru_cache(maxsize=1)
def novelty_candidates() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(pool, candidates): the seed instructions and ``NOVELTY_CANDIDATES`` fixed generated ones, a mix of new
    instructions and near-duplicates of the seeds and of earlier candidates (what stage 1 of SELF-ALIGN returns)."""
    import random

    rng = random.Random(NOVELTY_SEED)
    fresh, candidates = list(NOVELTY_BASES), []
    while len(candidates) < NOVELTY_CANDIDATES:
        u = rng.random()
        if u < 0.4 and fresh:
            candidates.append(fresh.pop(rng.randrange(len(fresh))))
        elif u < 0.6:
            candidates.append(_near_duplicate(rng, rng.choice(NOVELTY_SEEDS)))
        else:
            candidates.append(_near_duplicate(rng, rng.choice(candidates or list(NOVELTY_SEEDS))))
    return NOVELTY_SEEDS, tuple(candidates)


@functools.lru_cache(maxsize=1)
def _novelty_scores() -> torch.Tensor:
    """(C, S + C) ROUGE-L F of each candidate with each seed and each candidate (``self_align.rouge_l``)."""
    from .self_align import rouge_l

    pool, candidates = novelty_candidates()
    texts = pool + candidates
    return torch.tensor([[rouge_l(c, t) for t in texts] for c in candidates], dtype=torch.float64)


def novelty_pass_rate(threshold: float) -> dict:
    """Self-instruct's novelty filter over ``novelty_candidates`` with ``threshold``: each candidate in turn is
    rejected if its ROUGE-L F with a seed or with a candidate kept before it is above ``threshold`` (Wang et al.
    2023 reject above 0.7), kept otherwise. Returns ``pass_rate`` (kept / candidates), ``kept`` (how many) and
    ``mean_best`` (the mean over kept candidates of their highest ROUGE-L with what they were compared to: lower
    is more diverse)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    scores = _novelty_scores()
    n_pool, n = len(NOVELTY_SEEDS), scores.shape[0]
    compared = list(range(n_pool))          # columns: the seeds, then each kept candidate
    best_kept = []
    for i in range(n):
        best = float(scores[i, compared].max())
        if best <= threshold:
            compared.append(n_pool + i)
            best_kept.append(best)
    return {"pass_rate": len(best_kept) / n, "kept": len(best_kept),
            "mean_best": sum(best_kept) / len(best_kept) if best_kept else 0.0}
