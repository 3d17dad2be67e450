"""Grading of the exercises 00-06, one template parametrized over them: each exercise's checks test exactly its
functions for its points, the solution scores full marks and the exercise zero, the two stay in sync, and wrong
implementations lose points on exactly the checks that should catch them; a syntax error costs one function only,
and functions imported from alignlib are not accepted. The tables of wrong implementations are per exercise below;
the grader itself is tested in test_grading.py and test_grader_isolation.py."""
from __future__ import annotations

import io
from dataclasses import dataclass

import nbformat
import pytest

import alignlib.self_align as self_align_reference
from alignlib.checks import load_checks
from alignlib.checks.grader import BEGIN_CODE, GRADED_TAG, grade, load_functions, print_table, sync_exercises
from grading_helpers import (ROOT, assert_loses_exactly, exercise_path, solution_path, with_cell_replaced,
                             with_solution)

pytestmark = pytest.mark.grading


@dataclass(frozen=True)
class Exercise:
    points: dict[str, int]                 # graded function -> the points of its checks
    total: int                             # the full marks
    syntax_error: tuple[str, str]          # a function given a syntax error, another that keeps its marks
    imported: tuple[tuple[str, str], ...]  # (function, alignlib module whose copy of it is not accepted)
    wrong: dict[str, tuple[str, str, set[str]]]  # mistake -> (function, body, the checks it must fail)


# ---------------------------------------------------------------- 00 log-probabilities

WRONG_00 = {
    "no shift": ("token_logprobs_from_logits",
                 "return F.log_softmax(logits, -1).gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)",
                 {"token_logprobs_from_logits: matches the reference on random logits",
                  "token_logprobs_from_logits: shape (B, T), column 0 is 0, values <= 0",
                  "token_logprobs_from_logits: stable for logits of size ~1000"}),
    "log of softmax": ("token_logprobs_from_logits",
                       "logp = torch.log(torch.softmax(logits[:, :-1], -1))\n"
                       "picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)\n"
                       "return F.pad(picked, (1, 0))",
                       {"token_logprobs_from_logits: stable for logits of size ~1000"}),
    "mask ignored": ("sequence_logprob", "return token_lp.sum(-1)",
                     {"sequence_logprob: matches the reference on left-padded batches",
                      "sequence_logprob: only masked positions count"}),
    "alpha ignored": ("length_normalized_logprob", "return (token_lp * mask).sum(-1) / mask.sum(-1)",
                      {"length_normalized_logprob: matches the reference, alpha = 1, 0.5, 2",
                       "length_normalized_logprob: alpha = 0 gives the plain sum"}),
    "mean of all": ("masked_mean", "return values.mean()",
                    {"masked_mean: matches the reference (a 0-dim tensor)",
                     "masked_mean: huge values where mask is 0 do not count"}),
    "indexed by int mask": ("masked_mean", "return values[mask].mean()",
                            {"masked_mean: matches the reference (a 0-dim tensor)",
                             "masked_mean: huge values where mask is 0 do not count"}),
}


# ---------------------------------------------------------------- 01 PPO

GAE_LOOP = """
mask = mask.to(rewards.dtype)
advantages = torch.zeros_like(rewards)
next_value = torch.zeros_like(rewards[:, 0])
next_adv = torch.zeros_like(rewards[:, 0])
for t in reversed(range(rewards.shape[1])):
    delta = rewards[:, t] + gamma * next_value - values[:, t]
    next_adv = {recursion}
    advantages[:, t] = next_adv
    next_value = values[:, t]{value_mask}
    next_adv = next_adv{adv_mask}
return advantages * mask, (advantages + values) * mask
"""

CLIP_TERMS = """
ratio = torch.exp(logp - old_logp)
unclipped = -advantages * ratio
clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
mask = mask.to(logp.dtype)
"""

KL_REF = "kl_penalty: matches the reference, k1 (the default) and k3"
KL_MEANS = "kl_penalty: k1 and k3 average to KL(pi || rho) on tokens sampled from pi"
SHAPED_REF = "shaped_rewards: matches the reference on padded batches"
SHAPED_LAST = "shaped_rewards: the score sits on the last response token of each row"
SHAPED_KL = "shaped_rewards: -beta * KL on response tokens, zero off the mask"
GAE_REF = "compute_gae: matches the reference on padded batches, several gamma and lam"
GAE_TO_GO = "compute_gae: gamma = lam = 1 gives returns = rewards-to-go"
GAE_OFF = "compute_gae: rewards and values off the mask change nothing"
CLIP_REF = "clipped_policy_loss: matches the reference on padded batches"
CLIP_GRAD = "clipped_policy_loss: gradient is zero outside the trust region, nonzero inside"
CLIP_ONE = "clipped_policy_loss: at ratio 1 the loss is -mean(A), with the policy gradient"

WRONG_01 = {
    # kl_penalty
    "k1 with the sign flipped": (
        "kl_penalty",
        "log_ratio = logp - ref_logp\n"
        "return -log_ratio if estimator == 'k1' else torch.expm1(-log_ratio) + log_ratio",
        {KL_REF, KL_MEANS}),
    "k3 with pi/rho instead of rho/pi": (  # still >= 0, but a biased estimate of KL(pi || rho)
        "kl_penalty",
        "log_ratio = logp - ref_logp\n"
        "return log_ratio if estimator == 'k1' else torch.expm1(log_ratio) - log_ratio",
        {KL_REF, KL_MEANS}),
    # shaped_rewards
    "score on the last column": (
        "shaped_rewards",
        "rewards = -kl_coef * kl * mask\n"
        "rewards[:, -1] += scores\n"
        "return rewards",
        {SHAPED_REF, SHAPED_LAST}),
    "score at mask.sum() - 1 (forgets the left padding)": (
        "shaped_rewards",
        "rewards = -kl_coef * kl * mask\n"
        "rewards[torch.arange(len(scores)), mask.sum(-1) - 1] += scores\n"
        "return rewards",
        {SHAPED_REF, SHAPED_LAST}),
    "KL penalty on every column": (
        "shaped_rewards",
        "rewards = -kl_coef * kl.clone()\n"
        "last = torch.where(mask.bool(), torch.arange(mask.shape[1]), -1).max(-1).values\n"
        "rewards[torch.arange(len(scores)), last] += scores\n"
        "return rewards",
        {SHAPED_REF, SHAPED_KL}),
    # compute_gae
    "GAE that does not stop at the mask": (  # bootstraps from the values in the right padding
        # (with gamma = lam = 1 the values telescope away, so the rewards-to-go come out right)
        "compute_gae",
        GAE_LOOP.format(recursion="delta + gamma * lam * next_adv", value_mask="", adv_mask=""),
        {GAE_REF, GAE_OFF}),
    "GAE returns without + V": (
        "compute_gae",
        GAE_LOOP.format(recursion="(delta + gamma * lam * next_adv) * mask[:, t]", value_mask=" * mask[:, t]",
                        adv_mask="").replace("(advantages + values) * mask", "advantages * mask"),
        {GAE_REF, GAE_TO_GO}),
    "GAE without gamma in the lambda term": (
        "compute_gae",
        GAE_LOOP.format(recursion="(delta + lam * next_adv) * mask[:, t]", value_mask=" * mask[:, t]",
                        adv_mask=" * mask[:, t]"),
        {GAE_REF}),
    # clipped_policy_loss
    "min instead of max of the negated terms": (
        "clipped_policy_loss",
        CLIP_TERMS + "return (torch.min(unclipped, clipped) * mask).sum() / mask.sum()",
        {CLIP_REF, CLIP_GRAD}),
    "no clipping": (
        "clipped_policy_loss",
        CLIP_TERMS + "return (unclipped * mask).sum() / mask.sum()",
        {CLIP_REF, CLIP_GRAD}),
    "mean over every column, padding included": (
        "clipped_policy_loss",
        CLIP_TERMS + "return torch.max(unclipped, clipped).mean()",
        {CLIP_REF, CLIP_GRAD, CLIP_ONE}),
    "mean per sequence, then over the batch": (  # a different weighting of the tokens
        "clipped_policy_loss",
        CLIP_TERMS + "return ((torch.max(unclipped, clipped) * mask).sum(-1) / mask.sum(-1)).mean()",
        {CLIP_REF, CLIP_ONE}),
    "loss only, no stats (accepted)": (
        "clipped_policy_loss",
        CLIP_TERMS + "return (torch.max(unclipped, clipped) * mask).sum() / mask.sum()",
        set()),
}


# ---------------------------------------------------------------- 02 RRHF

# The first lines of a rank_loss: the (Q, k, k) differences and the pairs; {worse} decides which pairs count.
RANK_PAIRS = """
valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
diff = scores[:, :, None] - scores[:, None, :]
pairs = ({worse}) & valid[:, :, None] & valid[:, None, :]
"""
STRICT = "rewards[:, :, None] < rewards[:, None, :]"

# The first lines of a best_response_loss: invalid candidates out of the running.
BEST_MASKED = """
if valid is not None:
    rewards = rewards.masked_fill(~valid.bool(), float("-inf"))
"""

RANK_REF = "rank_loss: matches the reference on random (Q, k), with and without a valid mask"
RANK_ORDERED = "rank_loss: zero when each query's scores are ordered like its rewards"
RANK_TIES = "rank_loss: tied rewards form no pair"
RANK_SUM = "rank_loss: a batch of queries gives the sum of the single-query losses"
RANK_GRAD = "rank_loss: gradient with respect to the scores matches the reference"
BEST_REF = "best_response_loss: matches the reference on random (Q, k), with and without a valid mask"
BEST_INVALID = "best_response_loss: an invalid candidate is never the best, whatever its reward"
BEST_TIES = "best_response_loss: the first of several best candidates is the one trained on"
BEST_SUM = "best_response_loss: sums over queries, with gradient to the best candidates only"

WRONG_02 = {
    # rank_loss
    "pairs across queries (the batch flattened into one query)": (
        "rank_loss",
        "Q, k = scores.shape\n"
        "valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()\n"
        "s, r, v = scores.reshape(1, Q * k), rewards.reshape(1, Q * k), valid.reshape(1, Q * k)\n"
        "pairs = (r[:, :, None] < r[:, None, :]) & v[:, :, None] & v[:, None, :]\n"
        "return (torch.relu(s[:, :, None] - s[:, None, :]) * pairs).sum()",
        {RANK_REF, RANK_ORDERED, RANK_SUM, RANK_GRAD}),
    "ties counted as pairs": (
        "rank_loss",
        RANK_PAIRS.format(worse="rewards[:, :, None] <= rewards[:, None, :]")
        + "return (torch.relu(diff) * pairs).sum()",
        {RANK_REF, RANK_TIES}),
    "mean over the pairs instead of the sum": (  # 0 / 0 when a query has no pair
        "rank_loss",
        RANK_PAIRS.format(worse=STRICT) + "return (torch.relu(diff) * pairs).sum() / pairs.sum()",
        {RANK_REF, RANK_TIES, RANK_SUM, RANK_GRAD}),
    "mean over the queries instead of the sum": (
        "rank_loss",
        RANK_PAIRS.format(worse=STRICT) + "return (torch.relu(diff) * pairs).sum((1, 2)).mean()",
        {RANK_REF, RANK_SUM, RANK_GRAD}),
    "hinge the wrong way round": (
        "rank_loss",
        RANK_PAIRS.format(worse=STRICT) + "return (torch.relu(-diff) * pairs).sum()",
        {RANK_REF, RANK_ORDERED, RANK_TIES, RANK_GRAD}),
    "valid mask ignored": (
        "rank_loss",
        "diff = scores[:, :, None] - scores[:, None, :]\n"
        "return (torch.relu(diff) * (rewards[:, :, None] < rewards[:, None, :])).sum()",
        {RANK_REF, RANK_GRAD}),
    "a Python loop adding up floats (no gradient)": (
        "rank_loss",
        "total = 0.0\n"
        "for q in range(scores.shape[0]):\n"
        "    for i in range(scores.shape[1]):\n"
        "        for j in range(scores.shape[1]):\n"
        "            ok = valid is None or (bool(valid[q, i]) and bool(valid[q, j]))\n"
        "            if ok and rewards[q, i] < rewards[q, j]:\n"
        "                total += max(0.0, (scores[q, i] - scores[q, j]).item())\n"
        "return torch.tensor(total)",
        {RANK_GRAD}),
    # best_response_loss
    "argmin of the rewards": (
        "best_response_loss",
        "if valid is not None:\n"
        "    rewards = rewards.masked_fill(~valid.bool(), float('inf'))\n"
        "return nll.gather(1, rewards.argmin(-1)[:, None]).sum()",
        {BEST_REF, BEST_INVALID, BEST_TIES, BEST_SUM}),
    "valid mask ignored (best)": (
        "best_response_loss",
        "return nll.gather(1, rewards.argmax(-1)[:, None]).sum()",
        {BEST_REF, BEST_INVALID}),
    "the last of several best candidates": (
        "best_response_loss",
        BEST_MASKED + "last = rewards.shape[1] - 1 - rewards.flip(-1).argmax(-1)\n"
        "return nll.gather(1, last[:, None]).sum()",
        {BEST_TIES}),
    "mean over the queries": (
        "best_response_loss",
        BEST_MASKED + "return nll.gather(1, rewards.argmax(-1)[:, None]).mean()",
        {BEST_REF, BEST_SUM}),
    "mean NLL of every candidate": (
        "best_response_loss",
        "return nll.mean(-1).sum()",
        {BEST_REF, BEST_INVALID, BEST_TIES, BEST_SUM}),
}


# ---------------------------------------------------------------- 03 RAFT

# The first lines of a select_global: the flat rewards and the number to keep, with the error for N < k.
GLOBAL_KEEP = """
flat = rewards.flatten()
keep = flat.numel() // k{extra}
if flat.numel() < k:
    raise ValueError("fewer than k samples")
"""
# The n-grams of distinct_n, words made by {words}.
NGRAMS = """
grams = []
for text in texts:
    words = {words}
    grams.extend(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
"""
RATIO = "return len(set(grams)) / len(grams) if grams else 0.0"

LOCAL_REF = "select_local: matches the reference on random rewards (P, k)"
LOCAL_FLAT = "select_local: returns flat indices p * k + j, one per prompt, into that prompt's row"
LOCAL_TIES = "select_local: ties go to the first (earliest) sample of the prompt"
GLOBAL_REF = "select_global: matches the reference on random rewards, sorted flat indices"
GLOBAL_TOP = "select_global: keeps exactly the N // k highest rewards"
GLOBAL_TIES = "select_global: ties go to the earlier sample"
GLOBAL_ERROR = "select_global: raises ValueError when there are fewer than k samples"
DISTINCT_REF = "distinct_n: matches the reference on random texts, n = 1, 2, 3"
DISTINCT_CASE = "distinct_n: lower-cases the words and splits on any whitespace"
DISTINCT_WITHIN = "distinct_n: counts n-grams within each text only, 0.0 when there are none"

WRONG_03 = {
    # select_local
    "column of the best sample instead of its flat index": (
        "select_local",
        "return rewards.argmax(-1)",
        {LOCAL_REF, LOCAL_FLAT}),
    "the last of equal rewards": (
        "select_local",
        "P, k = rewards.shape\n"
        "return torch.arange(P) * k + (k - 1 - rewards.flip(-1).argmax(-1))",
        {LOCAL_TIES}),
    "argmin": (
        "select_local",
        "P, k = rewards.shape\n"
        "return torch.arange(P) * k + rewards.argmin(-1)",
        {LOCAL_REF, LOCAL_FLAT, LOCAL_TIES}),
    # select_global
    "keeps N // k + 1": (
        "select_global",
        GLOBAL_KEEP.format(extra=" + 1")
        + "return torch.sort(flat, descending=True, stable=True).indices[:keep].sort().values",
        {GLOBAL_REF, GLOBAL_TOP, GLOBAL_TIES}),
    "indices in the order of the rewards, not sorted": (
        "select_global",
        GLOBAL_KEEP.format(extra="") + "return torch.sort(flat, descending=True, stable=True).indices[:keep]",
        {GLOBAL_REF}),
    "ties to the later sample": (
        "select_global",
        GLOBAL_KEEP.format(extra="")
        + "order = torch.sort(flat.flip(0), descending=True, stable=True).indices[:keep]\n"
        "return (flat.numel() - 1 - order).sort().values",
        {GLOBAL_TIES}),
    "the worst 1/k": (
        "select_global",
        GLOBAL_KEEP.format(extra="") + "return torch.sort(flat, stable=True).indices[:keep].sort().values",
        {GLOBAL_REF, GLOBAL_TOP, GLOBAL_TIES}),
    "no error when N < k (returns nothing)": (
        "select_global",
        "flat = rewards.flatten()\n"
        "keep = flat.numel() // k\n"
        "return torch.sort(flat, descending=True, stable=True).indices[:keep].sort().values",
        {GLOBAL_ERROR}),
    # distinct_n
    "no lower-casing": (
        "distinct_n",
        NGRAMS.format(words="text.split()") + RATIO,
        {DISTINCT_CASE}),
    "split on single spaces": (
        "distinct_n",
        NGRAMS.format(words="text.lower().split(' ')") + RATIO,
        {DISTINCT_CASE}),
    "n-grams across texts (all texts joined)": (
        "distinct_n",
        "words = ' '.join(texts).lower().split()\n"
        "grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]\n" + RATIO,
        {DISTINCT_REF, DISTINCT_WITHIN}),
    "no guard when there is no n-gram": (
        "distinct_n",
        NGRAMS.format(words="text.lower().split()") + "return len(set(grams)) / len(grams)",
        {DISTINCT_WITHIN}),
    "distinct words over n-grams": (
        "distinct_n",
        NGRAMS.format(words="text.lower().split()")
        + "unique = {w for t in texts for w in t.lower().split()}\n"
        "return len(unique) / len(grams) if grams else 0.0",
        {DISTINCT_REF, DISTINCT_WITHIN}),  # it does lower-case and split the words right
}


# ---------------------------------------------------------------- 04 rewarded soups

CHECKED = """
w = [float(x) for x in weights]
if len(w) != len(state_dicts) or any(x < 0 for x in w) or abs(sum(w) - 1) > 1e-6:
    raise ValueError("weights off the simplex")
"""
PARETO = """
ge = (points[:, None, :] {op} points[None, :, :]).all(-1)
gt = (points[:, None, :] {strict} points[None, :, :]).any(-1)
"""
HV_HEAD = """
above = points{filter}
if len(above) == 0:
    return 0.0
front = above[above[:, 0].argsort(descending=True)]
r1, r2 = reference.tolist()
"""

INTERP_REF = ("interpolate_state_dicts: sum_i lambda_i theta_i key by key, for N = 2 and 3 experts, and a vertex "
              "gives that expert")
INTERP_BAD = ("interpolate_state_dicts: raises ValueError for weights off the simplex (negative, not summing to 1) "
              "or one weight per expert missing")
LORA_PRODUCT = "lora_delta: mode 'product': sum_i lambda_i B_i A_i (the soup of the full weights)"
LORA_FACTORS = "lora_delta: mode 'factors': (sum_i lambda_i B_i)(sum_i lambda_i A_i), A and B averaged separately"
LORA_VERTEX = "lora_delta: at a vertex both modes give that expert's B_i A_i"
PARETO_REF = "pareto_mask: matches the reference on random points, 2 and 3 rewards"
PARETO_DUP = ("pareto_mask: identical points do not dominate each other: duplicates of a front point stay, of a "
              "dominated one go")
PARETO_WEAK = "pareto_mask: a point tied in one reward and worse in another is dominated"
HV_REF = "hypervolume_2d: matches the reference on random fronts above the reference point"
HV_DOM = "hypervolume_2d: dominated points and duplicates add nothing"
HV_UNDER = "hypervolume_2d: points not above the reference in both rewards add nothing (and alone give 0.0)"
HV_BATCH = "hypervolume_2d: points (S, P, 2) give a (S,) float64 tensor, one hypervolume per front"
INTERP_INT = ("interpolate_state_dicts: integer tensors (step counters) are not averaged: equal across experts they "
              "are returned as they are")
LORA_RANKS = ("lora_delta: experts of different ranks: 'product' still gives sum_i lambda_i B_i A_i, 'factors' raises "
              "ValueError")
PARETO_MIN = ("pareto_mask: rewards listed in minimize are costs: lower is better there (the same front as negating "
              "them)")
EXPERIMENT = ("choose_lambda: the chosen lambda gives user mu = 0.5 a utility within 0.005 of the best soup's "
              "(experts' Hessians differ)")

WRONG_04 = {
    "weights applied to the experts in reverse": (
        "interpolate_state_dicts",
        CHECKED + "return {k: sum(wi * sd[k] for wi, sd in zip(reversed(w), state_dicts)) for k in state_dicts[0]}",
        {INTERP_REF, INTERP_INT}),
    "no check of the weights": (
        "interpolate_state_dicts",
        "return {k: sum(wi * sd[k] for wi, sd in zip(weights, state_dicts)) for k in state_dicts[0]}",
        {INTERP_BAD, INTERP_INT}),
    "integer buffers averaged with the floats (alignlib's interpolate)": (
        "interpolate_state_dicts",
        CHECKED + "return {k: sum(wi * sd[k] for wi, sd in zip(w, state_dicts)) for k in state_dicts[0]}",
        {INTERP_INT}),
    "factors mode computed as the product": (
        "lora_delta",
        "return sum(w * (B @ A) for w, A, B in zip(weights, As, Bs))",
        {LORA_FACTORS, LORA_RANKS}),
    "product mode computed from averaged factors": (
        "lora_delta",
        "return sum(w * B for w, B in zip(weights, Bs)) @ sum(w * A for w, A in zip(weights, As))",
        {LORA_PRODUCT, LORA_RANKS}),
    "square roots of the weights on each factor": (
        "lora_delta",
        "if mode == 'product':\n"
        "    return sum(w * (B @ A) for w, A, B in zip(weights, As, Bs))\n"
        "return sum(w ** 0.5 * B for w, B in zip(weights, Bs)) @ sum(w ** 0.5 * A for w, A in zip(weights, As))",
        {LORA_FACTORS, LORA_RANKS}),
    "product mode ignores the weights (plain mean)": (
        "lora_delta",
        "if mode == 'product':\n"
        "    return sum(B @ A for A, B in zip(As, Bs)) / len(As)\n"
        "return sum(w * B for w, B in zip(weights, Bs)) @ sum(w * A for w, A in zip(weights, As))",
        {LORA_PRODUCT, LORA_VERTEX, LORA_RANKS}),
    "experts of different ranks refused in both modes (alignlib's lora_soup)": (
        "lora_delta",
        "if len({A.shape[0] for A in As}) > 1:\n    raise ValueError('ranks differ')\n"
        "if mode == 'product':\n"
        "    return sum(w * (B @ A) for w, A, B in zip(weights, As, Bs))\n"
        "return sum(w * B for w, B in zip(weights, Bs)) @ sum(w * A for w, A in zip(weights, As))",
        {LORA_RANKS}),
    "strict dominance only (better in every reward)": (
        "pareto_mask",
        PARETO.format(op=">", strict=">") + "return ~(ge & gt).any(0)",
        {PARETO_WEAK, PARETO_MIN}),
    "duplicates dominate each other": (
        "pareto_mask",
        PARETO.format(op=">=", strict=">")
        + "ge &= ~torch.eye(len(points), dtype=torch.bool)\nreturn ~ge.any(0)",
        {PARETO_DUP, PARETO_MIN}),
    "costs ignored, every reward maximised (alignlib's pareto_mask)": (
        "pareto_mask",
        PARETO.format(op=">=", strict=">") + "return ~(ge & gt).any(0)",
        {PARETO_MIN}),
    "rewards minimised": (
        "pareto_mask",
        PARETO.format(op="<=", strict="<") + "return ~(ge & gt).any(0)",
        {PARETO_REF, PARETO_DUP, PARETO_WEAK, PARETO_MIN}),
    "points under the reference kept": (
        "hypervolume_2d",
        HV_HEAD.format(filter="")
        + "area, y_prev = 0.0, r2\nfor x, y in front.tolist():\n    if y > y_prev:\n"
          "        area += (x - r1) * (y - y_prev)\n        y_prev = y\nreturn area",
        {HV_UNDER, HV_BATCH}),
    "one front only (alignlib's hypervolume)": (
        "hypervolume_2d",
        HV_HEAD.format(filter="[(points > reference).all(-1)]")
        + "area, y_prev = 0.0, r2\nfor x, y in front.tolist():\n    if y > y_prev:\n"
          "        area += (x - r1) * (y - y_prev)\n        y_prev = y\nreturn area",
        {HV_BATCH}),
    "overlapping rectangles added up": (
        "hypervolume_2d",
        HV_HEAD.format(filter="[(points > reference).all(-1)]")
        + "return sum((x - r1) * (y - r2) for x, y in front.tolist())",
        {HV_REF, HV_DOM, HV_BATCH}),
    "lambda = mu, as if Lemma 1 held": (
        "choose_lambda",
        "return mu",
        {EXPERIMENT}),
}


# ---------------------------------------------------------------- 05 Constitutional AI

# the refusals of blank input, written before each prompt body below (they are not the mistake under test)
BLANKS = ('if any(not str(x).strip() for x in (prompt, response, pair.get("critique_request") or "")):\n'
          '    raise ValueError("blank input")\n')
REVISION_BLANKS = BLANKS.replace('pair.get("critique_request") or ""',
                                 'pair.get("critique_request") or "", critique, pair.get("revision_request") or ""')
TURNS = BLANKS + 'turns = f"Human: {prompt.strip()}\\n\\nAssistant: {response.strip()}\\n\\n"\n'
SHAPE_CHECK = """
if logp_first_order.dim() != 2 or logp_first_order.shape[1] != 2 or logp_swapped.shape != logp_first_order.shape:
    raise ValueError("both inputs must be (B, 2)")
"""
SOFT = """
first = {first}
swapped = {swapped}
bias = (logp_first_order[:, 0] - logp_first_order[:, 1] + logp_swapped[:, 0] - logp_swapped[:, 1]) / 2
return {{"p": (first + swapped) / 2, "p_first_order": first, "p_swapped": swapped, "bias": bias}}
"""
# a compact Newton fit; {guard}, {prior}, {scale} and {anchor} are where the mistakes go
ELO = """
index = {{name: i for i, name in enumerate(players)}}
{guard}
n, m = len(players), len(outcomes)
s = torch.tensor([float(o[2]) for o in outcomes], dtype=torch.float64)
e = torch.zeros(m, n, dtype=torch.float64)
e[torch.arange(m), torch.tensor([index[o[0]] for o in outcomes], dtype=torch.long)] += 1.0
e[torch.arange(m), torch.tensor([index[o[1]] for o in outcomes], dtype=torch.long)] -= 1.0
beta = torch.zeros(n, dtype=torch.float64)
for _ in range(60):
    q = torch.sigmoid(e @ beta)
    grad = e.T @ (s - q) - 2 * {prior} * beta
    curvature = e.T @ (e * (q * (1 - q))[:, None]) + 2 * {prior} * torch.eye(n, dtype=torch.float64)
    beta = beta + torch.linalg.pinv(curvature, hermitian=True, rtol=1e-12) @ grad
elo = {scale} * (beta - beta{anchor})
return {{name: float(elo[i]) for name, i in index.items()}}
"""
GUARD = """if not outcomes or any(x not in index for a, b, _ in outcomes for x in (a, b)):
    raise ValueError("unknown player or no outcomes")
anchor = players[0] if anchor is None else anchor
if anchor not in index:
    raise ValueError("unknown anchor")"""
ELO_RIGHT = dict(guard=GUARD, prior="prior", scale="400 / math.log(10)", anchor="[index[anchor]]")
SFT = """
if not revisions or any(not r.strip() for r in revisions):
    raise ValueError("no revisions, or a blank one")
return [{{"prompt": prompt.strip(), "response": {response}}} for r in {chosen}]
"""
SFT_RIGHT = dict(response="r.strip()", chosen="(revisions if every_round else revisions[-1:])")

CRITIQUE = 'critique_prompt: the conversation (stripped), the critique request and "Critique:", exactly as specified'
CRITIQUE_BAD = ("critique_prompt: raises ValueError for a pair with no (or a blank) critique request, and for a blank "
                "prompt or response")
REVISION_REF = ('revision_prompt: the critique prompt, the critique (stripped), the revision request and "Revision:", '
                'exactly as specified')
REVISION_BAD = ("revision_prompt: raises ValueError for a blank critique (a failed generation) and a pair with no "
                "revision request")
SFT_REF = ("sft_examples: one pair per round's revision (the paper's recipe), or with every_round=False the last one "
           "only; stripped")
SFT_LEAK = ("sft_examples: no critique, request or section label in the pairs; no revisions or a blank revision raise "
            "ValueError")
SOFT_REF = "soft_labels: matches the reference on random (B, 2) log-probabilities and unnormalised logits"
SOFT_SWAP = "soft_labels: swapping the two arguments gives 1 - p, and p lies in [0, 1]"
SOFT_BIAS = "soft_labels: a pure letter bias cancels: two identical answers give exactly 1/2"
SOFT_SHAPE = "soft_labels: raises ValueError unless both inputs have the same shape (B, 2)"
SOFT_MEASURE = ('soft_labels: also returns "bias" (B,): the letter (A)\'s log-odds shared by both orders, 1/2 (d_first '
                '+ d_swapped)')
ELO_REF = "elo_scores: within 1 Elo point of the reference on random tournaments, with players[0] at 0"
ELO_KNOWN = ("elo_scores: a 75% record is 400 log10(3) = 190.8 points ahead (prior=0); tied players score the "
             "same")
ELO_SWEEP = "elo_scores: a clean sweep stays finite with the default prior (the reference's gap within 1 Elo point)"
ELO_ANCHOR = ("elo_scores: anchor names the player rated 0 (default players[0]); the differences do not change; a "
              "stranger is refused")
ELO_BAD = "elo_scores: raises ValueError for an outcome naming a player not in players, and for no outcomes"
JUDGE = ("choose_judge_setup: the (both_orders, margin) chosen keeps >= half of the pairs with an accuracy within 0.01 "
         "of the best setup's")

WRONG_05 = {
    "prompt and response not stripped": (
        "critique_prompt",
        BLANKS + 'return f"Human: {prompt}\\n\\nAssistant: {response}\\n\\nCritique request: '
                 '{pair[\'critique_request\']}\\n\\nCritique:"',
        {CRITIQUE}),
    "a space after 'Critique:'": (
        "critique_prompt",
        TURNS + 'return turns + f"Critique request: {pair[\'critique_request\']}\\n\\nCritique: "',
        {CRITIQUE}),
    "a blank response accepted (alignlib's critique_prompt)": (
        "critique_prompt",
        'turns = f"Human: {prompt.strip()}\\n\\nAssistant: {response.strip()}\\n\\n"\n'
        'return turns + f"Critique request: {pair[\'critique_request\']}\\n\\nCritique:"',
        {CRITIQUE_BAD}),
    "critique not stripped": (
        "revision_prompt",
        REVISION_BLANKS + TURNS.replace(BLANKS, "")
        + 'return (turns + f"Critique request: {pair[\'critique_request\']}\\n\\nCritique: {critique}\\n\\n"\n'
          '        f"Revision request: {pair[\'revision_request\']}\\n\\nRevision:")',
        {REVISION_REF}),
    "critique request left out of the revision prompt": (
        "revision_prompt",
        REVISION_BLANKS + TURNS.replace(BLANKS, "")
        + 'return (turns + f"Critique: {critique.strip()}\\n\\n"\n'
          '        f"Revision request: {pair[\'revision_request\']}\\n\\nRevision:")',
        {REVISION_REF}),
    "a blank critique accepted": (
        "revision_prompt",
        TURNS + 'return (turns + f"Critique request: {pair[\'critique_request\']}\\n\\nCritique: {critique.strip()}'
                '\\n\\nRevision request: {pair[\'revision_request\']}\\n\\nRevision:")',
        {REVISION_BAD}),
    "every revision joined in one target (the transcript leaks in)": (
        "sft_examples", SFT.format(response="'\\n\\n'.join(x.strip() for x in revisions)", chosen="revisions[-1:]"),
        {SFT_REF, SFT_LEAK}),
    "the target labelled as a section ('Revision: ...')": (
        "sft_examples", SFT.format(**{**SFT_RIGHT, "response": "'Revision: ' + r.strip()"}),
        {SFT_REF, SFT_LEAK}),
    "the final revision only, whatever every_round says (alignlib's shortcut)": (
        "sft_examples", SFT.format(**{**SFT_RIGHT, "chosen": "revisions[-1:]"}),
        {SFT_REF, SFT_LEAK}),
    "no ValueError for no revisions or a blank one": (
        "sft_examples", SFT.format(**SFT_RIGHT).split("\n", 3)[3],
        {SFT_LEAK}),
    "p_A of both orders averaged instead of p_A and p_B": (
        "soft_labels",
        SHAPE_CHECK + SOFT.format(first="logp_first_order.softmax(-1)[:, 0]", swapped="logp_swapped.softmax(-1)[:, 0]"),
        {SOFT_REF, SOFT_SWAP, SOFT_BIAS}),
    "no softmax over the two letters": (
        "soft_labels",
        SHAPE_CHECK + SOFT.format(first="logp_first_order[:, 0].exp()", swapped="logp_swapped[:, 1].exp()"),
        {SOFT_REF, SOFT_SWAP, SOFT_BIAS}),
    "no check of the shapes": (
        "soft_labels",
        SOFT.format(first="logp_first_order.softmax(-1)[:, 0]", swapped="logp_swapped.softmax(-1)[:, 1]"),
        {SOFT_SHAPE}),
    "no letter bias returned (alignlib's soft_labels)": (
        "soft_labels",
        SHAPE_CHECK + SOFT.format(first="logp_first_order.softmax(-1)[:, 0]", swapped="logp_swapped.softmax(-1)[:, 1]")
        .replace(', "bias": bias}', "}"),
        {SOFT_MEASURE}),
    "Elo in base e (400 points per nat)": (
        "elo_scores",
        ELO.format(**{**ELO_RIGHT, "scale": "400"}),
        {ELO_REF, ELO_KNOWN, ELO_SWEEP, ELO_ANCHOR}),
    "ratings centred on their mean, not on players[0]": (
        "elo_scores",
        ELO.format(**{**ELO_RIGHT, "anchor": ".mean()"}),
        {ELO_REF, ELO_ANCHOR}),
    "the anchor ignored (players[0] at 0, as alignlib's)": (
        "elo_scores",
        ELO.format(**{**ELO_RIGHT, "anchor": "[0]"}),
        {ELO_ANCHOR}),
    "the prior ignored": (
        "elo_scores",
        ELO.format(**{**ELO_RIGHT, "prior": "0.0"}),
        {ELO_REF, ELO_SWEEP, ELO_ANCHOR}),
    "no check of the players and of empty outcomes": (
        "elo_scores",
        ELO.format(**{**ELO_RIGHT, "guard": "anchor = players[0] if anchor is None else anchor"}),
        {ELO_BAD, ELO_ANCHOR}),
}


# ---------------------------------------------------------------- 06 principle-driven self-alignment

PROMPT_REF = "principle_prompt: the intro, the rules and every exemplar with its thoughts, exactly as specified"
PROMPT_FIRST = ("principle_prompt: num_principles=n keeps the first n rules and every exemplar (an ablation); n "
                "outside 1..len raises ValueError")
QUERY = 'query: the instruction (stripped) after "User:", a blank line, and the thought label with nothing after it'
QUERY_BATCH = "query: a list of instructions gives the list of their queries; a blank instruction raises ValueError"
ENGRAVE_REF = "engraving_pairs: the kept rows' instructions and answers, stripped, in order; dropped rows left out"
ENGRAVE_PRUNE = ("engraving_pairs: no principle text, title, exemplar or thought left in the pairs; nothing kept "
                 "raises ValueError")
ENGRAVE_REPEAT = ("engraving_pairs: an answer that says one sentence twice (a degenerate loop) is left out, as "
                  "Dromedary filters before engraving")
NOVELTY_REF = ("novelty_filter: matches the reference on random candidates with near-duplicates of the pool and of "
               "each other")
NOVELTY_ORDER = "novelty_filter: each candidate meets the pool and the candidates kept before it, not the rejected ones"
NOVELTY_TIE = ("novelty_filter: a score equal to the threshold keeps the candidate (rejected only above it); at "
               "threshold 1 nothing is rejected")
NOVELTY_BAD = "novelty_filter: blank candidates are skipped; a threshold outside (0, 1] raises ValueError"
NOVELTY_SCORES = ("novelty_filter: also returns scores: each non-blank candidate's best ROUGE-L, in order, the number "
                  "the threshold is applied to")
TRUE_REF = "true_scores: p(True) / (p(True) + p(False)) per choice on the tiny model, within 1e-5 of the reference"
TRUE_ARGS = "true_scores: follows the query template and the two words it is given; swapping the words gives 1 - s"
TRUE_BATCH = "true_scores: a list of questions with one list of choices each gives one (K_i,) tensor per question"
ACC_REF = ("accuracy: the fraction of questions whose top score is the answer, ties going to the first choice; hits "
           "per question")
ACC_BAD = "accuracy: raises ValueError for mismatched lengths, no questions, and an answer outside the choices"
ACC_SPLIT = 'accuracy: ties="split": a question whose answer shares the top score with m - 1 others counts 1/m'
THRESHOLD = ("choose_threshold: the chosen threshold keeps >= 40% of the candidates and is within 0.02 of the "
             "strictest that does")

# the prompt with {rule}, {thought} standing for the parts the mistakes change
PROMPT = """
if num_principles is not None and not 1 <= num_principles <= len(data.principles):
    raise ValueError("num_principles out of range")
principles = data.principles[:num_principles] if num_principles else data.principles
rules = "\\n".join(f"{{p['id']}} ({{p['title']}}): {rule}" for p in principles)
shots = "".join(f"{{USER}} {{e['instruction'].strip()}}\\n\\n{thought}{{ANSWER}} {{e['answer'].strip()}}\\n\\n"
                for e in data.exemplars)
return INTRO + "Rules:\\n" + rules + "\\n\\n" + shots
"""
RULE, THOUGHT_TURN = "{p['rule'].strip()}", "{THOUGHT} {e['thought'].strip()}\\n\\n"
QUERY_BODY = """
if isinstance(instruction, list):
    return [query(one) for one in instruction]
if not instruction.strip():
    raise ValueError("blank instruction")
return {text}
"""
ENGRAVE = """
def repeats(text):
    parts = [t.strip().lower() for t in re.split(r"(?<=[.!?])\\s+|\\n+", text) if t.strip()]
    return len(set(parts)) < len(parts)
kept = [r for r in rows if {keep}]
if not kept:
    raise ValueError("nothing to engrave")
return [{instruction} for r in kept], [{answer} for r in kept]
"""
ENGRAVE_RIGHT = dict(keep="not r.get('dropped') and not repeats(r['answer'])", instruction="r['instruction'].strip()",
                     answer="r['answer'].strip()")
# a compact filter; {compare}, {test} and {reject} are where the mistakes go
NOVELTY = """
if not 0 < threshold <= 1:
    raise ValueError("threshold must lie in (0, 1]")
seen, kept, rejected, scores = list(pool), [], [], []
for text in candidates:
    text = text.strip()
    if not text:
        continue
    score, closest = max([(rouge_l(text, other), other) for other in {compare}] or [(0.0, "")])
    scores.append(score)
    if {test}:
        rejected.append((text, closest, score)){reject}
    else:
        kept.append(text)
        seen.append(text)
return kept, rejected, scores
"""
NOVELTY_RIGHT = dict(compare="seen", test="score > threshold", reject="")
TRUE = """
batched = isinstance(question, list)
questions, lists = (question, choices) if batched else ([question], [choices])
suffixes = [{template}.format(question=q, choice=c) for q, cs in zip(questions, lists) for c in cs]
yes = cache.score(suffixes, [words[0]] * len(suffixes))
no = cache.score(suffixes, [words[1]] * len(suffixes))
out = list(({result}).split([len(cs) for cs in lists]))
return out if batched else out[0]
"""
ACCURACY = """
if ties not in ("first", "split"):
    raise ValueError("ties is 'first' or 'split'")
if len(scores) != len(answers) or not answers:
    raise ValueError("one score row per answer")
hits = []
for s, a in zip(scores, answers):
    if not {in_range}:
        raise ValueError("answer out of range")
    top = torch.as_tensor(s) == torch.as_tensor(s).max()
    hits.append({pick} == a if ties == "first" else {split})
return {{"accuracy": sum(hits) / len(hits), "hits": hits}}
"""
ACCURACY_RIGHT = dict(in_range="0 <= a < len(s)", pick="int(torch.as_tensor(s).argmax())",
                      split="float(top[a]) / int(top.sum())")

WRONG_06 = {
    "rules not stripped in the shared prompt": (
        "principle_prompt", PROMPT.format(rule="{p['rule']}", thought=THOUGHT_TURN),
        {PROMPT_REF, PROMPT_FIRST}),
    "exemplar thoughts left out of the shared prompt": (
        "principle_prompt", PROMPT.format(rule=RULE, thought=""),
        {PROMPT_REF, PROMPT_FIRST}),
    "num_principles ignored (alignlib's principle_prompt)": (
        "principle_prompt", PROMPT.format(rule=RULE, thought=THOUGHT_TURN).replace(
            "data.principles[:num_principles] if num_principles else data.principles", "data.principles"),
        {PROMPT_FIRST}),
    "a space after the thought label of the query": (
        "query", QUERY_BODY.format(text='f"{USER} {instruction.strip()}\\n\\n{THOUGHT} "'),
        {QUERY, QUERY_BATCH}),
    "one instruction only, blanks accepted (alignlib's query)": (
        "query", 'return f"{USER} {instruction.strip()}\\n\\n{THOUGHT}"',
        {QUERY_BATCH}),
    "thoughts left in the engraving answers": (
        "engraving_pairs",
        ENGRAVE.format(**{**ENGRAVE_RIGHT, "answer": "r['thought'].strip() + ' ' + r['answer'].strip()"}),
        {ENGRAVE_REF, ENGRAVE_PRUNE, ENGRAVE_REPEAT}),
    "dropped rows kept": (
        "engraving_pairs", ENGRAVE.format(**{**ENGRAVE_RIGHT, "keep": "not repeats(r['answer'])"}),
        {ENGRAVE_REF, ENGRAVE_PRUNE}),
    "engraving pairs not stripped": (
        "engraving_pairs", ENGRAVE.format(**{**ENGRAVE_RIGHT, "instruction": "r['instruction']",
                                             "answer": "r['answer']"}),
        {ENGRAVE_REF}),
    "repeated sentences kept (alignlib's engraving_pairs)": (
        "engraving_pairs", ENGRAVE.format(**{**ENGRAVE_RIGHT, "keep": "not r.get('dropped')"}),
        {ENGRAVE_REPEAT}),
    "candidates compared with the pool only, not with earlier kept ones": (
        "novelty_filter", NOVELTY.format(**{**NOVELTY_RIGHT, "compare": "pool"}),
        {NOVELTY_REF, NOVELTY_ORDER, NOVELTY_SCORES}),
    "rejected candidates join the comparison set": (
        "novelty_filter", NOVELTY.format(**{**NOVELTY_RIGHT, "reject": "\n        seen.append(text)"}),
        {NOVELTY_REF, NOVELTY_ORDER, NOVELTY_SCORES}),
    "'>=' instead of '>' at the threshold": (
        "novelty_filter", NOVELTY.format(**{**NOVELTY_RIGHT, "test": "score >= threshold"}),
        {NOVELTY_TIE}),
    "no check of the threshold": (
        "novelty_filter", NOVELTY.format(**NOVELTY_RIGHT).split("\n", 3)[3],
        {NOVELTY_BAD}),
    "no scores returned (alignlib's novelty_filter)": (
        "novelty_filter", NOVELTY.format(**NOVELTY_RIGHT).replace("return kept, rejected, scores",
                                                                  "return kept, rejected"),
        {NOVELTY_REF, NOVELTY_ORDER, NOVELTY_TIE, NOVELTY_BAD, NOVELTY_SCORES}),
    "p(True) without normalising by p(True) + p(False)": (
        "true_scores", TRUE.format(template="query", result="yes.exp()"),
        {TRUE_REF, TRUE_ARGS, TRUE_BATCH}),
    "the default template used whatever query is given": (
        "true_scores", TRUE.format(template="TRUE_QUERY", result="torch.sigmoid(yes - no)"),
        {TRUE_ARGS}),
    "one question only (alignlib's true_scores)": (
        "true_scores",
        "suffixes = [query.format(question=question, choice=c) for c in choices]\n"
        "return torch.sigmoid(cache.score(suffixes, [words[0]] * len(choices))\n"
        "                     - cache.score(suffixes, [words[1]] * len(choices)))",
        {TRUE_BATCH}),
    "ties go to the last choice": (
        "accuracy", ACCURACY.format(**{**ACCURACY_RIGHT,
                                       "pick": "len(s) - 1 - int(torch.as_tensor(s).flip(0).argmax())"}),
        {ACC_REF}),
    "negative answers accepted": (
        "accuracy", ACCURACY.format(**{**ACCURACY_RIGHT, "in_range": "a < len(s)"}),
        {ACC_BAD}),
    "a split tie counted as a whole hit": (
        "accuracy", ACCURACY.format(**{**ACCURACY_RIGHT, "split": "float(top[a])"}),
        {ACC_SPLIT}),
    "the threshold of self-instruct's paper, 0.7": (
        "choose_threshold", "return 0.7",
        {THRESHOLD}),
}


EXERCISES = {
    "00_logprobs": Exercise(
        points={"token_logprobs_from_logits": 4, "sequence_logprob": 2, "length_normalized_logprob": 2,
                "masked_mean": 2, "choose_temperature": 2},
        total=12, syntax_error=("sequence_logprob", "masked_mean"), imported=(("masked_mean", "alignlib.logprobs"),),
        wrong=WRONG_00),
    "01_ppo": Exercise(
        points={"kl_penalty": 3, "shaped_rewards": 3, "compute_gae": 4, "clipped_policy_loss": 4, "choose_beta": 2},
        total=16, syntax_error=("compute_gae", "clipped_policy_loss"), imported=(("compute_gae", "alignlib.ppo"),),
        wrong=WRONG_01),
    "02_rrhf": Exercise(
        points={"rank_loss": 6, "best_response_loss": 4, "choose_alpha": 2},
        total=12, syntax_error=("rank_loss", "best_response_loss"),
        imported=(("best_response_loss", "alignlib.rrhf"),), wrong=WRONG_02),
    "03_raft": Exercise(
        points={"select_local": 3, "select_global": 4, "distinct_n": 3, "choose_k_and_temperature": 2},
        total=12, syntax_error=("select_global", "distinct_n"), imported=(("distinct_n", "alignlib.raft"),),
        wrong=WRONG_03),
    "04_soups": Exercise(
        points={"interpolate_state_dicts": 3, "lora_delta": 4, "pareto_mask": 4, "hypervolume_2d": 4,
                "choose_lambda": 2},
        total=17, syntax_error=("lora_delta", "pareto_mask"), imported=(("pareto_mask", "alignlib.soups"),),
        wrong=WRONG_04),
    "05_cai": Exercise(
        points={"critique_prompt": 2, "revision_prompt": 2, "sft_examples": 2, "soft_labels": 5, "elo_scores": 5,
                "choose_judge_setup": 2},
        total=18, syntax_error=("soft_labels", "elo_scores"),
        imported=(("soft_labels", "alignlib.feedback"), ("elo_scores", "alignlib.cai"),
                  ("critique_prompt", "alignlib.cai")),
        wrong=WRONG_05),
    "06_self_align": Exercise(
        points={"principle_prompt": 2, "query": 2, "engraving_pairs": 3, "novelty_filter": 5, "true_scores": 3,
                "accuracy": 3, "choose_threshold": 2},
        total=20, syntax_error=("novelty_filter", "accuracy"),
        imported=(("novelty_filter", "alignlib.self_align"), ("engraving_pairs", "alignlib.self_align"),
                  ("true_scores", "alignlib.multiple_choice")),
        wrong=WRONG_06),
}
WRONG_CASES = [pytest.param(exercise, mistake, id=f"{exercise}-{mistake}")
               for exercise, spec in EXERCISES.items() for mistake in sorted(spec.wrong)]
IMPORT_CASES = [pytest.param(exercise, function, module, id=f"{exercise}-{function}")
                for exercise, spec in EXERCISES.items() for function, module in spec.imported]


# ---------------------------------------------------------------- the template, for every exercise

@pytest.mark.parametrize("exercise", EXERCISES)
def test_checks_registry(exercise):
    """The checks test exactly the exercise's functions, worth their points (the full marks in all), with unique
    names."""
    points = EXERCISES[exercise].points
    assert sum(points.values()) == EXERCISES[exercise].total
    checks = load_checks(exercise)
    assert {c.function for c in checks} == set(points)
    assert {f: sum(c.points for c in checks if c.function == f) for f in points} == points
    assert len({c.name for c in checks}) == len(checks)


@pytest.mark.parametrize("exercise", EXERCISES)
def test_solution_has_one_graded_cell_per_function(exercise):
    """Imports first (no answer there), then one graded cell per function with one answer and a docstring."""
    nb = nbformat.read(solution_path(exercise), as_version=4)
    graded = [c for c in nb.cells if c.cell_type == "code" and GRADED_TAG in c.metadata.get("tags", [])]
    assert "import torch" in graded[0].source and BEGIN_CODE not in graded[0].source  # imports first
    for function in EXERCISES[exercise].points:
        (cell,) = [c for c in graded if f"def {function}(" in c.source]
        assert cell.source.count(BEGIN_CODE) == 1 and '"""' in cell.source  # one answer, a docstring
    assert not any("import" in c.source for c in graded[1:])  # the functions use only the first cell's imports


@pytest.mark.parametrize("exercise", EXERCISES)
def test_exercise_is_in_sync(exercise):
    assert f"{exercise}.ipynb" not in sync_exercises(ROOT / "solutions", ROOT / "exercises", check=True)


@pytest.mark.parametrize("exercise", EXERCISES)
def test_solution_scores_full_marks(exercise):
    """Every check passes, and the score table ends with ``Total total/total``."""
    total = EXERCISES[exercise].total
    results = grade(solution_path(exercise))
    assert [(r.name, r.message) for r in results if r.points != r.max_points] == []
    table = io.StringIO()
    print_table(results, file=table)
    assert table.getvalue().strip().endswith(f"Total {total}/{total}")


@pytest.mark.parametrize("exercise", EXERCISES)
def test_exercise_scores_zero_on_every_check(exercise):
    """Every check of the stripped exercise scores 0 with "not implemented"."""
    results = grade(exercise_path(exercise))
    assert results and all(r.points == 0 for r in results)
    assert {r.message for r in results} == {"not implemented"}


@pytest.mark.parametrize("exercise, mistake", WRONG_CASES)
def test_wrong_implementation_loses_points_on_the_right_checks(exercise, mistake, tmp_path):
    function, body, expected_failures = EXERCISES[exercise].wrong[mistake]
    assert_loses_exactly(with_solution(solution_path(exercise), function, body, tmp_path), function,
                         expected_failures)


@pytest.mark.parametrize("exercise", EXERCISES)
def test_syntax_error_in_one_cell_keeps_the_other_marks(exercise, tmp_path):
    """A syntax error in one function's cell scores that function 0, without crashing, and keeps every other mark."""
    (function, other), total = EXERCISES[exercise].syntax_error, EXERCISES[exercise].total
    path = with_solution(solution_path(exercise), function, "return (x *", tmp_path)
    namespace = load_functions(path)
    assert function not in namespace and other in namespace
    assert any("SyntaxError" in msg for msg in namespace.errors.values())
    results = grade(path)
    mine = [r for r in results if r.name.startswith(f"{function}:")]
    assert mine and all(r.points == 0 and "SyntaxError" in r.message for r in mine)
    assert all(r.points == r.max_points for r in results if not r.name.startswith(f"{function}:"))
    assert sum(r.points for r in results) == total - sum(r.max_points for r in mine)


@pytest.mark.parametrize("exercise, function, module", IMPORT_CASES)
def test_functions_imported_from_alignlib_are_not_accepted(exercise, function, module, tmp_path):
    """Importing the reference ``module.function``, or wrapping it in a ``def`` of one's own, scores 0 on its
    checks and keeps every other function's marks (the disarmed reference is restored after each call)."""
    wrapper = (f"import {module} as _reference\n\ndef {function}(*args, **kwargs):\n"
               f"    return _reference.{function}(*args, **kwargs)")
    for source, message in ((f"from {module} import {function}", "def"), (wrapper, "alignlib's own implementation")):
        results = grade(with_cell_replaced(solution_path(exercise), function, source, tmp_path))
        mine = [r for r in results if r.name.startswith(f"{function}:")]
        assert mine and all(r.points == 0 and message in r.message for r in mine), [(r.name, r.message) for r in mine]
        assert all(r.points == r.max_points for r in results if r not in mine)


# ---------------------------------------------------------------- exercise-specific

def test_a_critique_prompt_built_on_alignlibs_conversation_is_not_accepted(tmp_path):
    """05: a body that calls alignlib.cai.conversation loses the critique_prompt check, with the reason."""
    body = (BLANKS + "from alignlib.cai import conversation\n"
            "return conversation(prompt, response) + f\"Critique request: {pair['critique_request']}\\n\\nCritique:\"")
    results = grade(with_solution(solution_path("05_cai"), "critique_prompt", body, tmp_path))
    lost = [r for r in results if r.points == 0]
    assert [r.name for r in lost] == [CRITIQUE] and "alignlib's own implementation" in lost[0].message


def test_the_right_bodies_of_the_templates_score_full_marks(tmp_path):
    """06: the templates above are only wrong where a mistake puts something in: filled in right, they pass."""
    for function, body in (("principle_prompt", PROMPT.format(rule=RULE, thought=THOUGHT_TURN)),
                           ("query", QUERY_BODY.format(text='f"{USER} {instruction.strip()}\\n\\n{THOUGHT}"')),
                           ("engraving_pairs", ENGRAVE.format(**ENGRAVE_RIGHT)),
                           ("novelty_filter", NOVELTY.format(**NOVELTY_RIGHT)),
                           ("true_scores", TRUE.format(template="query", result="torch.sigmoid(yes - no)")),
                           ("accuracy", ACCURACY.format(**ACCURACY_RIGHT))):
        results = grade(with_solution(solution_path("06_self_align"), function, body, tmp_path))
        assert [(r.name, r.message) for r in results if r.points != r.max_points] == []


def test_a_cell_that_patches_rouge_l_scores_zero(tmp_path):
    """06: rouge_l may be called, not replaced: a cell that swaps it for a constant would make any filter keep all."""
    solution = solution_path("06_self_align")
    nb = nbformat.read(solution, as_version=4)
    cell = next(c for c in nb.cells if "def novelty_filter(" in c.source)
    cell.source += "\n\nimport alignlib.self_align as sa\nsa.rouge_l = lambda a, b: 0.0"
    path = tmp_path / solution.name
    nbformat.write(nb, path)
    saved = self_align_reference.rouge_l
    try:
        results = grade(path)
    finally:   # undo the patch for the other tests in this process
        self_align_reference.rouge_l = saved
    assert all(r.points == 0 and "modified the grader" in r.message for r in results)
