"""Checks of exercise 02 (the two losses of RRHF, and a length penalty chosen by experiment), 12 points.

Every tensor is (Q, k): one row per query, one column per candidate response. Each check compares the
student's function with ``alignlib.rrhf`` on seeded random candidates, or tests a property the reference has
too: a loss of zero when the scores are already ordered like the rewards, no pair between tied rewards, a
batch of queries scoring the sum of its queries, the gradient. Inputs are cloned before each call, so a
function that edits its arguments in place cannot spoil the comparison.
"""
from __future__ import annotations

import torch

from alignlib import rrhf as ref

from alignlib import tiny_lab

from . import as_number, assert_close, check, generator, get_function, run_experiment

SHAPES = [(1, 2), (3, 4), (2, 6), (5, 3), (2, 1)]  # (Q, k) of the random batches; k = 1 has no pair


def random_valid(queries: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A random (Q, k) bool mask of valid candidates with at least one True per row."""
    valid = torch.rand(queries, k, generator=gen) < 0.7
    valid[torch.arange(queries), torch.randint(0, k, (queries,), generator=gen)] = True
    return valid


def describe(t: torch.Tensor) -> str:
    """A small tensor as nested lists with short numbers, for error messages."""
    if t.dtype == torch.bool:
        return str(t.int().tolist())
    return str([[round(v, 3) for v in row] for row in t.tolist()])


def masked_cases(gen: torch.Generator, integer_rewards: bool):
    """(scores or nll, rewards, valid or None) on every shape, once without a mask and once with one."""
    for queries, k in SHAPES:
        values = 2 * torch.randn(queries, k, generator=gen)
        if integer_rewards:  # few distinct values: ties are common, as with a rule-based reward
            rewards = torch.randint(0, 4, (queries, k), generator=gen).float()
        else:
            rewards = torch.randn(queries, k, generator=gen)
        yield values, rewards, None
        yield values, rewards, random_valid(queries, k, gen)


def call(student, values: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor | None):
    """Call the student's function on clones, leaving out ``valid`` when it is None (the default)."""
    if valid is None:
        return student(values.clone(), rewards.clone())
    return student(values.clone(), rewards.clone(), valid.clone())


# ---------------------------------------------------------------- rank_loss (6 points)

@check(points=2, function="rank_loss")
def rank_matches_reference(ns):
    """matches the reference on random (Q, k), with and without a valid mask"""
    student = get_function(ns, "rank_loss")
    for scores, rewards, valid in masked_cases(generator(500), integer_rewards=True):
        where = f"scores {describe(scores)}, rewards {describe(rewards)}"
        if valid is not None:
            where += f", valid {describe(valid)} (a pair needs both candidates valid)"
        assert_close(call(student, scores, rewards, valid), ref.rank_loss(scores, rewards, valid),
                     f"rank_loss with {where}")


@check(points=1, function="rank_loss")
def rank_zero_when_ordered(ns):
    """zero when each query's scores are ordered like its rewards"""
    student = get_function(ns, "rank_loss")
    gen = generator(510)
    rewards = torch.randn(4, 5, generator=gen)
    offsets = 3 * torch.randn(4, 1, generator=gen)       # each query's scores sit at a different level
    scores = 0.5 * rewards + offsets                     # within a query, higher reward -> higher score
    assert_close(student(scores.clone(), rewards.clone()), torch.tensor(0.0),
                 f"rank_loss with rewards {describe(rewards)} and scores {describe(scores)}, ordered like the "
                 f"rewards within every query (every hinge max(0, p_i - p_j) with r_i < r_j is 0; candidates of "
                 f"different queries are never compared)")


# (rewards, scores, L_rank) of one query, worked out by hand; tied rewards form no pair
TIE_CASES = [
    ([2.0, 2.0, 2.0], [0.3, -1.0, 2.0], 0.0),
    ([1.0, 1.0, 3.0], [0.5, -0.5, 0.0], 0.5),
    ([0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 2.0, -1.0], 1.0),
]


@check(points=1, function="rank_loss")
def rank_ties_form_no_pair(ns):
    """tied rewards form no pair"""
    student = get_function(ns, "rank_loss")
    for rewards, scores, expected in TIE_CASES:
        rewards, scores = torch.tensor([rewards]), torch.tensor([scores])
        assert_close(student(scores, rewards), torch.tensor(expected),
                     f"rank_loss of one query with rewards {describe(rewards)} and scores {describe(scores)} "
                     f"(only pairs with r_i < r_j count; candidates with equal rewards are not compared)")


@check(points=1, function="rank_loss")
def rank_sums_over_queries(ns):
    """a batch of queries gives the sum of the single-query losses"""
    student = get_function(ns, "rank_loss")
    gen = generator(530)
    for queries, k in ((2, 4), (3, 5)):
        scores = 2 * torch.randn(queries, k, generator=gen)
        rewards = torch.randint(0, 5, (queries, k), generator=gen).float()
        alone = [student(scores[q:q + 1].clone(), rewards[q:q + 1].clone()) for q in range(queries)]
        for q, out in enumerate(alone):
            assert isinstance(out, torch.Tensor), f"rank_loss should return a torch.Tensor, got {type(out).__name__}"
            assert out.dim() == 0, f"rank_loss of query {q} alone returned shape {tuple(out.shape)}, expected ()"
        assert_close(student(scores.clone(), rewards.clone()), torch.stack(alone).sum(),
                     f"rank_loss of {queries} queries at once against the sum of the {queries} losses of one "
                     f"query each, with scores {describe(scores)} and rewards {describe(rewards)} (pairs stay "
                     f"within a query, and the batch loss is a sum, not a mean)")


@check(points=1, function="rank_loss")
def rank_gradient(ns):
    """gradient with respect to the scores matches the reference"""
    student = get_function(ns, "rank_loss")
    gen = generator(540)
    scores = torch.randn(3, 5, generator=gen)
    rewards = torch.randn(3, 5, generator=gen)
    valid = random_valid(3, 5, gen)
    for mask in (None, valid):
        mine = scores.clone().requires_grad_()
        out = student(mine, rewards.clone()) if mask is None else student(mine, rewards.clone(), mask.clone())
        assert isinstance(out, torch.Tensor), f"rank_loss should return a torch.Tensor, got {type(out).__name__}"
        assert out.requires_grad, \
            "the loss carries no gradient to the scores (was something detached or turned into a Python float?)"
        (grad,) = torch.autograd.grad(out.sum(), mine)
        theirs = scores.clone().requires_grad_()
        (expected,) = torch.autograd.grad(ref.rank_loss(theirs, rewards, mask), theirs)
        assert_close(grad, expected, f"d rank_loss / d scores with scores {describe(scores)}, rewards "
                     f"{describe(rewards)}" + ("" if mask is None else f" and valid {describe(mask)}") +
                     " (each violated pair adds +1 to the worse candidate and -1 to the better one)")


# ---------------------------------------------------------------- best_response_loss (4 points)

@check(points=1, function="best_response_loss")
def best_matches_reference(ns):
    """matches the reference on random (Q, k), with and without a valid mask"""
    student = get_function(ns, "best_response_loss")
    for values, rewards, valid in masked_cases(generator(600), integer_rewards=False):
        nll = values.abs() + 0.1  # mean negative log-likelihoods per token are positive
        where = f"nll {describe(nll)}, rewards {describe(rewards)}"
        if valid is not None:
            where += f", valid {describe(valid)}"
        assert_close(call(student, nll, rewards, valid), ref.best_response_loss(nll, rewards, valid),
                     f"best_response_loss with {where}")


# (rewards, valid, index of the best valid candidate) of one query
INVALID_CASES = [
    ([5.0, 1.0, 2.0], [False, True, True], 2),
    ([0.0, 9.0, -1.0, 3.0], [True, False, True, False], 0),
    ([-2.0, -3.0, 7.0, 8.0], [True, True, False, False], 0),
]


@check(points=1, function="best_response_loss")
def best_skips_invalid(ns):
    """an invalid candidate is never the best, whatever its reward"""
    student = get_function(ns, "best_response_loss")
    for rewards, valid, best in INVALID_CASES:
        nll = torch.arange(1.0, len(rewards) + 1)[None]  # candidate i has NLL i + 1
        rewards, valid = torch.tensor([rewards]), torch.tensor([valid])
        assert_close(student(nll.clone(), rewards.clone(), valid.clone()), nll[0, best],
                     f"best_response_loss of one query with nll {describe(nll)}, rewards {describe(rewards)} and "
                     f"valid {describe(valid)} (the best valid candidate is number {best})")


# (rewards, index of the first candidate with the highest reward) of one query
TIE_BEST_CASES = [
    ([1.0, 3.0, 3.0, 0.0], 1),
    ([5.0, 5.0, 5.0], 0),
    ([0.0, 2.0, 1.0, 2.0, 2.0], 1),
]


@check(points=1, function="best_response_loss")
def best_first_on_ties(ns):
    """the first of several best candidates is the one trained on"""
    student = get_function(ns, "best_response_loss")
    for rewards, best in TIE_BEST_CASES:
        nll = torch.arange(1.0, len(rewards) + 1)[None]
        rewards = torch.tensor([rewards])
        assert_close(student(nll.clone(), rewards.clone()), nll[0, best],
                     f"best_response_loss of one query with nll {describe(nll)} and rewards {describe(rewards)} "
                     f"(on a tie the first best candidate, number {best}, is used)")


@check(points=1, function="best_response_loss")
def best_sums_with_gradient(ns):
    """sums over queries, with gradient to the best candidates only"""
    student = get_function(ns, "best_response_loss")
    gen = generator(630)
    nll = 3 * torch.rand(4, 3, generator=gen) + 0.1
    rewards = torch.randn(4, 3, generator=gen)
    best = rewards.argmax(-1)
    mine = nll.clone().requires_grad_()
    out = student(mine, rewards.clone())
    assert_close(out, nll[torch.arange(4), best].sum(),
                 f"best_response_loss of 4 queries with nll {describe(nll)} and rewards {describe(rewards)} (the "
                 f"sum over queries of the best candidate's NLL, not the mean)")
    assert out.requires_grad, "the loss carries no gradient to nll (was something detached or turned into a float?)"
    (grad,) = torch.autograd.grad(out, mine)
    expected = torch.zeros(4, 3)
    expected[torch.arange(4), best] = 1.0
    assert_close(grad, expected, f"d best_response_loss / d nll with rewards {describe(rewards)} (1 on each query's "
                 f"best candidate, 0 elsewhere)")


# ---------------------------------------------------------------- the graded experiment (2 points)

MAX_CORRELATION = 0.02


@check(points=2, function="choose_alpha")
def alpha_removes_length_bias(ns):
    """the chosen alpha makes the candidates' scores uncorrelated with their length (|r| <= 0.02)"""
    alpha = as_number(run_experiment(ns, "choose_alpha"), "choose_alpha()")
    r = tiny_lab.length_correlation(alpha)
    assert abs(r) <= MAX_CORRELATION, \
        f"at alpha = {alpha:.4g} the correlation of p_i with |y_i| is {r:+.3f}, not within +-{MAX_CORRELATION}"
