"""Grading of exercise 06 (principle-driven self-alignment): the solution scores full marks, the exercise zero, and
wrong implementations lose points on exactly the checks that should catch them."""
from __future__ import annotations

import nbformat
import pytest

from alignlib.checks.grader import grade
from grading_helpers import (assert_full_marks, assert_import_not_accepted, assert_in_sync, assert_loses_exactly,
                             assert_one_graded_cell_per_function, assert_registry, assert_scores_zero,
                             assert_syntax_error_costs_only, exercise_path, solution_path, with_solution)

SOLUTION = solution_path("06_self_align")
EXERCISE = exercise_path("06_self_align")
POINTS = {"principle_prompt": 2, "query": 1, "engraving_pairs": 2, "novelty_filter": 4, "true_scores": 2,
          "accuracy": 2}


def test_checks_registry_of_exercise_06():
    assert_registry("06_self_align", POINTS)


def test_solution_has_one_graded_cell_per_function():
    assert_one_graded_cell_per_function(SOLUTION, POINTS)


def test_exercise_06_is_in_sync():
    assert_in_sync("06_self_align")


def test_solution_scores_full_marks():
    assert_full_marks(SOLUTION, 13)


def test_exercise_scores_zero_on_every_check():
    assert_scores_zero(EXERCISE)


PROMPT_REF = "principle_prompt: the intro, the rules and every exemplar with its thoughts, exactly as specified"
PROMPT_ORDER = ("principle_prompt: the rules in the data's order, then each exemplar as a query, its thoughts and its "
                "answer; ends with a blank line")
QUERY = 'query: the instruction (stripped) after "User:", a blank line, and the thought label with nothing after it'
ENGRAVE_REF = "engraving_pairs: the kept rows' instructions and answers, stripped, in order; dropped rows left out"
ENGRAVE_PRUNE = ("engraving_pairs: no principle text, title, exemplar or thought left in the pairs; nothing kept "
                 "raises ValueError")
NOVELTY_REF = "novelty_filter: matches the reference on random candidates with near-duplicates of the pool and of each other"
NOVELTY_ORDER = "novelty_filter: each candidate meets the pool and the candidates kept before it, not the rejected ones"
NOVELTY_EQUAL = ("novelty_filter: a score equal to the threshold rejects; at threshold 1 only duplicates (after "
                 "stemming) are rejected")
NOVELTY_BAD = "novelty_filter: blank candidates are skipped; a threshold outside (0, 1] raises ValueError"
TRUE_REF = "true_scores: p(True) / (p(True) + p(False)) per choice on the tiny model, within 1e-5 of the reference"
TRUE_ARGS = "true_scores: follows the query template and the two words it is given; swapping the words gives 1 - s"
ACC_REF = ("accuracy: the fraction of questions whose top score is the answer, ties going to the first choice; hits "
           "per question")
ACC_BAD = "accuracy: raises ValueError for mismatched lengths, no questions, and an answer outside the choices"

# the prompt with {rule}, {thought} standing for the parts the mistakes change
PROMPT = """
rules = "\\n".join(f"{{p['id']}} ({{p['title']}}): {rule}" for p in data.principles)
shots = "".join(f"{{USER}} {{e['instruction'].strip()}}\\n\\n{thought}{{ANSWER}} {{e['answer'].strip()}}\\n\\n"
                for e in data.exemplars)
return INTRO + "Rules:\\n" + rules + "\\n\\n" + shots
"""
RULE, THOUGHT_TURN = "{p['rule'].strip()}", "{THOUGHT} {e['thought'].strip()}\\n\\n"
ENGRAVE = """
kept = [r for r in rows if {keep}]
if not kept:
    raise ValueError("nothing to engrave")
return [{instruction} for r in kept], [{answer} for r in kept]
"""
ENGRAVE_RIGHT = dict(keep="not r.get('dropped')", instruction="r['instruction'].strip()",
                     answer="r['answer'].strip()")
# a compact filter; {compare}, {test} and {reject} are where the mistakes go
NOVELTY = """
if not 0 < threshold <= 1:
    raise ValueError("threshold must lie in (0, 1]")
seen, kept, rejected = list(pool), [], []
for text in candidates:
    text = text.strip()
    if not text:
        continue
    score, closest = max([(rouge_l(text, other), other) for other in {compare}] or [(0.0, "")])
    if {test}:
        rejected.append((text, closest, score)){reject}
    else:
        kept.append(text)
        seen.append(text)
return kept, rejected
"""
NOVELTY_RIGHT = dict(compare="seen", test="score >= threshold", reject="")
TRUE = """
suffixes = [{template}.format(question=question, choice=c) for c in choices]
yes = cache.score(suffixes, [words[0]] * len(choices))
no = cache.score(suffixes, [words[1]] * len(choices))
return {result}
"""
ACCURACY = """
if len(scores) != len(answers) or not answers:
    raise ValueError("one score row per answer")
hits = []
for s, a in zip(scores, answers):
    if not {in_range}:
        raise ValueError("answer out of range")
    hits.append({pick} == a)
return {{"accuracy": sum(hits) / len(hits), "hits": hits}}
"""
ACCURACY_RIGHT = dict(in_range="0 <= a < len(s)", pick="int(torch.as_tensor(s).argmax())")

WRONG = {
    "rules not stripped in the shared prompt": (
        "principle_prompt", PROMPT.format(rule="{p['rule']}", thought=THOUGHT_TURN),
        {PROMPT_REF, PROMPT_ORDER}),
    "exemplar thoughts left out of the shared prompt": (
        "principle_prompt", PROMPT.format(rule=RULE, thought=""),
        {PROMPT_REF, PROMPT_ORDER}),
    "a space after the thought label of the query": (
        "query", 'return f"{USER} {instruction.strip()}\\n\\n{THOUGHT} "',
        {QUERY}),
    "thoughts left in the engraving answers": (
        "engraving_pairs", ENGRAVE.format(**{**ENGRAVE_RIGHT, "answer": "r['thought'].strip() + ' ' + r['answer'].strip()"}),
        {ENGRAVE_REF, ENGRAVE_PRUNE}),
    "dropped rows kept": (
        "engraving_pairs", ENGRAVE.format(**{**ENGRAVE_RIGHT, "keep": "True"}),
        {ENGRAVE_REF, ENGRAVE_PRUNE}),
    "engraving pairs not stripped": (
        "engraving_pairs", ENGRAVE.format(keep="not r.get('dropped')", instruction="r['instruction']",
                                          answer="r['answer']"),
        {ENGRAVE_REF}),
    "candidates compared with the pool only, not with earlier kept ones": (
        "novelty_filter", NOVELTY.format(**{**NOVELTY_RIGHT, "compare": "pool"}),
        {NOVELTY_REF, NOVELTY_ORDER}),
    "rejected candidates join the comparison set": (
        "novelty_filter", NOVELTY.format(**{**NOVELTY_RIGHT, "reject": "\n        seen.append(text)"}),
        {NOVELTY_REF, NOVELTY_ORDER}),
    "'>' instead of '>=' at the threshold": (
        "novelty_filter", NOVELTY.format(**{**NOVELTY_RIGHT, "test": "score > threshold"}),
        {NOVELTY_EQUAL}),
    "no check of the threshold": (
        "novelty_filter", NOVELTY.format(**NOVELTY_RIGHT).split("\n", 3)[3],
        {NOVELTY_BAD}),
    "p(True) without normalising by p(True) + p(False)": (
        "true_scores", TRUE.format(template="query", result="yes.exp()"),
        {TRUE_REF, TRUE_ARGS}),
    "the default template used whatever query is given": (
        "true_scores", TRUE.format(template="TRUE_QUERY", result="torch.sigmoid(yes - no)"),
        {TRUE_ARGS}),
    "ties go to the last choice": (
        "accuracy", ACCURACY.format(**{**ACCURACY_RIGHT,
                                       "pick": "len(s) - 1 - int(torch.as_tensor(s).flip(0).argmax())"}),
        {ACC_REF}),
    "negative answers accepted": (
        "accuracy", ACCURACY.format(**{**ACCURACY_RIGHT, "in_range": "a < len(s)"}),
        {ACC_BAD}),
}


@pytest.mark.parametrize("mistake", sorted(WRONG))
def test_wrong_implementation_loses_points_on_the_right_checks(mistake, tmp_path):
    function, body, expected_failures = WRONG[mistake]
    assert_loses_exactly(with_solution(SOLUTION, function, body, tmp_path), function, expected_failures)


def test_the_right_bodies_of_the_templates_score_full_marks(tmp_path):
    """The templates above are only wrong where a mistake puts something in: filled in right, they pass."""
    for function, body in (("principle_prompt", PROMPT.format(rule=RULE, thought=THOUGHT_TURN)),
                           ("engraving_pairs", ENGRAVE.format(**ENGRAVE_RIGHT)),
                           ("novelty_filter", NOVELTY.format(**NOVELTY_RIGHT)),
                           ("true_scores", TRUE.format(template="query", result="torch.sigmoid(yes - no)")),
                           ("accuracy", ACCURACY.format(**ACCURACY_RIGHT))):
        results = grade(with_solution(SOLUTION, function, body, tmp_path))
        assert [(r.name, r.message) for r in results if r.points != r.max_points] == []


def test_syntax_error_in_one_cell_keeps_the_other_marks(tmp_path):
    assert_syntax_error_costs_only(SOLUTION, "novelty_filter", "accuracy", 13, tmp_path)


@pytest.mark.parametrize("function, module", [("novelty_filter", "alignlib.self_align"),
                                              ("engraving_pairs", "alignlib.self_align"),
                                              ("true_scores", "alignlib.multiple_choice")])
def test_functions_imported_from_alignlib_are_not_accepted(function, module, tmp_path):
    assert_import_not_accepted(SOLUTION, function, module, tmp_path)


def test_a_cell_that_patches_rouge_l_scores_zero(tmp_path):
    """rouge_l may be called, not replaced: a cell that swaps it for a constant would make any filter keep all."""
    import alignlib.self_align as reference

    nb = nbformat.read(SOLUTION, as_version=4)
    cell = next(c for c in nb.cells if "def novelty_filter(" in c.source)
    cell.source += "\n\nimport alignlib.self_align as sa\nsa.rouge_l = lambda a, b: 0.0"
    path = tmp_path / SOLUTION.name
    nbformat.write(nb, path)
    saved = reference.rouge_l
    try:
        results = grade(path)
    finally:   # undo the patch for the other tests in this process
        reference.rouge_l = saved
    assert all(r.points == 0 and "modified the grader" in r.message for r in results)
