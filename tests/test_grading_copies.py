"""The grader flags a graded function whose syntax tree matches alignlib's implementation of it (exercises 04-06):
pasting alignlib's function, renamed and with its variables renamed, is flagged; the reference solutions and the
stripped exercises are not; a flag is a warning line under the score table and never changes a score. Pasted
alignlib code also loses points, since every graded function is asked in a form alignlib's does not have."""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap

import nbformat
import pytest

from alignlib.checks.grader import GRADED_TAG, copy_warnings, grade
from alignlib.checks.similarity import NEAR_COPY, copied_functions
from grading_helpers import exercise_path, solution_path

pytestmark = pytest.mark.grading

EXERCISES = ("04_soups", "05_cai", "06_self_align")


def versions(exercise: str) -> dict:
    return importlib.import_module(f"alignlib.checks.ex{exercise}").ALIGNLIB_VERSIONS


def pasted(spec: str, function: str) -> str:
    """alignlib's ``spec`` as a student might paste it: renamed to ``function``, its locals renamed, a comment added,
    the module-level names it uses imported from its module (so that it runs; never a function the exercise grades)."""
    module_name, _, name = spec.partition(":")
    module = importlib.import_module(module_name)
    source = textwrap.dedent(inspect.getsource(getattr(module, name)))
    graded = {fn for ex in EXERCISES for fn in versions(ex)}
    used = sorted({n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)} & set(vars(module)) - graded)
    source = re.sub(rf"\bdef {name}\(", f"def {function}(", source, count=1)
    for old, new in (("weights", "ws"), ("points", "pts"), ("outcomes", "games"), ("text", "txt"),
                     ("rows", "data_rows")):
        source = re.sub(rf"\b{old}\b", new, source)
    imports = f"from {module_name} import {', '.join(used)}\n\n" if used else ""
    return f"{imports}# my answer\n{source}"


def with_cell(exercise: str, function: str, source: str, tmp_path):
    nb = nbformat.read(solution_path(exercise), as_version=4)
    (cell,) = [c for c in nb.cells if f"def {function}(" in c.source and GRADED_TAG in c.metadata.get("tags", [])]
    cell.source = source
    path = tmp_path / f"{exercise}.ipynb"
    nbformat.write(nb, path)
    return path


CASES = [pytest.param(ex, fn, specs[0], id=f"{ex}-{fn}") for ex in EXERCISES for fn, specs in versions(ex).items()]


@pytest.mark.parametrize("exercise", EXERCISES)
def test_the_solutions_and_exercises_are_not_flagged(exercise):
    assert copy_warnings(solution_path(exercise)) == []
    assert copy_warnings(exercise_path(exercise)) == []


@pytest.mark.parametrize("exercise, function, spec", CASES)
def test_pasted_alignlib_code_is_flagged(exercise, function, spec, tmp_path):
    path = with_cell(exercise, function, pasted(spec, function), tmp_path)
    (line,) = copy_warnings(path)   # a copy, or a near copy where a renamed word sits in an error message
    assert line.startswith(f"warning: `{function}` is a ") and f" of {spec} once names" in line
    assert "does not change the score" in line


def test_a_near_copy_is_flagged_and_an_unrelated_function_is_not():
    spec = "alignlib.soups:pareto_mask"
    source = pasted(spec, "pareto_mask").replace("return ~(ge & gt).any(0)",
                                                 "keep = ~(ge & gt).any(0)\n    return keep")
    (flag,) = copied_functions({3: source}, {"pareto_mask": (spec,)})
    assert NEAR_COPY <= flag.similarity < 1.0
    own = "def pareto_mask(points):\n    return [all(any(a > b for a, b in zip(p, q)) or list(p) == list(q) " \
          "for q in points) for p in points]\n"
    assert copied_functions({3: own}, {"pareto_mask": (spec,)}) == []
    assert copied_functions({3: "def pareto_mask(:"}, {"pareto_mask": (spec,)}) == []   # a syntax error: no flag


@pytest.mark.parametrize("exercise, function, spec", [CASES[2], CASES[7], CASES[-1]])
def test_pasted_alignlib_code_loses_points_and_the_warning_does_not_change_the_score(exercise, function, spec,
                                                                                      tmp_path):
    path = with_cell(exercise, function, pasted(spec, function), tmp_path)
    results = grade(path)
    mine = [r for r in results if r.name.startswith(f"{function}:")]
    assert any(r.points == 0 for r in mine), [(r.name, r.message) for r in mine]
    assert all(r.points == r.max_points for r in results if r not in mine)   # the flag takes nothing else away
