"""Checks of exercise 06 (principle-driven self-alignment: the shared prompt, the query and the engraving data; the
novelty filter of self-instruct; multiple-choice scoring by the probability of "True" and its accuracy), 13 points.

The text checks compare the student's strings with ``alignlib.self_align`` character for character on seeded random
principles, exemplars and generated rows (stray whitespace around every field), and test what the reference
guarantees: the engraving pairs hold no principle, title, exemplar or internal thought. ``novelty_filter`` is
compared with the reference on random instruction lists full of near-duplicates (students may call
``alignlib.self_align.rouge_l``, which is not graded); when several texts tie for the closest match, any of them is
accepted. ``true_scores`` runs on the tiny random model behind a ``PrefixCache`` of the reference header and must
agree with ``alignlib.multiple_choice`` to 1e-5; ``accuracy`` is compared on random score rows with ties. Inputs are
copied before each call.
"""
from __future__ import annotations

import functools
import math
import random

import torch

from alignlib import multiple_choice as ref_mc
from alignlib import self_align as ref

from . import assert_close, assert_same_text, check, get_function, one_thread, pad

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
def prompt_holds_rules_then_exemplars_in_order(ns):
    ("the rules in the data's order, then each exemplar as a query, its thoughts and its answer; "
     "ends with a blank line")
    student = get_function(ns, "principle_prompt")
    rng = random.Random(610)
    for _ in range(15):
        data = random_data(rng, verbose=True)
        got = student(copy_data(data))
        assert isinstance(got, str), f"principle_prompt should return a str, got {type(got).__name__}"
        head = ref.INTRO + "Rules:\n"
        assert got.startswith(head), f"the prompt should start with INTRO + 'Rules:\\n', got {got[:len(head) + 20]!r}"
        parts = [f"{p['id']} ({p['title']}): {p['rule'].strip()}\n" for p in data.principles]
        parts[-1] += "\n"                                       # a blank line after the last rule
        parts += [f"{ref.query(e['instruction'])} {e['thought'].strip()}\n\n{ref.ANSWER} {e['answer'].strip()}\n\n"
                  for e in data.exemplars]
        at = len(head)
        for part in parts:
            found = got.find(part, at)
            assert found == at, (f"after {got[max(0, at - 40):at]!r} the prompt should go on with {part!r}, got "
                                 f"{got[at:at + len(part) + 10]!r}")
            at += len(part)
        assert at == len(got), f"nothing should follow the last exemplar's answer and blank line; got {got[at:]!r}"
        for left_out in (data.verbose_prompt, data.seeds[0]["instruction"], data.question_types[0]["type"]):
            assert left_out not in got, f"the shared prompt holds {left_out!r}, which is not a principle or exemplar"


# ---------------------------------------------------------------- query (1 point)

@check(points=1, function="query")
def query_matches_reference(ns):
    """the instruction (stripped) after "User:", a blank line, and the thought label with nothing after it"""
    student = get_function(ns, "query")
    rng = random.Random(620)
    for _ in range(30):
        instruction = pad(rng, random_text(rng))
        assert_same_text(student(instruction), ref.query(instruction), f"query({instruction!r})")


# ---------------------------------------------------------------- engraving_pairs (2 points)

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
        got, expected = pairs(student, rows), ref.engraving_pairs(rows)
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


# ---------------------------------------------------------------- novelty_filter (4 points)

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
    """What the filter may return: kept texts, and per rejected text its score and every text tied for the
    closest match (the reference breaks ties one way; any is accepted)."""
    seen, kept, rejected = list(pool), [], []
    for text in candidates:
        text = text.strip()
        if not text:
            continue
        scored = [(ref.rouge_l(text, other), other) for other in seen]
        best = max((s for s, _ in scored), default=0.0)
        if best >= threshold:
            rejected.append((text, {o for s, o in scored if s == best}, best))
        else:
            kept.append(text)
            seen.append(text)
    return kept, rejected


def filtered(student, candidates, pool, **kwargs):
    got = student(list(candidates), list(pool), **kwargs)
    assert isinstance(got, (tuple, list)) and len(got) == 2, \
        f"novelty_filter should return (kept, rejected), got {type(got).__name__} {got!r}"
    kept, rejected = got
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
        expected = ref.novelty_filter(candidates, pool, threshold)
        assert allowed_matches(candidates, pool, threshold)[0] == expected[0]      # the grader's own consistency
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
def novelty_threshold_is_inclusive(ns):
    """a score equal to the threshold rejects; at threshold 1 only duplicates (after stemming) are rejected"""
    student = get_function(ns, "novelty_filter")
    for a, b in (("explain how vaccines work", "explain how tides work"),       # 3 of 4 words: F = 0.75
                 ("list three reasons", "list three good reasons today"),     # 3 of 3 and 5: F = 0.75
                 ("why do cats purr", "how do dogs bark")):                   # 1 of 4: F = 0.25
        t = ref.rouge_l(a, b)
        kept, rejected = filtered(student, [b], [a], threshold=t)
        assert kept == [] and [r[:2] for r in rejected] == [(b, a)], \
            f"ROUGE-L({b!r}, {a!r}) = {t:g} equals the threshold {t:g}: the candidate is not novel enough and should " \
            f"be rejected (keep only scores below the threshold); got kept={kept!r}, rejected={rejected!r}"
    pool = ["Explain how vaccines work."]
    candidates = ["explain how a vaccine works", "Explain how vaccine works!", "Explain how vaccines work.",
                  "Explain vaccines."]
    kept, rejected = filtered(student, candidates, pool, threshold=1.0)
    assert kept == [candidates[0], candidates[3]] and [r[0] for r in rejected] == candidates[1:3], \
        f"novelty_filter({candidates!r}, {pool!r}, threshold=1.0) should reject only the texts equal to one already " \
        f"seen after lower-casing and stemming ({candidates[1:3]!r}); got kept={kept!r}, rejected={rejected!r}"


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


# ---------------------------------------------------------------- true_scores (2 points)

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


# ---------------------------------------------------------------- accuracy (2 points)

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
