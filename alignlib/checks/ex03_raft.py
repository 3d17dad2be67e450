"""Checks of exercise 03 (RAFT's ranking step and the distinct-n diversity metric, and a best-of-k budget chosen by
experiment), 12 points.

Rewards are laid out as in ``alignlib.raft``: row p of a (P, k) tensor holds the k samples of prompt p, and a
sample's flat index is p * k + j (row-major, the order in which ``generate`` returns them). Each check compares
the student's function with ``alignlib.raft`` on seeded random inputs, or tests a property the reference has
too: flat indices, ties going to the earlier sample, exactly the top 1/k kept, the error when nothing would be
kept, lower-casing and n-grams that never cross from one text to the next. Inputs are cloned before each call.
"""
from __future__ import annotations

import torch

from alignlib import raft as ref

from alignlib import tiny_lab

from . import check, generator, get_function, run_experiment

LOCAL_SHAPES = [(4, 3), (1, 5), (6, 1), (3, 8), (1, 1)]          # (P, k)
GLOBAL_CASES = [((4, 3), 3), ((10,), 2), ((5, 3), 4), ((3, 3), 9), ((7, 2), 2), ((2, 6), 5)]  # (shape, k)
WORDS = ["the", "film", "was", "good", "bad", "plot", "and", "very"]


def describe(t: torch.Tensor) -> str:
    """A small tensor as (nested) lists with short numbers, for error messages."""
    values = t.tolist()
    if t.dim() == 1:
        return str([round(v, 3) for v in values])
    return str([[round(v, 3) for v in row] for row in values])


def as_indices(out, what: str) -> list[int]:
    """The indices a selection returned: a 1-D integer tensor, as a list."""
    assert isinstance(out, torch.Tensor), f"{what} should return a torch.Tensor of indices, got {type(out).__name__}"
    assert not out.is_floating_point() and not out.is_complex() and out.dtype != torch.bool, \
        f"{what} should return integer (int64) indices, got dtype {out.dtype}"
    assert out.dim() == 1, f"{what} should return a 1-D tensor of indices, got shape {tuple(out.shape)}"
    return out.tolist()


def select(student, rewards: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Call ``select_local(rewards)`` or ``select_global(rewards, k)`` on a clone."""
    return student(rewards.clone()) if k is None else student(rewards.clone(), k)


# ---------------------------------------------------------------- select_local (3 points)

@check(points=1, function="select_local")
def local_matches_reference(ns):
    """matches the reference on random rewards (P, k)"""
    student = get_function(ns, "select_local")
    gen = generator(700)
    for shape in LOCAL_SHAPES:
        rewards = torch.randn(shape, generator=gen)
        got = as_indices(select(student, rewards), "select_local")
        expected = ref.select_local(rewards).tolist()
        assert got == expected, f"select_local with rewards {describe(rewards)} returned {got}, expected {expected}"


@check(points=1, function="select_local")
def local_flat_indices(ns):
    """returns flat indices p * k + j, one per prompt, into that prompt's row"""
    student = get_function(ns, "select_local")
    gen = generator(710)
    rewards = torch.randn(5, 4, generator=gen)
    rewards[:, 2] += 10.0  # column 2 is the best of every row
    got = as_indices(select(student, rewards), "select_local")
    names = [f"prompt {p} sample {j}" for p in range(5) for j in range(4)]  # the flat list of samples
    assert len(got) == 5, f"select_local on 5 prompts should keep 5 samples (one per prompt), got {len(got)}"
    for p, i in enumerate(got):
        assert 0 <= i < 20 and i // 4 == p, \
            (f"select_local on rewards (5, 4) whose best sample is column 2 of every row returned {got}; entry {p} "
             f"should be the flat index {p} * 4 + 2 = {4 * p + 2} of prompt {p}'s best sample in the 20 samples, "
             f"not a column number")
        assert names[i] == f"prompt {p} sample 2", \
            f"select_local entry {p} is {i}, which is {names[i]!r} of the flat samples; expected {4 * p + 2}"


# (rewards (P, k), the column of each row's first best sample)
LOCAL_TIES = [
    ([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]], [1, 0]),
    ([[0.5, 0.0, 0.5, 0.5]], [0]),
    ([[-1.0, 4.0, 0.0, 4.0], [7.0, 1.0, 7.0, 7.0], [0.0, 0.0, 2.0, 2.0]], [1, 0, 2]),
]


@check(points=1, function="select_local")
def local_ties_to_first(ns):
    """ties go to the first (earliest) sample of the prompt"""
    student = get_function(ns, "select_local")
    for rewards, expected in LOCAL_TIES:
        rewards = torch.tensor(rewards)
        k = rewards.shape[1]
        got = as_indices(select(student, rewards), "select_local")
        columns = [i % k for i in got]  # which sample of its prompt each index picks
        assert len(got) == len(expected) and columns == expected, \
            (f"select_local with rewards {describe(rewards)} returned {got}, which picks the samples {columns} of "
             f"the prompts; expected the samples {expected} (among equal rewards the earlier sample wins)")


# ---------------------------------------------------------------- select_global (4 points)

@check(points=1, function="select_global")
def global_matches_reference(ns):
    """matches the reference on random rewards, sorted flat indices"""
    student = get_function(ns, "select_global")
    gen = generator(800)
    for shape, k in GLOBAL_CASES:
        rewards = torch.randn(shape, generator=gen)
        got = as_indices(select(student, rewards, k), "select_global")
        expected = ref.select_global(rewards, k).tolist()
        where = f"select_global with k={k} and rewards {describe(rewards)}"
        if sorted(got) == expected and got != expected:
            raise AssertionError(f"{where} returned the right samples {got}, but not in increasing order; return "
                                 f"them sorted: {expected}")
        assert got == expected, f"{where} returned {got}, expected {expected}"


@check(points=1, function="select_global")
def global_keeps_top_fraction(ns):
    """keeps exactly the N // k highest rewards"""
    student = get_function(ns, "select_global")
    gen = generator(810)
    for shape, k in GLOBAL_CASES + [((4,), 4), ((2, 3), 6)]:
        rewards = torch.randn(shape, generator=gen)
        flat = rewards.flatten()
        n = flat.numel()
        got = as_indices(select(student, rewards, k), "select_global")
        where = f"select_global with k={k} on {n} samples, rewards {describe(rewards)}"
        assert len(got) == n // k, f"{where} kept {len(got)} samples {got}; the top 1/k is N // k = {n // k}"
        assert len(set(got)) == len(got) and all(0 <= i < n for i in got), \
            f"{where} returned {got}: the indices must be distinct flat indices in [0, {n})"
        dropped = [i for i in range(n) if i not in set(got)]
        if got and dropped:
            worst_kept, best_dropped = flat[got].min().item(), flat[dropped].max().item()
            assert worst_kept >= best_dropped, \
                (f"{where} kept {got}, whose lowest reward {worst_kept:.3f} is below the reward {best_dropped:.3f} "
                 f"of a sample it dropped")


# (rewards, k, the kept flat indices): the last kept place is shared by equal rewards
GLOBAL_TIES = [
    ([1.0, 3.0, 2.0, 2.0, 0.0, 2.0, 2.0, 1.0], 2, [1, 2, 3, 5]),
    ([0.5, 0.5, 0.5, 0.5, 0.5, 0.5], 3, [0, 1]),
    ([[0.2, 0.7, 0.7], [0.7, 0.1, 0.7]], 3, [1, 2]),
    ([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], 2, [0, 3, 4]),
]


@check(points=1, function="select_global")
def global_ties_to_earlier(ns):
    """ties go to the earlier sample"""
    student = get_function(ns, "select_global")
    for rewards, k, expected in GLOBAL_TIES:
        rewards = torch.tensor(rewards)
        got = as_indices(select(student, rewards, k), "select_global")
        assert sorted(got) == expected, \
            (f"select_global with k={k} and rewards {describe(rewards)} kept {sorted(got)}, expected {expected} "
             f"(among equal rewards the sample with the lower flat index is kept first)")


@check(points=1, function="select_global")
def global_raises_when_too_few(ns):
    """raises ValueError when there are fewer than k samples"""
    student = get_function(ns, "select_global")
    for shape, k in (((2,), 3), ((1, 4), 5), ((0,), 1)):
        rewards = torch.zeros(shape)
        try:
            out = student(rewards.clone(), k)
        except ValueError:
            continue
        raise AssertionError(f"select_global with k={k} on {rewards.numel()} samples returned {out!r}; the top "
                             f"1/k would be empty, so it should raise ValueError")


# ---------------------------------------------------------------- distinct_n (3 points)

def random_texts(gen: torch.Generator) -> list[str]:
    """1 to 5 texts of lower-case words separated by single spaces; the first has at least 3 words."""
    count = int(torch.randint(1, 6, (1,), generator=gen))
    texts = []
    for t in range(count):
        length = int(torch.randint(3 if t == 0 else 1, 8, (1,), generator=gen))
        ids = torch.randint(0, len(WORDS), (length,), generator=gen).tolist()
        texts.append(" ".join(WORDS[i] for i in ids))
    return texts


def as_number(out, what: str) -> float:
    """What distinct_n returned, as a float (a Python number or a one-element tensor)."""
    try:
        return float(out)
    except (TypeError, ValueError):
        raise AssertionError(f"{what} should return a float, got {type(out).__name__}") from None


def assert_distinct(student, texts: list[str], n: int, expected: float, why: str = "") -> None:
    what = f"distinct_n({texts!r}, n={n})"
    got = as_number(student(list(texts), n), what)
    assert abs(got - expected) <= 1e-9, f"{what} returned {got:.6g}, expected {expected:.6g}{why}"


@check(points=1, function="distinct_n")
def distinct_matches_reference(ns):
    """matches the reference on random texts, n = 1, 2, 3"""
    student = get_function(ns, "distinct_n")
    gen = generator(900)
    for _ in range(6):
        texts = random_texts(gen)
        for n in (1, 2, 3):
            assert_distinct(student, texts, n, ref.distinct_n(texts, n))
    texts = random_texts(gen)
    got = as_number(student(list(texts)), f"distinct_n({texts!r})")
    assert abs(got - ref.distinct_n(texts, 2)) <= 1e-9, \
        f"distinct_n({texts!r}) with the default n returned {got:.6g}, expected {ref.distinct_n(texts, 2):.6g} (n = 2)"


# (texts, n): upper case and runs of whitespace must change nothing (one text, or n = 1, so that n-grams
# across texts cannot matter here)
CASE_CASES = [
    (["The film was GOOD the Film was good"], 2),
    (["Good  good\tGOOD", "very\ngood"], 1),
    ([" The plot  and\tthe PLOT "], 2),
]


@check(points=1, function="distinct_n")
def distinct_case_and_whitespace(ns):
    """lower-cases the words and splits on any whitespace"""
    student = get_function(ns, "distinct_n")
    for texts, n in CASE_CASES:
        assert_distinct(student, texts, n, ref.distinct_n(texts, n),
                        " (words are compared lower-cased, and texts split on any run of whitespace, as "
                        "str.split() with no argument does)")


# (texts, n, expected, why)
WITHIN_CASES = [
    (["good film", "good film", "good film"], 2, 1 / 3, " (3 bigrams, all the same; no bigram spans two texts)"),
    (["the plot", "the plot was bad"], 2, 3 / 4, " (bigrams: the plot | the plot, plot was, was bad)"),
    (["too short", "x"], 3, 0.0, " (no text has 3 words: no n-gram at all gives 0.0)"),
    ([], 2, 0.0, " (no texts: 0.0)"),
    (["", "one"], 2, 0.0, " (no text has 2 words: 0.0)"),
]


@check(points=1, function="distinct_n")
def distinct_within_texts(ns):
    """counts n-grams within each text only, 0.0 when there are none"""
    student = get_function(ns, "distinct_n")
    for texts, n, expected, why in WITHIN_CASES:
        assert_distinct(student, texts, n, expected, why)


# ---------------------------------------------------------------- the graded experiment (2 points)

FLUENCY_FLOOR = -3.0   # mean log-prob per token of the kept samples under the model at temperature 1
REWARD_TARGET = 0.2    # mean vowel fraction of the kept samples


@check(points=2, function="choose_k_and_temperature")
def best_of_k_under_fluency_floor(ns):
    """the chosen (k, temperature) keeps samples with reward >= 0.2 and fluency >= -3.0 nats per token"""
    out = run_experiment(ns, "choose_k_and_temperature")
    assert isinstance(out, tuple) and len(out) == 2, \
        f"choose_k_and_temperature() should return a tuple (k, temperature), got {out!r}"
    k, t = out
    assert isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 8, f"k should be an int from 1 to 8, got {k!r}"
    t = as_number(t, "the temperature")
    assert t > 0, f"the temperature must be > 0, got {t}"
    got = tiny_lab.best_of_k(k, t)
    assert got["fluency"] >= FLUENCY_FLOOR, \
        f"k = {k}, temperature {t:.3g}: fluency {got['fluency']:.2f} is below the floor {FLUENCY_FLOOR}"
    assert got["reward"] >= REWARD_TARGET, \
        f"k = {k}, temperature {t:.3g}: reward {got['reward']:.3f} is below the target {REWARD_TARGET}"
