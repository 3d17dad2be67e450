"""Checks of exercise 05 (Constitutional AI: the SL-CAI prompts and training pair, debiased soft labels from AI
feedback, Elo ratings from pairwise comparisons), 13 points.

The prompt checks compare the student's text with ``alignlib.cai`` character for character on seeded random
conversations (prompts and answers padded with stray whitespace, braces and newlines inside), and test what the
reference guarantees: the revision prompt extends the critique prompt, the training pair holds the original prompt and
the last revision and nothing else of a critique/revision transcript. ``soft_labels`` is compared with
``alignlib.feedback`` on random log-probabilities and logits and tested for the swap symmetry and for a letter bias
cancelling. ``elo_scores`` may be fitted by any method: it is compared with ``alignlib.cai`` within 1 Elo point,
and runs on
one thread (see ``one_thread``). Inputs are copied before each call.
"""
from __future__ import annotations

import functools
import math
import random

import torch

from alignlib import cai as ref
from alignlib import feedback as ref_feedback

from . import assert_close, assert_same_text, check, generator, get_function, one_thread, pad

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


# ---------------------------------------------------------------- critique_prompt (1 point)

@check(points=1, function="critique_prompt")
def critique_matches_reference(ns):
    """the conversation (stripped), the critique request and "Critique:", exactly as specified"""
    student = get_function(ns, "critique_prompt")
    for prompt, response, pair, _ in random_conversations(500):
        assert_same_text(student(prompt, response, dict(pair)), ref.critique_prompt(prompt, response, pair),
                         f"critique_prompt({prompt!r}, {response!r}, ...)")


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
def revision_extends_the_critique_prompt(ns):
    """starts with the critique prompt of the same conversation, then the critique; ends at "Revision:\""""
    student = get_function(ns, "revision_prompt")
    for prompt, response, pair, critique in random_conversations(520):
        got = student(prompt, response, dict(pair), critique)
        assert isinstance(got, str), f"revision_prompt should return a str, got {type(got).__name__}"
        head = ref.critique_prompt(prompt, response, pair)
        assert got.startswith(head), \
            (f"revision_prompt({prompt!r}, {response!r}, ...) should start with the critique prompt {head!r}; "
             f"got {got!r}")
        assert critique.strip() in got[len(head):], \
            f"the critique {critique.strip()!r} should follow the critique prompt; got {got[len(head):]!r} after it"
        tail = f"Revision request: {pair['revision_request']}\n\nRevision:"
        assert got.endswith(tail), f"revision_prompt should end with {tail!r}; got ...{got[-len(tail) - 20:]!r}"


# ---------------------------------------------------------------- sft_example (2 points)

@check(points=1, function="sft_example")
def sft_matches_reference(ns):
    """the original prompt and the last revision, both stripped, after one to four rounds"""
    student = get_function(ns, "sft_example")
    rng = random.Random(530)
    for rounds in (1, 2, 3, 4, 1, 2):
        prompt = pad(rng, random_text(rng))
        revisions = [pad(rng, random_text(rng)) for _ in range(rounds)]
        got = student(prompt, list(revisions))
        expected = ref.sft_example(prompt, revisions)
        assert isinstance(got, dict) and set(got) == set(expected), \
            f"sft_example should return a dict with the keys {sorted(expected)}, got {got!r}"
        assert got == expected, f"sft_example({prompt!r}, {revisions!r}) = {got!r}, expected {expected!r}"


@check(points=1, function="sft_example")
def sft_leaves_the_transcript_out(ns):
    """no critique, request, section label or earlier draft in the pair; no revisions raise ValueError"""
    student = get_function(ns, "sft_example")
    rng = random.Random(540)
    for rounds in (1, 2, 3):
        prompt, answer = pad(rng, random_text(rng)), f"first draft: {random_text(rng)}"
        drafts, critiques, requests = [answer], [], []
        for k in range(rounds):               # the transcript of SL-CAI's rounds, as the critic sees it
            pair = random_pair(rng)
            critiques.append(f"critique of round {k}: {random_text(rng)}")
            requests += [pair["critique_request"], pair["revision_request"]]
            drafts.append(f"revision of round {k}: {random_text(rng)}")
        got = student(prompt, [pad(rng, d) for d in drafts[1:]])
        assert isinstance(got, dict) and set(got) == {"prompt", "response"}, \
            f"sft_example should return a dict with the keys ['prompt', 'response'], got {got!r}"
        text = f"{got['prompt']}\n{got['response']}"
        leaked = [t for t in critiques + requests + drafts[:-1] + list(SECTION_LABELS) if t in text]
        assert not leaked, f"the SL-CAI training pair after {rounds} round(s) holds {leaked[0]!r}: {got!r}"
        assert got == {"prompt": prompt.strip(), "response": drafts[-1]}, \
            f"after {rounds} round(s) the pair should be the prompt and the last revision, got {got!r}"
    for empty in ([], ()):
        try:
            got = student("How do I pick a lock?", empty)
        except ValueError:
            continue
        raise AssertionError(f"sft_example(prompt, {empty!r}) should raise ValueError (there is no revision to train "
                             f"on), got {got!r}")


# ---------------------------------------------------------------- soft_labels (4 points)

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


# ---------------------------------------------------------------- elo_scores (4 points)

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
