"""Checks of exercise 00 (log-probs of a response, and a temperature chosen by experiment), 12 points.

Each check compares the student's function with ``alignlib.logprobs`` on seeded random inputs laid out as
in alignlib (left-padded prompts, then responses, then right padding), or tests an invariant that the
reference satisfies too. Inputs are cloned before each call, so a function that edits its arguments in
place cannot spoil the comparison.
"""
from __future__ import annotations

import torch

from alignlib import logprobs as ref

from alignlib import tiny_lab

from . import as_number, assert_close, check, generator, get_function, rollout_masks, run_experiment

SHAPES = [(2, 6), (4, 10), (1, 3)]  # (B, T) of the random batches
VOCAB = 11


def random_token_logprobs(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Negative numbers like per-token log-probs, (B, T), column 0 set to 0 as in alignlib."""
    lp = -5 * torch.rand(batch, length, generator=gen)
    lp[:, 0] = 0.0
    return lp


# ---------------------------------------------------------------- token_logprobs_from_logits (4 points)

@check(points=2, function="token_logprobs_from_logits")
def token_logprobs_match_reference(ns):
    """matches the reference on random logits"""
    student = get_function(ns, "token_logprobs_from_logits")
    gen = generator(0)
    for batch, length in SHAPES:
        logits = 3 * torch.randn(batch, length, VOCAB, generator=gen)  # (B, T, V)
        ids = torch.randint(0, VOCAB, (batch, length), generator=gen)   # (B, T)
        assert_close(student(logits.clone(), ids.clone()), ref.token_logprobs_from_logits(logits, ids),
                     f"token_logprobs_from_logits on (B, T, V) = {(batch, length, VOCAB)} (column t holds "
                     f"log pi(x_t | x_<t), computed from the logits at position t-1)")


@check(points=1, function="token_logprobs_from_logits")
def token_logprobs_layout(ns):
    """shape (B, T), column 0 is 0, values <= 0"""
    student = get_function(ns, "token_logprobs_from_logits")
    gen = generator(1)
    for batch, length in [(3, 6), (2, 1)]:
        logits = torch.randn(batch, length, VOCAB, generator=gen)
        ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
        out = student(logits.clone(), ids.clone())
        assert isinstance(out, torch.Tensor), f"expected a torch.Tensor, got {type(out).__name__}"
        assert out.shape == (batch, length), \
            (f"on (B, T, V) = {(batch, length, VOCAB)} the result has shape {tuple(out.shape)}, "
             f"expected {(batch, length)}")
        assert torch.all(out[:, 0] == 0), \
            f"column 0 has no context and must be 0, got {[round(v, 4) for v in out[:, 0].tolist()]}"
        assert torch.all(out <= 1e-6), "log-probabilities are <= 0; got a positive value"


@check(points=1, function="token_logprobs_from_logits")
def token_logprobs_stable(ns):
    """stable for logits of size ~1000"""
    student = get_function(ns, "token_logprobs_from_logits")
    gen = generator(2)
    logits = 1000 * torch.randn(2, 5, VOCAB, generator=gen)  # softmax underflows to 0 for most tokens
    ids = torch.zeros(2, 5, dtype=torch.long)
    ids[:, 1:] = logits[:, :-1].argmin(-1)  # the least likely token after each position
    assert_close(student(logits.clone(), ids.clone()), ref.token_logprobs_from_logits(logits, ids),
                 "token_logprobs_from_logits with logits of size ~1000 (use log_softmax, not log of softmax)",
                 rtol=1e-4)


# ---------------------------------------------------------------- sequence_logprob (2 points)

@check(points=1, function="sequence_logprob")
def sequence_logprob_matches_reference(ns):
    """matches the reference on left-padded batches"""
    student = get_function(ns, "sequence_logprob")
    gen = generator(10)
    for batch, length in SHAPES:
        _, mask = rollout_masks(batch, length, gen)
        lp = random_token_logprobs(batch, length, gen)
        assert_close(student(lp.clone(), mask.clone()), ref.sequence_logprob(lp, mask),
                     f"sequence_logprob on (B, T) = {(batch, length)}")


@check(points=1, function="sequence_logprob")
def sequence_logprob_only_masked_count(ns):
    """only masked positions count"""
    student = get_function(ns, "sequence_logprob")
    gen = generator(11)
    _, mask = rollout_masks(4, 9, gen)
    lp = random_token_logprobs(4, 9, gen)
    noisy = torch.where(mask.bool(), lp, 1e6 * torch.randn(4, 9, generator=gen))  # huge values on padding
    assert_close(student(noisy, mask.clone()), ref.sequence_logprob(lp, mask),
                 "sequence_logprob with huge values at masked-out positions (they must not count)")
    position = torch.randint(1, 9, (4,), generator=gen)
    one = torch.zeros(4, 9, dtype=torch.long)
    one[torch.arange(4), position] = 1
    assert_close(student(lp.clone(), one), lp[torch.arange(4), position],
                 "sequence_logprob with a one-token mask (should be that token's log-prob)")


# ---------------------------------------------------------------- length_normalized_logprob (2 points)

@check(points=1, function="length_normalized_logprob")
def length_normalized_matches_reference(ns):
    """matches the reference, alpha = 1, 0.5, 2"""
    student = get_function(ns, "length_normalized_logprob")
    gen = generator(20)
    for batch, length in SHAPES:
        _, mask = rollout_masks(batch, length, gen)
        lp = random_token_logprobs(batch, length, gen)
        assert_close(student(lp.clone(), mask.clone()), ref.length_normalized_logprob(lp, mask),
                     f"length_normalized_logprob with the default alpha on (B, T) = {(batch, length)}")
        for alpha in (0.5, 2.0):
            assert_close(student(lp.clone(), mask.clone(), alpha=alpha),
                         ref.length_normalized_logprob(lp, mask, alpha=alpha),
                         f"length_normalized_logprob with alpha={alpha} on (B, T) = {(batch, length)}")


@check(points=1, function="length_normalized_logprob")
def length_normalized_alpha_zero(ns):
    """alpha = 0 gives the plain sum"""
    student = get_function(ns, "length_normalized_logprob")
    gen = generator(21)
    _, mask = rollout_masks(5, 8, gen)
    lp = random_token_logprobs(5, 8, gen)
    assert_close(student(lp.clone(), mask.clone(), alpha=0.0), ref.sequence_logprob(lp, mask),
                 "length_normalized_logprob with alpha=0 (|y|^0 = 1, so the score is the plain sum)")


# ---------------------------------------------------------------- masked_mean (2 points)

def random_mask(shape, gen: torch.Generator) -> torch.Tensor:
    """A random 0/1 int64 mask with at least one 1."""
    mask = (torch.rand(shape, generator=gen) < 0.5).long()
    mask.view(-1)[0] = 1
    return mask


@check(points=1, function="masked_mean")
def masked_mean_matches_reference(ns):
    """matches the reference (a 0-dim tensor)"""
    student = get_function(ns, "masked_mean")
    gen = generator(30)
    for shape in [(3, 7), (2, 4, 5), (1, 1)]:
        values = torch.randn(shape, generator=gen)
        mask = random_mask(shape, gen)
        assert_close(student(values.clone(), mask.clone()), ref.masked_mean(values, mask),
                     f"masked_mean on shape {shape} (the mean over the positions where mask is 1)")


@check(points=1, function="masked_mean")
def masked_mean_ignores_masked_values(ns):
    """huge values where mask is 0 do not count"""
    student = get_function(ns, "masked_mean")
    gen = generator(31)
    values = torch.randn(4, 6, generator=gen)
    mask = random_mask((4, 6), gen)
    huge = torch.where(mask.bool(), values, 1e30 * torch.randn(4, 6, generator=gen).sign())
    assert_close(student(huge, mask.clone()), ref.masked_mean(values, mask),
                 "masked_mean with values of +-1e30 where mask is 0 (they must not count)")


# ---------------------------------------------------------------- the graded experiment (2 points)

ENTROPY_TARGET, ENTROPY_TOLERANCE = 2.0, 0.05   # nats


@check(points=2, function="choose_temperature")
def temperature_reaches_entropy(ns):
    """the chosen temperature gives the tiny model a mean next-token entropy of 2.0 +- 0.05 nats"""
    t = as_number(run_experiment(ns, "choose_temperature"), "choose_temperature()")
    assert t > 0, f"choose_temperature() returned {t}; a temperature must be > 0"
    h = tiny_lab.mean_entropy(t)
    assert abs(h - ENTROPY_TARGET) <= ENTROPY_TOLERANCE, \
        (f"at temperature {t:.4g} the mean entropy is {h:.3f} nats, not within {ENTROPY_TOLERANCE} of "
         f"{ENTROPY_TARGET} (higher temperature, higher entropy)")
