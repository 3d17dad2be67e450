"""Checks of exercise 05 (Constitutional AI: the SL-CAI prompts and training pairs, debiased soft labels from AI
feedback, Elo ratings from pairwise comparisons, and a judge setup chosen by experiment), 18 points.

Exact text is worth 2 points (one per prompt, compared with ``alignlib.cai`` character for character on seeded random
conversations); the rest is behaviour: bad input refused, the SL-CAI pairs (one per round, as in Bai et al. 2022, or the
final revision only) holding nothing of the critique transcript, ``soft_labels`` against ``alignlib.feedback`` with
the swap symmetry, a letter bias cancelling and measured, ``elo_scores`` within 1 Elo point of ``alignlib.cai`` (any
optimiser; run on one thread, see ``one_thread``) with its anchor player at 0.

Each function is asked in a form that alignlib's does not have, so pasting its code does not pass (at least one
check each): the prompts refuse a missing request or a blank answer; ``sft_examples`` returns one pair per round;
``soft_labels`` also returns the letter bias; ``elo_scores`` takes an ``anchor``. ``ALIGNLIB_VERSIONS`` lists the
implementations the grader compares the student's syntax trees with (``checks.similarity``). Inputs are copied before
each call.
"""
from __future__ import annotations

import functools
import math
import random

import torch

from alignlib import cai as ref
from alignlib import feedback as ref_feedback

from alignlib import tiny_lab

from . import (as_number, assert_close, assert_same_text, check, generator, get_function, one_thread, pad, refuses,
               run_experiment)

ALIGNLIB_VERSIONS = {"critique_prompt": ("alignlib.cai:critique_prompt", "alignlib.cai:conversation"),
                     "revision_prompt": ("alignlib.cai:revision_prompt",),
                     "sft_examples": ("alignlib.cai:sft_example", "alignlib.checks.ex05_cai:reference_sft_examples"),
                     "soft_labels": ("alignlib.feedback:soft_labels",),
                     "elo_scores": ("alignlib.cai:elo_scores",)}

WORDS = ("the", "a", "lock", "door", "neighbour", "password", "recipe", "bleach", "ammonia", "car", "key", "ask",
         "quietly", "why", "never", "please", "how", "can", "I", "you", "should", "legal", "safe", "friend", "tonight",
         "{brace}", "50%", "\"quoted\"", "it's", "wifi", "router", "phone", "without", "them", "knowing", "help")
SECTION_LABELS = ("Human:", "Assistant:", "Critique request:", "Critique:", "Revision request:", "Revision:")
ELO_TOLERANCE = 1.0      # Elo points: any optimiser that converges is accepted


def random_text(rng: random.Random, low: int = 3, high: int = 16) -> str:
    """A few words with no whitespace at either end; sometimes a line break or a blank line inside."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    text = " ".join(words)
    if len(words) > 4 and rng.random() < 0.4:
        cut = rng.randint(1, len(words) - 1)
        text = " ".join(words[:cut]) + rng.choice(("\n", "\n\n")) + " ".join(words[cut:])
    return text + rng.choice((".", "?", "!", ""))


def random_pair(rng: random.Random) -> dict:
    return {"id": f"cr-{rng.randint(1, 99):02d}", "critique_request": random_text(rng) + "?",
            "revision_request": "Rewrite it: " + random_text(rng)}


def random_conversations(seed: int, n: int = 30):
    """(prompt, response, pair, critique) with stray whitespace around the prompt, the response and the critique."""
    rng = random.Random(seed)
    for _ in range(n):
        yield pad(rng, random_text(rng)), pad(rng, random_text(rng)), random_pair(rng), pad(rng, random_text(rng))


# ---------------------------------------------------------------- critique_prompt (2 points)

@check(points=1, function="critique_prompt")
def critique_matches_reference(ns):
    """the conversation (stripped), the critique request and "Critique:", exactly as specified"""
    student = get_function(ns, "critique_prompt")
    for prompt, response, pair, _ in random_conversations(500):
        assert_same_text(student(prompt, response, dict(pair)), ref.critique_prompt(prompt, response, pair),
                         f"critique_prompt({prompt!r}, {response!r}, ...)")


@check(points=1, function="critique_prompt")
def critique_refuses_bad_input(ns):
    """raises ValueError for a pair with no (or a blank) critique request, and for a blank prompt or response"""
    student = get_function(ns, "critique_prompt")
    pair = random_pair(random.Random(505))
    for args, why in ((("How?", "Like this.", {"id": "x", "revision_request": "Rewrite."}), "no critique_request"),
                      (("How?", "Like this.", {**pair, "critique_request": " \n"}), "a blank critique request"),
                      (("How?", "  \n", dict(pair)), "a blank response: nothing to critique"),
                      (("", "Like this.", dict(pair)), "a blank prompt")):
        refuses(student, args, why, f"critique_prompt{args!r}")


# ---------------------------------------------------------------- revision_prompt (2 points)

@check(points=1, function="revision_prompt")
def revision_matches_reference(ns):
    """the critique prompt, the critique (stripped), the revision request and "Revision:", exactly as specified"""
    student = get_function(ns, "revision_prompt")
    for prompt, response, pair, critique in random_conversations(510):
        assert_same_text(student(prompt, response, dict(pair), critique),
                         ref.revision_prompt(prompt, response, pair, critique),
                         f"revision_prompt({prompt!r}, {response!r}, ..., critique={critique!r})")


@check(points=1, function="revision_prompt")
def revision_refuses_bad_input(ns):
    """raises ValueError for a blank critique (a failed generation) and a pair with no revision request"""
    student = get_function(ns, "revision_prompt")
    pair = random_pair(random.Random(520))
    for args, why in ((("How?", "Like this.", dict(pair), " \n\t"), "a blank critique: the critic wrote nothing"),
                      (("How?", "Like this.", dict(pair), ""), "an empty critique"),
                      (("How?", "Like this.", {"id": "x", "critique_request": "Why?"}, "Harmful."),
                       "no revision_request"),
                      (("How?", "Like this.", {**pair, "revision_request": ""}, "Harmful."),
                       "a blank revision request")):
        refuses(student, args, why, f"revision_prompt{args!r}")


# ---------------------------------------------------------------- sft_examples (2 points)

def reference_sft_examples(prompt: str, revisions, every_round: bool = True) -> list[dict]:
    """The check's reference: one pair per round's revision (Bai et al. 2022 train on every revision), or the
    final revision only; prompt and revisions stripped; no revisions or a blank one refused."""
    if len(revisions) == 0:
        raise ValueError("no revisions")
    if any(not r.strip() for r in revisions):
        raise ValueError("a blank revision")
    chosen = list(revisions) if every_round else list(revisions)[-1:]
    return [{"prompt": prompt.strip(), "response": r.strip()} for r in chosen]


def sft_list(student, prompt, revisions, **kwargs) -> list:
    got = student(prompt, list(revisions), **kwargs)
    assert isinstance(got, list) and all(isinstance(x, dict) and set(x) == {"prompt", "response"} for x in got), \
        f"sft_examples should return a list of {{'prompt', 'response'}} dicts, got {got!r}"
    return got


@check(points=1, function="sft_examples")
def sft_one_pair_per_round(ns):
    """one pair per round's revision (the paper's recipe), or with every_round=False the last one only; stripped"""
    student = get_function(ns, "sft_examples")
    rng = random.Random(530)
    for rounds in (1, 2, 3, 4, 1, 2):
        prompt = pad(rng, random_text(rng))
        revisions = [pad(rng, random_text(rng)) for _ in range(rounds)]
        for kwargs in ({}, {"every_round": True}, {"every_round": False}):
            got, expected = sft_list(student, prompt, revisions, **kwargs), reference_sft_examples(prompt, revisions,
                                                                                                     **kwargs)
            assert got == expected, \
                f"sft_examples({prompt!r}, {revisions!r}, {kwargs}) = {got!r}, expected {expected!r}"


@check(points=1, function="sft_examples")
def sft_leaves_the_transcript_out(ns):
    """no critique, request or section label in the pairs; no revisions or a blank revision raise ValueError"""
    student = get_function(ns, "sft_examples")
    rng = random.Random(540)
    for rounds in (1, 2, 3):
        prompt, answer = pad(rng, random_text(rng)), f"first draft: {random_text(rng)}"
        drafts, critiques, requests = [answer], [], []
        for k in range(rounds):               # the transcript of SL-CAI's rounds, as the critic sees it
            pair = random_pair(rng)
            critiques.append(f"critique of round {k}: {random_text(rng)}")
            requests += [pair["critique_request"], pair["revision_request"]]
            drafts.append(f"revision of round {k}: {random_text(rng)}")
        for every_round in (True, False):
            got = sft_list(student, prompt, [pad(rng, d) for d in drafts[1:]], every_round=every_round)
            text = "\n".join(f"{x['prompt']}\n{x['response']}" for x in got)
            leaked = [t for t in critiques + requests + drafts[:1] + list(SECTION_LABELS) if t in text]
            assert not leaked, f"the SL-CAI training pairs after {rounds} round(s) hold {leaked[0]!r}: {got!r}"
            assert [x["response"] for x in got] == (drafts[1:] if every_round else drafts[-1:]), \
                f"after {rounds} round(s), every_round={every_round}: the responses should be " \
                f"{drafts[1:] if every_round else drafts[-1:]!r}, got {got!r}"
    for revisions, why in (([], "there is no revision to train on"), (("Fine.", " \n"), "round 2's revision is blank")):
        refuses(student, ("How do I pick a lock?", revisions), why, f"sft_examples(prompt, {revisions!r})")


# ---------------------------------------------------------------- soft_labels (5 points)

LABEL_KEYS = ("p", "p_first_order", "p_swapped")


def letter_inputs(batch: int, gen: torch.Generator, kind: str) -> torch.Tensor:
    """(B, 2) scores of the letters A and B: log-probabilities over a 40-token vocabulary, or raw logits."""
    if kind == "logprobs":
        return torch.randn(batch, 40, generator=gen).mul(2).log_softmax(-1)[:, :2]
    return torch.randn(batch, 2, generator=gen) * 3 + torch.randn(1, generator=gen) * 5


def labels(student, first: torch.Tensor, swapped: torch.Tensor) -> dict:
    out = student(first.clone(), swapped.clone())
    assert isinstance(out, dict) and set(LABEL_KEYS) <= set(out), \
        f"soft_labels should return a dict with the keys {list(LABEL_KEYS)}, got {type(out).__name__} " \
        f"{sorted(out) if isinstance(out, dict) else out!r}"
    return out


@check(points=1, function="soft_labels")
def soft_labels_match_reference(ns):
    """matches the reference on random (B, 2) log-probabilities and unnormalised logits"""
    student = get_function(ns, "soft_labels")
    gen = generator(550)
    for batch, kind in ((1, "logprobs"), (6, "logprobs"), (16, "logits"), (5, "logits")):
        first, swapped = letter_inputs(batch, gen, kind), letter_inputs(batch, gen, kind)
        got, expected = labels(student, first, swapped), ref_feedback.soft_labels(first, swapped)
        for key in LABEL_KEYS:
            assert_close(got[key], expected[key], f"soft_labels(...)[{key!r}] on {batch} pairs of {kind}")


@check(points=1, function="soft_labels")
def soft_labels_swap_symmetry(ns):
    """swapping the two arguments gives 1 - p, and p lies in [0, 1]"""
    student = get_function(ns, "soft_labels")
    gen = generator(560)
    for batch, kind in ((8, "logprobs"), (8, "logits")):
        first, swapped = letter_inputs(batch, gen, kind), letter_inputs(batch, gen, kind)
        p, q = labels(student, first, swapped)["p"], labels(student, swapped, first)["p"]
        assert_close(p + q, torch.ones(batch), f"p(first, swapped) + p(swapped, first) on {kind}")
        assert ((p >= 0) & (p <= 1)).all(), f"p should lie in [0, 1], got {p.tolist()}"


@check(points=1, function="soft_labels")
def soft_labels_cancel_a_letter_bias(ns):
    """a pure letter bias cancels: two identical answers give exactly 1/2"""
    student = get_function(ns, "soft_labels")
    gen = generator(570)
    for kind in ("logprobs", "logits"):
        bias = letter_inputs(10, gen, kind)       # identical answers: both orders read the same letter scores
        p = labels(student, bias, bias)["p"]
        assert_close(p, torch.full((10,), 0.5), f"soft_labels with identical answers and letter scores "
                     f"{[[round(x, 2) for x in row] for row in bias[:3].tolist()]}...", atol=1e-6, rtol=0)


@check(points=1, function="soft_labels")
def soft_labels_refuse_bad_shapes(ns):
    """raises ValueError unless both inputs have the same shape (B, 2)"""
    student = get_function(ns, "soft_labels")
    gen = generator(580)
    for a, b in (((4, 2), (3, 2)), ((4, 3), (4, 3)), ((2,), (2,)), ((4, 2, 1), (4, 2, 1)), ((2, 4), (2, 4))):
        try:
            student(torch.randn(a, generator=gen), torch.randn(b, generator=gen))
        except ValueError:
            continue
        raise AssertionError(f"soft_labels with inputs of shapes {a} and {b} should raise ValueError (both must be "
                             "(B, 2): the letters A and B of each pair)")


@check(points=1, function="soft_labels")
def soft_labels_measure_the_letter_bias(ns):
    """also returns "bias" (B,): the letter (A)'s log-odds shared by both orders, 1/2 (d_first + d_swapped)"""
    student = get_function(ns, "soft_labels")
    gen = generator(585)
    for kind in ("logprobs", "logits"):
        first, swapped = letter_inputs(9, gen, kind), letter_inputs(9, gen, kind)
        out = student(first.clone(), swapped.clone())
        assert isinstance(out, dict) and "bias" in out, \
            f"soft_labels should also return the key 'bias', got {sorted(out) if isinstance(out, dict) else out!r}"
        d_first, d_swapped = first[:, 0] - first[:, 1], swapped[:, 0] - swapped[:, 1]
        assert_close(out["bias"], 0.5 * (d_first + d_swapped), f"soft_labels(...)['bias'] on {kind}")
    delta = torch.randn(6, generator=gen)            # a judge with log-odds delta + 0.8 for whatever (A) shows
    first = torch.stack([delta + 0.8, torch.zeros(6)], -1)
    swapped = torch.stack([-delta + 0.8, torch.zeros(6)], -1)
    assert_close(student(first, swapped)["bias"], torch.full((6,), 0.8),
                 "soft_labels(...)['bias'] of a judge that adds 0.8 nats to the letter (A)")


# ---------------------------------------------------------------- elo_scores (5 points)

def random_tournament(rng: random.Random, players: list, games: int, soft: bool) -> list[tuple]:
    """Outcomes drawn from Bradley-Terry strengths; a fifth are ties, and with ``soft`` some scores in between."""
    strength = {p: rng.gauss(0, 1.2) for p in players}
    outcomes = []
    for _ in range(games):
        a, b = rng.sample(players, 2)
        win = 1 / (1 + math.exp(strength[b] - strength[a]))
        if rng.random() < 0.2:
            s = 0.5
        elif soft and rng.random() < 0.3:
            s = round(rng.random(), 2)
        else:
            s = float(rng.random() < win)
        outcomes.append((a, b, s))
    return outcomes


def scores(student, outcomes, players, **kwargs) -> dict:
    got = student(list(outcomes), list(players), **kwargs)
    assert isinstance(got, dict) and set(got) == set(players), \
        f"elo_scores should return a dict with one score per player {list(players)}, got {got!r}"
    values = {}
    for p, v in got.items():
        v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), \
            f"elo_scores should give each player a finite number, got {p!r}: {v!r}"
        values[p] = float(v)
    return values


def on_one_thread(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with one_thread():
            return fn(*args, **kwargs)
    return call


reference_elo = on_one_thread(ref.elo_scores)


def rounded(d: dict) -> dict:
    return {k: round(v, 1) for k, v in d.items()}


@check(points=1, function="elo_scores")
def elo_matches_reference(ns):
    """within 1 Elo point of the reference on random tournaments, with players[0] at 0"""
    student = on_one_thread(get_function(ns, "elo_scores"))
    rng = random.Random(590)
    for players, games, prior, soft in ((["p1", "p0"], 15, None, False), (["p2", "p0", "p1"], 40, None, True),
                                        (["m3", "m0", "m4", "m1", "m2"], 90, None, False),
                                        (["x", "y", "z", "w"], 60, 0.1, True)):
        outcomes = random_tournament(rng, players, games, soft)
        kwargs = {} if prior is None else {"prior": prior}
        got, expected = scores(student, outcomes, players, **kwargs), reference_elo(outcomes, players, **kwargs)
        assert abs(got[players[0]]) < 1e-6, \
            f"players[0] = {players[0]!r} should have Elo 0 (the scale is anchored on it), got {rounded(got)}"
        worst = max(players, key=lambda p: abs(got[p] - expected[p]))
        assert abs(got[worst] - expected[worst]) <= ELO_TOLERANCE, \
            f"elo_scores on {games} games between {players}" + (f" with prior={prior}" if prior else "") + \
            f": got {rounded(got)}, the maximum of the penalised likelihood is at {rounded(expected)}"


@check(points=1, function="elo_scores")
def elo_known_values(ns):
    """a 75% record is 400 log10(3) = 190.8 points ahead (prior=0); tied players score the same"""
    student = on_one_thread(get_function(ns, "elo_scores"))
    gap = 400 * math.log10(3)
    for outcomes in ([("a", "b", 1.0)] * 3 + [("a", "b", 0.0)], [("b", "a", 0.0), ("a", "b", 1.0)] * 6
                     + [("b", "a", 1.0), ("a", "b", 0.0)] * 2, [("a", "b", 0.75)] * 5):
        got = scores(student, outcomes, ["b", "a"], prior=0.0)
        assert abs(got["a"] - got["b"] - gap) <= ELO_TOLERANCE, \
            f"a wins 75% of its games against b: Elo(a) - Elo(b) should be {gap:.1f} with prior=0, got " \
            f"{got['a'] - got['b']:.1f} ({len(outcomes)} outcomes like {outcomes[0]})"
    ties = [("x", "y", 0.5)] * 4 + [("y", "z", 1.0), ("z", "y", 1.0), ("x", "z", 0.5), ("z", "x", 0.5)]
    for prior in (None, 0.0):
        got = scores(student, ties, ["x", "y", "z"], **({} if prior is None else {"prior": prior}))
        assert max(got.values()) - min(got.values()) <= ELO_TOLERANCE, \
            f"every game is a tie or balanced by a return game, so all three should score the same; got {rounded(got)}"


@check(points=1, function="elo_scores")
def elo_sweep_stays_finite(ns):
    """a clean sweep stays finite with the default prior (the reference's gap within 1 Elo point)"""
    student = on_one_thread(get_function(ns, "elo_scores"))
    for outcomes, players in (([("w", "l", 1.0)] * 10, ["l", "w"]),
                              ([("a", "b", 1.0)] * 4 + [("b", "c", 1.0)] * 6 + [("c", "a", 0.0)] * 2, ["c", "b", "a"])):
        got, expected = scores(student, outcomes, players), reference_elo(outcomes, players)
        for p in players[1:]:
            gap, expected_gap = got[p] - got[players[0]], expected[p] - expected[players[0]]
            assert abs(gap - expected_gap) <= ELO_TOLERANCE, \
                f"a clean sweep ({len(outcomes)} outcomes like {outcomes[0]}), default prior: Elo({p!r}) - " \
                f"Elo({players[0]!r}) should be {expected_gap:.1f}, got {gap:.1f}"


@check(points=1, function="elo_scores")
def elo_anchor_player(ns):
    """anchor names the player rated 0 (default players[0]); the differences do not change; a stranger is refused"""
    student = on_one_thread(get_function(ns, "elo_scores"))
    rng = random.Random(595)
    players = ["m0", "m1", "m2", "m3"]
    outcomes = random_tournament(rng, players, 50, soft=True)
    expected = reference_elo(outcomes, players)
    for anchor in ("m2", "m0", "m3"):
        got = scores(student, outcomes, players, anchor=anchor)
        assert abs(got[anchor]) < 1e-6, \
            f"elo_scores(..., anchor={anchor!r}) should rate {anchor!r} 0, got {rounded(got)}"
        for p in players:
            want = expected[p] - expected[anchor]
            assert abs(got[p] - want) <= ELO_TOLERANCE, \
                f"elo_scores(..., anchor={anchor!r}): Elo({p!r}) should be {want:.1f}, got {got[p]:.1f}"
    try:
        got = student(list(outcomes), list(players), anchor="nobody")
    except ValueError:
        return
    raise AssertionError(f"elo_scores(..., anchor='nobody') should raise ValueError (not one of {players}), "
                         f"got {got!r}")


@check(points=1, function="elo_scores")
def elo_refuses_bad_input(ns):
    """raises ValueError for an outcome naming a player not in players, and for no outcomes"""
    student = on_one_thread(get_function(ns, "elo_scores"))
    for outcomes, players, why in (([("a", "b", 1.0), ("a", "c", 1.0)], ["a", "b"], "'c' is not in players"),
                                   ([("z", "a", 0.5)], ["a", "b"], "'z' is not in players"),
                                   ([], ["a", "b"], "there are no outcomes")):
        try:
            got = student(list(outcomes), list(players))
        except ValueError:
            continue
        raise AssertionError(f"elo_scores({outcomes}, {players}) should raise ValueError ({why}), got {got!r}")


# ---------------------------------------------------------------- the graded experiment (2 points)

MIN_KEPT = 0.5           # the setup must keep at least half of the AI-labelled pairs
ACCURACY_TOLERANCE = 0.01


@functools.lru_cache(maxsize=1)
def best_judge_accuracy() -> float:
    """The best validated accuracy over setups (both orders or one, margins 0 to 0.499 by 0.001) that keep enough."""
    return max(r["accuracy"] for r in (tiny_lab.judge_labels(b, m / 1000) for b in (True, False) for m in range(500))
               if r["kept"] >= MIN_KEPT)


@check(points=2, function="choose_judge_setup")
def judge_setup_for_the_preference_data(ns):
    """the (both_orders, margin) chosen keeps >= half of the pairs with an accuracy within 0.01 of the best setup's"""
    chosen = run_experiment(ns, "choose_judge_setup")
    assert isinstance(chosen, (tuple, list)) and len(chosen) == 2, \
        f"choose_judge_setup() should return (both_orders, margin), got {chosen!r}"
    both_orders, margin = chosen
    assert isinstance(both_orders, bool), f"both_orders should be True or False, got {both_orders!r}"
    margin = as_number(margin, "the margin")
    assert 0 <= margin < 0.5, f"the margin must lie in [0, 0.5), got {margin}"
    got, best = tiny_lab.judge_labels(both_orders, margin), best_judge_accuracy()
    assert got["kept"] >= MIN_KEPT, \
        f"both_orders={both_orders}, margin={margin:.3f} keeps {got['kept']:.1%} of the pairs, fewer than " \
        f"{MIN_KEPT:.0%}"
    assert got["accuracy"] >= best - ACCURACY_TOLERANCE, \
        f"both_orders={both_orders}, margin={margin:.3f}: validated accuracy {got['accuracy']:.3f}; the best setup " \
        f"that keeps {MIN_KEPT:.0%} of the pairs reaches {best:.3f}"
