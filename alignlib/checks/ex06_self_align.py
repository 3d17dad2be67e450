"""Checks of exercise 06 (principle-driven self-alignment: the shared prompt, the query and the engraving data; the
novelty filter of self-instruct; multiple-choice scoring by the probability of "True" and its accuracy; a novelty
threshold chosen by experiment), 20 points.

Exact text is worth 2 points (the shared prompt and the query, compared with ``alignlib.self_align`` character for
character on seeded random principles and exemplars with stray whitespace around every field); the rest is behaviour:
an ablation's first n principles, batches and blank instructions, engraving pairs that hold no principle, title,
exemplar, thought or repeated sentence, the novelty filter (self-instruct's rule: reject a ROUGE-L above the
threshold; compared with this module's reference on random instruction lists full of near-duplicates, students may
call ``alignlib.self_align.rouge_l``, which is not graded; when several texts tie for the closest match, any is
accepted), ``true_scores`` on the tiny random model behind a ``PrefixCache`` of the reference header (within 1e-5 of
``alignlib.multiple_choice``, one question or a batch), ``accuracy`` on random score rows with ties (the first
choice, or split between the tied choices).

Each function is asked in a form that alignlib's does not have, so pasting its code does not pass (at least one check
each); ``ALIGNLIB_VERSIONS`` lists the implementations the grader compares the student's syntax trees with
(``checks.similarity``). Inputs are copied before each call.
"""
from __future__ import annotations

import functools
import math
import random
import re

import torch

from alignlib import multiple_choice as ref_mc
from alignlib import self_align as ref

from alignlib import tiny_lab

from . import (as_number, assert_close, assert_same_text, check, get_function, one_thread, pad, refuses,
               run_experiment)

ALIGNLIB_VERSIONS = {"principle_prompt": ("alignlib.self_align:principle_prompt",),
                     "query": ("alignlib.self_align:query",),
                     "engraving_pairs": ("alignlib.self_align:engraving_pairs",
                                         "alignlib.checks.ex06_self_align:reference_engraving_pairs"),
                     "novelty_filter": ("alignlib.self_align:novelty_filter",),
                     "true_scores": ("alignlib.multiple_choice:true_scores",),
                     "accuracy": ("alignlib.multiple_choice:accuracy",)}

# rouge_l builds its scorer the first time it runs and keeps it in a module global of alignlib.self_align, which the
# grader fingerprints before the student's cells run: build it now, or the first call would look like tampering.
ref.rouge_l("warm up", "warm up")

WORDS = ("write", "a", "short", "poem", "about", "the", "sea", "explain", "how", "vaccines", "work", "list", "three",
         "reasons", "to", "learn", "history", "give", "me", "recipe", "for", "bread", "what", "is", "capital", "of",
         "peru", "summarise", "this", "news", "story", "plan", "trip", "rome", "on", "budget", "{name}", "50%",
         "\"quoted\"", "it's", "P-value", "why", "do", "cats", "purr", "can", "you", "help", "with", "my", "essay")
TITLES = ("Ethical", "Informative", "Helpful", "Premise Check", "Balanced", "Candid", "Step by Step", "Clear",
          "Knowledge Cutoff", "Operational Limits", "Privacy", "Numerical Care", "Multi-aspect", "Gratitude")
TOLERANCE = 1e-5          # true_scores: float32 forward passes of the same model on the same tokens


def random_text(rng: random.Random, low: int = 3, high: int = 12) -> str:
    """A few words with no whitespace at either end; sometimes a line break inside."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    text = " ".join(words)
    if len(words) > 4 and rng.random() < 0.3:
        cut = rng.randint(1, len(words) - 1)
        text = " ".join(words[:cut]) + "\n" + " ".join(words[cut:])
    return text + rng.choice((".", "?", "!", ""))


def random_data(rng: random.Random, verbose: bool = False) -> ref.SelfAlignData:
    """2-6 principles (ids P01.. in a random order, titles and rules padded) and 1-3 exemplars whose thoughts cite
    them; with ``verbose`` also seeds, a question type and a verbose prompt, which the shared prompt must leave out."""
    ids = rng.sample(range(1, 17), rng.randint(2, 6))
    principles = tuple({"id": f"P{i:02d}", "title": rng.choice(TITLES), "rule": pad(rng, "The assistant should "
                                                                                   + random_text(rng))} for i in ids)
    exemplars = []
    for k in range(rng.randint(1, 3)):
        cited = rng.choice(principles)
        exemplars.append({"id": f"E{k + 1}", "instruction": pad(rng, random_text(rng)),
                          "thought": pad(rng, f"by {cited['id']} ({cited['title']}) I {random_text(rng)}"),
                          "answer": pad(rng, random_text(rng, 5, 14))})
    extra = {}
    if verbose:
        extra = {"seeds": ({"id": "S1", "instruction": "seed: " + random_text(rng)},),
                 "question_types": ({"id": "Q1", "type": "question type: " + random_text(rng, 2, 4),
                                     "description": random_text(rng), "example": random_text(rng)},),
                 "verbose_prompt": "verbose prompt: " + random_text(rng)}
    return ref.SelfAlignData(principles=principles, exemplars=tuple(exemplars), **extra)


def copy_data(data: ref.SelfAlignData) -> ref.SelfAlignData:
    return ref.SelfAlignData(tuple(dict(p) for p in data.principles), tuple(dict(e) for e in data.exemplars),
                             tuple(dict(s) for s in data.seeds), tuple(dict(q) for q in data.question_types),
                             data.verbose_prompt)


# ---------------------------------------------------------------- principle_prompt (2 points)

@check(points=1, function="principle_prompt")
def prompt_matches_reference(ns):
    """the intro, the rules and every exemplar with its thoughts, exactly as specified"""
    student = get_function(ns, "principle_prompt")
    rng = random.Random(600)
    for _ in range(25):
        data = random_data(rng, verbose=rng.random() < 0.3)
        assert_same_text(student(copy_data(data)), ref.principle_prompt(data),
                         f"principle_prompt(...) with {len(data.principles)} principles and {len(data.exemplars)} "
                         "exemplar(s)")


@check(points=1, function="principle_prompt")
def prompt_keeps_the_first_principles(ns):
    """num_principles=n keeps the first n rules and every exemplar (an ablation); n outside 1..len raises ValueError"""
    student = get_function(ns, "principle_prompt")
    rng = random.Random(610)
    for _ in range(10):
        data = random_data(rng, verbose=True)
        full, head = ref.principle_prompt(data), ref.INTRO + "Rules:\n"
        lines = [f"{p['id']} ({p['title']}): {p['rule'].strip()}" for p in data.principles]
        assert full.startswith(head + "\n".join(lines) + "\n\n")       # the grader's own consistency
        for n in range(1, len(data.principles) + 1):
            expected = head + "\n".join(lines[:n]) + "\n\n" + full[len(head + "\n".join(lines) + "\n\n"):]
            assert_same_text(student(copy_data(data), num_principles=n), expected,
                             f"principle_prompt(..., num_principles={n}) of {len(data.principles)} principles")
        for n in (0, -1, len(data.principles) + 1):
            refuses(student, (copy_data(data), n), f"there are {len(data.principles)} principles",
                    f"principle_prompt(..., num_principles={n})")


# ---------------------------------------------------------------- query (2 points)

@check(points=1, function="query")
def query_matches_reference(ns):
    """the instruction (stripped) after "User:", a blank line, and the thought label with nothing after it"""
    student = get_function(ns, "query")
    rng = random.Random(620)
    for _ in range(30):
        instruction = pad(rng, random_text(rng))
        assert_same_text(student(instruction), ref.query(instruction), f"query({instruction!r})")


@check(points=1, function="query")
def query_batches_and_refuses_blanks(ns):
    """a list of instructions gives the list of their queries; a blank instruction raises ValueError"""
    student = get_function(ns, "query")
    rng = random.Random(625)
    instructions = [pad(rng, random_text(rng)) for _ in range(6)]
    got = student(list(instructions))
    assert got == [ref.query(i) for i in instructions], \
        f"query({instructions!r}) should be the list of each instruction's query, got {got!r}"
    assert student([]) == [], f"query([]) should be [], got {student([])!r}"
    for bad in ("", " \n\t", ["Name a prime.", "  "]):
        refuses(student, (bad,), "an empty instruction has nothing to answer", f"query({bad!r})")


# ---------------------------------------------------------------- engraving_pairs (3 points)

DROP_REASONS = ("no thoughts", "no answer", "principle id", "format marker", "copies the prompt")


def random_rows(rng: random.Random, n: int) -> list[dict]:
    """Generated rows as ``self_align`` writes them, ``dropped`` a reason or None; some rows have no ``dropped`` key
    or an empty reason (kept too). At least one row is kept."""
    rows = []
    for _ in range(n):
        row = {"instruction": pad(rng, random_text(rng)), "thought": pad(rng, f"by P0{rng.randint(1, 9)} I "
                                                                          + random_text(rng)),
               "answer": pad(rng, random_text(rng, 4, 14))}
        u = rng.random()
        if u < 0.4:
            row["dropped"] = rng.choice(DROP_REASONS)
        elif u < 0.8:
            row["dropped"] = None
        elif u < 0.9:
            row["dropped"] = ""
        rows.append(row)
    rows[rng.randrange(n)]["dropped"] = None
    return rows


def repeats_a_sentence(answer: str) -> bool:
    """True if two sentences of ``answer`` (split after . ! ? and at line breaks, stripped, lower-cased, blank ones
    ignored) are equal."""
    sentences = [t.strip().lower() for t in re.split(r"(?<=[.!?])\s+|\n+", answer) if t.strip()]
    return len(set(sentences)) < len(sentences)


def reference_engraving_pairs(rows) -> tuple[list[str], list[str]]:
    """The check's reference: the kept rows (no drop reason, no repeated sentence in the answer), stripped."""
    kept = [r for r in rows if not r.get("dropped") and not repeats_a_sentence(r["answer"])]
    if not kept:
        raise ValueError("nothing to engrave")
    return [r["instruction"].strip() for r in kept], [r["answer"].strip() for r in kept]


def pairs(student, rows):
    got = student([dict(r) for r in rows])
    assert isinstance(got, (tuple, list)) and len(got) == 2, \
        f"engraving_pairs should return (instructions, answers), got {type(got).__name__} {got!r}"
    instructions, answers = got
    assert isinstance(instructions, list) and isinstance(answers, list), \
        f"engraving_pairs should return two lists, got {type(instructions).__name__} and {type(answers).__name__}"
    return instructions, answers


@check(points=1, function="engraving_pairs")
def engraving_matches_reference(ns):
    """the kept rows' instructions and answers, stripped, in order; dropped rows left out"""
    student = get_function(ns, "engraving_pairs")
    rng = random.Random(630)
    for n in (1, 2, 5, 8, 13, 20):
        rows = random_rows(rng, n)
        got, expected = pairs(student, rows), reference_engraving_pairs(rows)
        reasons = [r.get("dropped", "(no key)") for r in rows]
        assert got == expected, (f"engraving_pairs on {n} rows with dropped = {reasons}: got {got!r}, expected "
                                 f"{expected!r}")


@check(points=1, function="engraving_pairs")
def engraving_prunes_principles_and_thoughts(ns):
    """no principle text, title, exemplar or thought left in the pairs; nothing kept raises ValueError"""
    student = get_function(ns, "engraving_pairs")
    rng = random.Random(640)
    for _ in range(8):
        data = random_data(rng)
        rows = []
        for k in range(rng.randint(2, 6)):
            cited = rng.choice(data.principles)
            thought = f"thought {k}: {cited['id']} ({cited['title']}) says {cited['rule'].strip()}"
            answer = f"answer {k}: {random_text(rng)}"
            rows.append({"instruction": pad(rng, f"instruction {k}: {random_text(rng)}"), "thought": thought,
                         "answer": pad(rng, answer), "dropped": None})
        e = rng.choice(data.exemplars)                 # outputs the stage-2 filter dropped: they leak the prompt
        rows.insert(rng.randrange(len(rows) + 1), {"instruction": "leaky", "thought": e["thought"],
                                                   "answer": f"{e['answer']} {data.principles[0]['rule']}",
                                                   "dropped": "copies the prompt"})
        rows.insert(rng.randrange(len(rows) + 1), {"instruction": "marked", "thought": "",
                                                   "answer": f"As {data.principles[-1]['id']} says, no.",
                                                   "dropped": "principle id"})
        instructions, answers = pairs(student, rows)
        text = "\n".join(map(str, instructions + answers))
        forbidden = ([r["thought"] for r in rows] + ["leaky", "marked"]
                     + [p[k].strip() for p in data.principles for k in ("id", "rule")]
                     + [f"({p['title']})" for p in data.principles]
                     + [e[k].strip() for e in data.exemplars for k in ("thought", "answer")]
                     + [ref.THOUGHT, ref.USER, "Rules:"])
        leaked = [t for t in forbidden if t and t in text]
        assert not leaked, f"the engraving pairs hold {leaked[0]!r}: {(instructions, answers)!r}"
        kept = [r for r in rows if not r["dropped"]]
        assert len(instructions) == len(answers) == len(kept), \
            f"{len(kept)} rows are kept, got {len(instructions)} instructions and {len(answers)} answers"
        for i, a in zip(instructions, answers):
            i, a = str(i).strip(), str(a).strip()
            assert i.startswith("instruction ") and a.startswith("answer ") and i.split(":")[0][12:] == \
                a.split(":")[0][7:], f"each answer should stay with its own instruction, got {i!r} -> {a!r}"
    dropped = [{"instruction": "x", "thought": "t", "answer": "a", "dropped": reason} for reason in DROP_REASONS]
    for rows in (dropped, dropped[:1], []):
        try:
            got = student([dict(r) for r in rows])
        except ValueError:
            continue
        raise AssertionError(f"engraving_pairs on {len(rows)} rows, none kept, should raise ValueError (there is "
                             f"nothing to engrave), got {got!r}")


@check(points=1, function="engraving_pairs")
def engraving_drops_repeated_sentences(ns):
    """an answer that says one sentence twice (a degenerate loop) is left out, as Dromedary filters before engraving"""
    student = get_function(ns, "engraving_pairs")
    rows = [{"instruction": "Name a prime.", "thought": "t", "answer": "Seven is prime. It has two divisors.",
             "dropped": None},
            {"instruction": "Why is the sky blue?", "thought": "t", "dropped": None,
             "answer": "Air scatters blue light. Air scatters blue light. Air scatters blue light."},
            {"instruction": "Say hi.", "thought": "t", "answer": "Hi! How are you?\nhi!", "dropped": None},
            {"instruction": "Count.", "thought": "t", "answer": "One, two. Two, one. One, two, three.",
             "dropped": None},
            {"instruction": "Thanks.", "thought": "t", "answer": " You are welcome.  you are WELCOME. ",
             "dropped": None}]
    got = pairs(student, rows)
    expected = reference_engraving_pairs(rows)
    assert got == expected, f"engraving_pairs should keep {expected[0]!r} (the others repeat a sentence), got {got!r}"
    loops = [dict(rows[1]), dict(rows[4])]
    refuses(student, (loops,), "every answer repeats a sentence: nothing is left to engrave",
            "engraving_pairs on two looping answers")


# ---------------------------------------------------------------- novelty_filter (5 points)

BASES = ("write a short poem about the sea", "explain how vaccines work", "list three reasons to learn history",
         "give me a recipe for bread", "what is the capital of peru", "summarise this news story in two lines",
         "plan a trip to rome on a budget", "why do cats purr", "can you help me with my essay",
         "describe the water cycle for a child", "compare trains and planes for short trips",
         "suggest a name for a bakery")
FILLERS = ("please", "quickly", "today", "again", "simply", "now", "kindly", "briefly")


def variant(rng: random.Random, text: str) -> str:
    """A near-duplicate of ``text``: a word added, removed or replaced, a plural, a changed case or punctuation."""
    words = text.split()
    kind = rng.randrange(5)
    if kind == 0:
        words.insert(rng.randint(0, len(words)), rng.choice(FILLERS))
    elif kind == 1 and len(words) > 3:
        del words[rng.randrange(len(words))]
    elif kind == 2:
        words[rng.randrange(len(words))] = rng.choice(FILLERS)
    elif kind == 3:
        i = rng.randrange(len(words))
        words[i] = words[i] + "s"
    else:
        words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(("", ".", "?"))


def random_candidates(rng: random.Random) -> tuple[list[str], list[str]]:
    """A pool of a few base instructions and candidates that mix new instructions, near-duplicates of the pool and
    near-duplicates of earlier candidates, some padded with whitespace, a few blank."""
    bases = rng.sample(BASES, len(BASES))
    pool = bases[:rng.randint(1, 4)]
    fresh = bases[len(pool):]
    candidates = []
    for _ in range(rng.randint(5, 12)):
        u = rng.random()
        if u < 0.3 and fresh:
            text = fresh.pop()
        elif u < 0.55:
            text = variant(rng, rng.choice(pool))
        elif u < 0.85 and candidates:
            text = variant(rng, rng.choice([c for c in candidates if c.strip()] or pool).strip())
        elif u < 0.92:
            text = random_text(rng)
        else:
            text = rng.choice(("", " ", "\n", " \t "))
        candidates.append(pad(rng, text) if rng.random() < 0.4 else text)
    return candidates, pool


def allowed_matches(candidates, pool, threshold):
    """What the filter may return (the check's reference, self-instruct's rule: rejected above the threshold): kept
    texts, and per rejected text its score and every text tied for the closest match (any of them is accepted)."""
    seen, kept, rejected = list(pool), [], []
    for text in candidates:
        text = text.strip()
        if not text:
            continue
        scored = [(ref.rouge_l(text, other), other) for other in seen]
        best = max((s for s, _ in scored), default=0.0)
        if best > threshold:
            rejected.append((text, {o for s, o in scored if s == best}, best))
        else:
            kept.append(text)
            seen.append(text)
    return kept, rejected


def filtered(student, candidates, pool, **kwargs):
    got = student(list(candidates), list(pool), **kwargs)
    assert isinstance(got, (tuple, list)) and len(got) == 3, \
        f"novelty_filter should return (kept, rejected, scores), got {type(got).__name__} {got!r}"
    kept, rejected, _ = got
    assert isinstance(kept, list) and isinstance(rejected, list), \
        f"novelty_filter should return two lists, got {type(kept).__name__} and {type(rejected).__name__}"
    out = []
    for r in rejected:
        assert isinstance(r, (tuple, list)) and len(r) == 3, \
            f"each rejected candidate should be a triple (text, closest, score), got {r!r}"
        score = r[2].item() if isinstance(r[2], torch.Tensor) and r[2].numel() == 1 else r[2]
        assert isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score), \
            f"the score of a rejected candidate should be a finite number, got {r[2]!r}"
        out.append((r[0], r[1], float(score)))
    return kept, out


def assert_same_filter(got, candidates, pool, threshold, what: str) -> None:
    kept, rejected = got
    want_kept, want_rejected = allowed_matches(candidates, pool, threshold)
    assert kept == want_kept, f"{what}: kept {kept!r}, expected {want_kept!r} (candidates {candidates!r})"
    assert [r[0] for r in rejected] == [r[0] for r in want_rejected], \
        f"{what}: rejected {[r[0] for r in rejected]!r}, expected {[r[0] for r in want_rejected]!r}"
    for (text, closest, score), (_, matches, best) in zip(rejected, want_rejected):
        assert abs(score - best) <= 1e-9, f"{what}: {text!r} scored {score:.6g}, its ROUGE-L with {closest!r} is " \
                                          f"{best:.6g}"
        assert closest in matches, f"{what}: the closest match of {text!r} is one of {sorted(matches)!r}, got " \
                                   f"{closest!r}"


@check(points=1, function="novelty_filter")
def novelty_matches_reference(ns):
    """matches the reference on random candidates with near-duplicates of the pool and of each other"""
    student = get_function(ns, "novelty_filter")
    rng = random.Random(650)
    for threshold in (0.7, 0.55, 0.62, 0.83, 0.7, 0.45, 0.91, 0.7):
        candidates, pool = random_candidates(rng)
        kwargs = {} if threshold == 0.7 and rng.random() < 0.5 else {"threshold": threshold}
        assert_same_filter(filtered(student, candidates, pool, **kwargs), candidates, pool, threshold,
                           f"novelty_filter(..., threshold={threshold})" if kwargs else "novelty_filter(...)")


@check(points=1, function="novelty_filter")
def novelty_compares_with_kept_candidates(ns):
    """each candidate meets the pool and the candidates kept before it, not the rejected ones"""
    student = get_function(ns, "novelty_filter")
    pool = ["Write a short poem about the sea."]
    twins = ["Explain how vaccines work.", "Explain how a vaccine works."]
    for candidates in (twins, twins[::-1], ["Plan a trip to Rome.", "Why do cats purr?", "Plan a cheap trip to Rome."]):
        kept, rejected = filtered(student, candidates, pool, threshold=0.7)
        assert kept == candidates[:1] + candidates[1:-1] and [r[:2] for r in rejected] == [(candidates[-1],
                                                                                            candidates[0])], \
            f"novelty_filter({candidates!r}, {pool!r}): {candidates[-1]!r} repeats the kept {candidates[0]!r} and " \
            f"should be rejected with it as the closest match; got kept={kept!r}, rejected={rejected!r}"
    chain = ["Write a short poem about the sea for my sister on her birthday.",   # near the pool: rejected
             "Write a short card for my sister on her birthday.",                # near the rejected one only: kept
             "Write a short card for my brother on his birthday."]               # near the kept one: rejected
    kept, rejected = filtered(student, chain, pool, threshold=0.65)
    assert kept == [chain[1]] and [r[:2] for r in rejected] == [(chain[0], pool[0]), (chain[2], chain[1])], \
        f"novelty_filter({chain!r}, {pool!r}, 0.65): the first is too close to the pool; the second is close only to " \
        f"the rejected first (rejected texts do not join the pool), so it is kept; the third is close to the second. " \
        f"Got kept={kept!r}, rejected={rejected!r}"


@check(points=1, function="novelty_filter")
def novelty_threshold_keeps_a_tie(ns):
    """a score equal to the threshold keeps the candidate (rejected only above it); at threshold 1 nothing is rejected"""  # noqa: E501
    student = get_function(ns, "novelty_filter")
    for a, b in (("explain how vaccines work", "explain how tides work"),       # 3 of 4 words: F = 0.75
                 ("list three reasons", "list three good reasons today"),     # 3 of 3 and 5: F = 0.75
                 ("why do cats purr", "how do dogs bark")):                   # 1 of 4: F = 0.25
        t = ref.rouge_l(a, b)
        kept, rejected = filtered(student, [b], [a], threshold=t)
        assert kept == [b] and rejected == [], \
            f"ROUGE-L({b!r}, {a!r}) = {t:g} equals the threshold {t:g}: self-instruct rejects only scores above the " \
            f"threshold, so the candidate is kept; got kept={kept!r}, rejected={rejected!r}"
        kept, rejected = filtered(student, [b], [a], threshold=t - 1e-6)
        assert kept == [] and [r[:2] for r in rejected] == [(b, a)], \
            f"ROUGE-L({b!r}, {a!r}) = {t:g} is above the threshold {t - 1e-6:g}: rejected with {a!r} as closest; " \
            f"got kept={kept!r}, rejected={rejected!r}"
    pool = ["Explain how vaccines work."]
    candidates = ["explain how a vaccine works", "Explain how vaccines work.", "Explain vaccines."]
    kept, rejected = filtered(student, candidates, pool, threshold=1.0)
    assert kept == candidates and rejected == [], \
        f"novelty_filter({candidates!r}, {pool!r}, threshold=1.0): no ROUGE-L is above 1, so all are kept; got " \
        f"kept={kept!r}, rejected={rejected!r}"


@check(points=1, function="novelty_filter")
def novelty_skips_blanks_and_refuses_bad_thresholds(ns):
    """blank candidates are skipped; a threshold outside (0, 1] raises ValueError"""
    student = get_function(ns, "novelty_filter")
    candidates = ["", "  Why do cats purr?\n", " \n\t", "Plan a trip to Rome.", "   "]
    for pool in ([], ["Give me a recipe for bread."]):
        kept, rejected = filtered(student, candidates, pool, threshold=0.7)
        assert kept == ["Why do cats purr?", "Plan a trip to Rome."] and rejected == [], \
            f"novelty_filter({candidates!r}, {pool!r}) should skip the blank candidates and keep the two others, " \
            f"stripped; got kept={kept!r}, rejected={rejected!r}"
    for threshold in (0.0, -0.5, 1.2, 7.0):
        try:
            got = student(["Why do cats purr?"], ["Plan a trip to Rome."], threshold=threshold)
        except ValueError:
            continue
        raise AssertionError(f"novelty_filter(..., threshold={threshold}) should raise ValueError (a ROUGE-L F lies in "
                             f"[0, 1]: the threshold must be in (0, 1]), got {got!r}")


@check(points=1, function="novelty_filter")
def novelty_reports_every_score(ns):
    """also returns scores: each non-blank candidate's best ROUGE-L, in order, the number the threshold is applied to"""
    student = get_function(ns, "novelty_filter")
    rng = random.Random(655)
    for threshold in (0.7, 0.5, 0.85):
        candidates, pool = random_candidates(rng)
        got = student(list(candidates), list(pool), threshold=threshold)
        assert isinstance(got, (tuple, list)) and len(got) == 3, \
            f"novelty_filter should return (kept, rejected, scores), got {type(got).__name__} {got!r}"
        scores = [float(x) for x in got[2]]
        seen, expected = list(pool), []
        for text in (c.strip() for c in candidates):
            if not text:
                continue
            best = max((ref.rouge_l(text, other) for other in seen), default=0.0)
            expected.append(best)
            if best <= threshold:
                seen.append(text)
        assert len(scores) == len(expected) and all(abs(x - y) <= 1e-9 for x, y in zip(scores, expected)), \
            f"novelty_filter(..., threshold={threshold}): scores {[round(x, 3) for x in scores]}, expected " \
            f"{[round(x, 3) for x in expected]} (one per non-blank candidate: its highest ROUGE-L with the pool and " \
            f"the candidates kept before it; 0.0 when there is nothing to compare with)"


# ---------------------------------------------------------------- true_scores (3 points)

@functools.lru_cache(maxsize=None)
def tiny_cache():
    """The tiny random model and a PrefixCache of the reference header (built once per grading process)."""
    from alignlib.models import load_model
    from alignlib.prefix_cache import PrefixCache

    with one_thread():
        model, tokenizer = load_model("tiny-random", device="cpu")
        return PrefixCache(model, tokenizer, ref_mc.TRUE_HEADER)


QUESTIONS = (("What colour is a clear daytime sky?", ["Blue", "Green", "Bright purple with stripes"]),
             ("How many legs does a spider have?", ["Eight", "Six"]),
             ("Which planet is closest to the Sun?", ["Mercury", "Venus", "Earth", "Mars", "Neptune"]),
             ("Can you see the Great Wall of China from the Moon with the naked eye?",
              ["No, it is far too narrow", "Yes, easily", "Only at night", "Only with one eye closed"]),
             ("Is 50% of 80 equal to 40?", ["{yes}", "no"]))
OTHER_QUERY = "Q: {question}\nA: {choice}\nCorrect?"


def scored(student, cache, question, choices, **kwargs) -> torch.Tensor:
    with one_thread():
        got = student(cache, question, list(choices), **kwargs)
    assert isinstance(got, torch.Tensor), f"true_scores should return a torch.Tensor, got {type(got).__name__}"
    return got


@check(points=1, function="true_scores")
def true_scores_match_reference(ns):
    """p(True) / (p(True) + p(False)) per choice on the tiny model, within 1e-5 of the reference"""
    student = get_function(ns, "true_scores")
    cache = tiny_cache()
    for question, choices in QUESTIONS:
        with one_thread():
            expected = ref_mc.true_scores(cache, question, choices)
        assert_close(scored(student, cache, question, choices), expected,
                     f"true_scores(cache, {question!r}, {choices!r})", atol=TOLERANCE, rtol=0)


@check(points=1, function="true_scores")
def true_scores_use_query_and_words(ns):
    """follows the query template and the two words it is given; swapping the words gives 1 - s"""
    student = get_function(ns, "true_scores")
    cache = tiny_cache()
    for (question, choices), words in zip(QUESTIONS, ((" Yes", " No"), (" True", " False"), (" right", " wrong"),
                                                      (" 1", " 0"), (" T", " F"))):
        kwargs = {"query": OTHER_QUERY, "words": words}
        with one_thread():
            expected = ref_mc.true_scores(cache, question, choices, **kwargs)
        got = scored(student, cache, question, choices, **kwargs)
        assert_close(got, expected, f"true_scores(cache, {question!r}, ..., query={OTHER_QUERY!r}, words={words!r})",
                     atol=TOLERANCE, rtol=0)
        swapped = scored(student, cache, question, choices, query=OTHER_QUERY, words=words[::-1])
        assert_close(got + swapped, torch.ones(len(choices)),
                     f"true_scores with words={words!r} plus with words={words[::-1]!r} (the ratio is normalised over "
                     f"the two words)", atol=TOLERANCE, rtol=0)


@check(points=1, function="true_scores")
def true_scores_of_a_batch(ns):
    """a list of questions with one list of choices each gives one (K_i,) tensor per question"""
    student = get_function(ns, "true_scores")
    cache = tiny_cache()
    questions, choices = [q for q, _ in QUESTIONS], [list(c) for _, c in QUESTIONS]
    with one_thread():
        got = student(cache, list(questions), [list(c) for c in choices])
        expected = [ref_mc.true_scores(cache, q, c) for q, c in zip(questions, choices)]
    assert isinstance(got, list) and len(got) == len(questions), \
        f"true_scores on {len(questions)} questions should return a list of {len(questions)} tensors, got {got!r}"
    for q, g, e in zip(questions, got, expected):
        assert_close(g, e, f"true_scores(cache, [...], [...]) for {q!r}", atol=TOLERANCE, rtol=0)


# ---------------------------------------------------------------- accuracy (3 points)

def random_scores(rng: random.Random, n: int, stacked: bool):
    """n score rows of 2-5 choices, values on a coarse grid so that ties are common; one (n, K) tensor if stacked."""
    k = rng.randint(2, 5)
    rows = [torch.tensor([rng.randint(0, 4) / 4 for _ in range(k if stacked else rng.randint(2, 5))])
            for _ in range(n)]
    answers = [rng.randrange(len(r)) for r in rows]
    return (torch.stack(rows) if stacked else rows), answers


@check(points=1, function="accuracy")
def accuracy_matches_reference(ns):
    """the fraction of questions whose top score is the answer, ties going to the first choice; hits per question"""
    student = get_function(ns, "accuracy")
    rng = random.Random(660)
    for n, stacked in ((1, False), (3, False), (12, False), (40, False), (8, True), (25, True)):
        scores, answers = random_scores(rng, n, stacked)
        expected = ref_mc.accuracy(scores, answers)
        got = student(scores.clone() if stacked else [s.clone() for s in scores], list(answers))
        assert isinstance(got, dict) and {"accuracy", "hits"} <= set(got), \
            f"accuracy should return a dict with the keys 'accuracy' and 'hits', got {got!r}"
        value = got["accuracy"].item() if isinstance(got["accuracy"], torch.Tensor) else got["accuracy"]
        rows = [[round(float(x), 2) for x in s] for s in scores][:4]
        assert isinstance(got["hits"], (list, tuple)) and [bool(h) for h in got["hits"]] == expected["hits"], \
            f"accuracy on {n} questions (scores {rows}..., answers {answers[:4]}...): hits {got['hits']!r}, expected " \
            f"{expected['hits']!r} (a tie goes to the first of the tied choices)"
        assert isinstance(value, (int, float)) and abs(value - expected["accuracy"]) <= 1e-9, \
            f"accuracy on {n} questions: got {value!r}, expected {expected['accuracy']!r}"


@check(points=1, function="accuracy")
def accuracy_refuses_bad_input(ns):
    """raises ValueError for mismatched lengths, no questions, and an answer outside the choices"""
    student = get_function(ns, "accuracy")
    two = [torch.tensor([0.2, 0.8]), torch.tensor([0.5, 0.1, 0.4])]
    for scores, answers, why in ((two, [1], "two score rows for one answer"),
                                 (two[:1], [1, 0], "one score row for two answers"),
                                 ([], [], "there are no questions"),
                                 (two, [1, 3], "answer 3 is outside the 3 choices"),
                                 (two, [2, 0], "answer 2 is outside the 2 choices"),
                                 (two, [-1, 0], "answer -1 is not a choice")):
        try:
            got = student([s.clone() for s in scores], list(answers))
        except ValueError:
            continue
        raise AssertionError(f"accuracy({[s.tolist() for s in scores]}, {answers}) should raise ValueError ({why}), "
                             f"got {got!r}")


@check(points=1, function="accuracy")
def accuracy_splits_ties(ns):
    """ties="split": a question whose answer shares the top score with m - 1 others counts 1/m"""
    student = get_function(ns, "accuracy")
    rows = [torch.tensor([0.5, 0.5]), torch.tensor([0.1, 0.7, 0.7, 0.7]), torch.tensor([0.9, 0.2]),
            torch.tensor([0.3, 0.3, 0.1])]
    got = student([r.clone() for r in rows], [1, 2, 1, 2], ties="split")
    hits = [float(h) for h in got["hits"]] if isinstance(got, dict) and "hits" in got else got
    assert isinstance(got, dict) and hits == [0.5, 1 / 3, 0.0, 0.0], \
        f"accuracy(..., ties='split'): hits should be [0.5, 1/3, 0.0, 0.0] (answer tied with one other, with two " \
        f"others, " \
        f"below the top, below a tie), got {hits!r}"
    value = float(got["accuracy"])
    assert abs(value - (0.5 + 1 / 3) / 4) <= 1e-9, \
        f"accuracy(..., ties='split') = {value}, expected {(0.5 + 1 / 3) / 4}"
    rng = random.Random(670)
    scores, answers = random_scores(rng, 30, stacked=False)
    split = student([s.clone() for s in scores], list(answers), ties="split")["accuracy"]
    first = ref_mc.accuracy(scores, answers)["accuracy"]
    expected = sum(float(s[a] == s.max()) / int((s == s.max()).sum()) for s, a in zip(scores, answers)) / 30
    assert abs(float(split) - expected) <= 1e-9, \
        f"accuracy(..., ties='split') on 30 random questions = {split}, expected {expected} " \
        f"(ties='first' gives {first})"
    try:
        got = student([r.clone() for r in rows], [1, 2, 1, 2], ties="last")
    except ValueError:
        return
    raise AssertionError(f"accuracy(..., ties='last') should raise ValueError (ties is 'first' or 'split'), "
                         f"got {got!r}")


# ---------------------------------------------------------------- the graded experiment (2 points)

TARGET_PASS_RATE = 0.4    # keep at least this fraction of the candidates
THRESHOLD_SLACK = 0.02    # the chosen threshold may be this much above the strictest one


@functools.lru_cache(maxsize=1)
def strictest_threshold() -> float:
    """The lowest threshold on a grid of 0.001 whose filter keeps at least TARGET_PASS_RATE of the candidates."""
    return min(x / 1000 for x in range(1001) if tiny_lab.novelty_pass_rate(x / 1000)["pass_rate"] >= TARGET_PASS_RATE)


@check(points=2, function="choose_threshold")
def threshold_for_the_target_pass_rate(ns):
    """the chosen threshold keeps >= 40% of the candidates and is within 0.02 of the strictest that does"""
    t = as_number(run_experiment(ns, "choose_threshold"), "choose_threshold()")
    assert 0 <= t <= 1, f"the threshold must lie in [0, 1], got {t}"
    rate = tiny_lab.novelty_pass_rate(t)["pass_rate"]
    strictest = strictest_threshold()
    assert rate >= TARGET_PASS_RATE, \
        f"threshold {t:.3f} keeps {rate:.1%} of the candidates, fewer than {TARGET_PASS_RATE:.0%}"
    assert t <= strictest + THRESHOLD_SLACK, \
        f"threshold {t:.3f} keeps {rate:.1%}, but a stricter filter (threshold {strictest:.3f}) keeps " \
        f"{TARGET_PASS_RATE:.0%} too: it keeps more near-duplicates than it needs to"
