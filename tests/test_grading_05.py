"""Grading of exercise 05 (Constitutional AI): the solution scores full marks, the exercise zero, and wrong
implementations lose points on exactly the checks that should catch them."""
from __future__ import annotations

import pytest

from alignlib.checks.grader import grade
from grading_helpers import (assert_full_marks, assert_import_not_accepted, assert_in_sync, assert_loses_exactly,
                             assert_one_graded_cell_per_function, assert_registry, assert_scores_zero,
                             assert_syntax_error_costs_only, exercise_path, solution_path, with_solution)

SOLUTION = solution_path("05_cai")
EXERCISE = exercise_path("05_cai")
POINTS = {"critique_prompt": 1, "revision_prompt": 2, "sft_example": 2, "soft_labels": 4, "elo_scores": 4}


def test_checks_registry_of_exercise_05():
    assert_registry("05_cai", POINTS)


def test_solution_has_one_graded_cell_per_function():
    assert_one_graded_cell_per_function(SOLUTION, POINTS)


def test_exercise_05_is_in_sync():
    assert_in_sync("05_cai")


def test_solution_scores_full_marks():
    assert_full_marks(SOLUTION, 13)


def test_exercise_scores_zero_on_every_check():
    assert_scores_zero(EXERCISE)


TURNS = 'turns = f"Human: {prompt.strip()}\\n\\nAssistant: {response.strip()}\\n\\n"\n'
SHAPE_CHECK = """
if logp_first_order.dim() != 2 or logp_first_order.shape[1] != 2 or logp_swapped.shape != logp_first_order.shape:
    raise ValueError("both inputs must be (B, 2)")
"""
SOFT = """
first = {first}
swapped = {swapped}
return {{"p": (first + swapped) / 2, "p_first_order": first, "p_swapped": swapped}}
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
    raise ValueError("unknown player or no outcomes")"""
ELO_RIGHT = dict(guard=GUARD, prior="prior", scale="400 / math.log(10)", anchor="[0]")

CRITIQUE = 'critique_prompt: the conversation (stripped), the critique request and "Critique:", exactly as specified'
REVISION_REF = ('revision_prompt: the critique prompt, the critique (stripped), the revision request and "Revision:", '
                'exactly as specified')
REVISION_EXTENDS = ('revision_prompt: starts with the critique prompt of the same conversation, then the critique; '
                    'ends at "Revision:"')
SFT_REF = "sft_example: the original prompt and the last revision, both stripped, after one to four rounds"
SFT_LEAK = ("sft_example: no critique, request, section label or earlier draft in the pair; no revisions raise "
            "ValueError")
SOFT_REF = "soft_labels: matches the reference on random (B, 2) log-probabilities and unnormalised logits"
SOFT_SWAP = "soft_labels: swapping the two arguments gives 1 - p, and p lies in [0, 1]"
SOFT_BIAS = "soft_labels: a pure letter bias cancels: two identical answers give exactly 1/2"
SOFT_SHAPE = "soft_labels: raises ValueError unless both inputs have the same shape (B, 2)"
ELO_REF = "elo_scores: within 1 Elo point of the reference on random tournaments, with players[0] at 0"
ELO_KNOWN = ("elo_scores: a 75% record is 400 log10(3) = 190.8 points ahead (prior=0); tied players score the "
             "same")
ELO_SWEEP = "elo_scores: a clean sweep stays finite with the default prior (the reference's gap within 1 Elo point)"
ELO_BAD = "elo_scores: raises ValueError for an outcome naming a player not in players, and for no outcomes"

WRONG = {
    "prompt and response not stripped": (
        "critique_prompt",
        'return f"Human: {prompt}\\n\\nAssistant: {response}\\n\\nCritique request: {pair[\'critique_request\']}'
        '\\n\\nCritique:"',
        {CRITIQUE}),
    "a space after 'Critique:'": (
        "critique_prompt",
        TURNS + 'return turns + f"Critique request: {pair[\'critique_request\']}\\n\\nCritique: "',
        {CRITIQUE}),
    "critique not stripped": (
        "revision_prompt",
        TURNS + 'return (turns + f"Critique request: {pair[\'critique_request\']}\\n\\nCritique: {critique}\\n\\n"\n'
                '        f"Revision request: {pair[\'revision_request\']}\\n\\nRevision:")',
        {REVISION_REF}),
    "critique request left out of the revision prompt": (
        "revision_prompt",
        TURNS + 'return (turns + f"Critique: {critique.strip()}\\n\\n"\n'
                '        f"Revision request: {pair[\'revision_request\']}\\n\\nRevision:")',
        {REVISION_REF, REVISION_EXTENDS}),
    "every revision joined in the target (earlier drafts leak in)": (
        "sft_example",
        'if not revisions:\n    raise ValueError("no revisions")\n'
        'return {"prompt": prompt.strip(), "response": "\\n\\n".join(r.strip() for r in revisions)}',
        {SFT_REF, SFT_LEAK}),
    "the target labelled as a section ('Revision: ...')": (
        "sft_example",
        'if not revisions:\n    raise ValueError("no revisions")\n'
        'return {"prompt": prompt.strip(), "response": "Revision: " + revisions[-1].strip()}',
        {SFT_REF, SFT_LEAK}),
    "no ValueError for an empty list of revisions": (
        "sft_example",
        'return {"prompt": prompt.strip(), "response": revisions[-1].strip()}',
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
    "Elo in base e (400 points per nat)": (
        "elo_scores",
        ELO.format(**{**ELO_RIGHT, "scale": "400"}),
        {ELO_REF, ELO_KNOWN, ELO_SWEEP}),
    "ratings centred on their mean, not on players[0]": (
        "elo_scores",
        ELO.format(**{**ELO_RIGHT, "anchor": ".mean()"}),
        {ELO_REF}),
    "the prior ignored": (
        "elo_scores",
        ELO.format(**{**ELO_RIGHT, "prior": "0.0"}),
        {ELO_REF, ELO_SWEEP}),
    "no check of the players and of empty outcomes": (
        "elo_scores",
        ELO.format(**{**ELO_RIGHT, "guard": ""}),
        {ELO_BAD}),
}


@pytest.mark.parametrize("mistake", sorted(WRONG))
def test_wrong_implementation_loses_points_on_the_right_checks(mistake, tmp_path):
    function, body, expected_failures = WRONG[mistake]
    assert_loses_exactly(with_solution(SOLUTION, function, body, tmp_path), function, expected_failures)


def test_syntax_error_in_one_cell_keeps_the_other_marks(tmp_path):
    assert_syntax_error_costs_only(SOLUTION, "soft_labels", "elo_scores", 13, tmp_path)


@pytest.mark.parametrize("function, module", [("soft_labels", "alignlib.feedback"), ("elo_scores", "alignlib.cai"),
                                              ("sft_example", "alignlib.cai")])
def test_functions_imported_from_alignlib_are_not_accepted(function, module, tmp_path):
    assert_import_not_accepted(SOLUTION, function, module, tmp_path)


def test_a_critique_prompt_built_on_alignlibs_conversation_is_not_accepted(tmp_path):
    body = ("from alignlib.cai import conversation\n"
            "return conversation(prompt, response) + f\"Critique request: {pair['critique_request']}\\n\\nCritique:\"")
    results = grade(with_solution(SOLUTION, "critique_prompt", body, tmp_path))
    lost = [r for r in results if r.points == 0]
    assert [r.name for r in lost] == [CRITIQUE] and "alignlib's own implementation" in lost[0].message
