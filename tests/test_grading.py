"""Grading tests: solutions are stripped correctly, exercises stay in sync, the grade command, time limits and
tampering. Every exercise's registry, full marks, zero marks and wrong implementations: test_grading_exercises.py."""
from __future__ import annotations

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

import alignlib.checks.ex00_logprobs as ex00_checks
import alignlib.logprobs as logprobs_reference
from alignlib.checks import load_checks
from alignlib.checks.grader import (ANSWER_PLACEHOLDER, BEGIN_CODE, END_CODE, exercises_command, grade, grade_command,
                                   grade_in_subprocess, load_functions, strip_solutions, sync_exercises)
from grading_helpers import ROOT, solution_path, with_solution

SOLUTION = solution_path("00_logprobs")


# ---------------------------------------------------------------- strip_solutions

def tiny_notebook() -> nbformat.NotebookNode:
    code = new_code_cell(
        "def add_one(x):\n"
        '    """Return x + 1."""\n'
        "    ### BEGIN SOLUTION\n"
        "    y = x + 1\n"
        "    return y\n"
        "    ### END SOLUTION\n"
        "\n"
        "CONSTANT = 3",
        execution_count=7,
        outputs=[new_output("stream", name="stdout", text="hi\n")],
    )
    top_level = new_code_cell("### BEGIN SOLUTION\nanswer = 42\n### END SOLUTION")
    markdown = new_markdown_cell("Why?\n\n<!-- BEGIN SOLUTION -->\nBecause.\n<!-- END SOLUTION -->\n\nNext.")
    return new_notebook(cells=[new_markdown_cell("# Title"), code, top_level, markdown])


@pytest.mark.unit
def test_strip_solutions_replaces_blocks_and_keeps_indentation():
    original = tiny_notebook()
    stripped = strip_solutions(original)
    lines = stripped.cells[1].source.split("\n")
    assert lines[:3] == ["def add_one(x):", '    """Return x + 1."""', lines[2]]
    assert lines[2].startswith("    raise NotImplementedError(")
    assert lines[3:] == ["", "CONSTANT = 3"]
    assert stripped.cells[2].source.startswith("raise NotImplementedError(")  # top level: no indentation
    assert stripped.cells[3].source == f"Why?\n\n{ANSWER_PLACEHOLDER}\n\nNext."
    assert stripped.cells[1].outputs == [] and stripped.cells[1].execution_count is None
    assert "y = x + 1" in original.cells[1].source and original.cells[1].outputs  # input left unchanged


@pytest.mark.unit
def test_stripped_function_raises_not_implemented():
    scope: dict = {}
    exec(strip_solutions(tiny_notebook()).cells[1].source, scope)
    with pytest.raises(NotImplementedError):
        scope["add_one"](1)


@pytest.mark.unit
@pytest.mark.parametrize("source", [
    f"x = 1\n{BEGIN_CODE}\ny = 2",                                   # never closed
    f"x = 1\n{END_CODE}",                                            # END without BEGIN
    f"{BEGIN_CODE}\n{BEGIN_CODE}\ny = 2\n{END_CODE}\n{END_CODE}",    # nested
])
def test_unbalanced_markers_name_the_cell(source):
    nb = new_notebook(cells=[new_markdown_cell("intro"), new_code_cell(source)])
    with pytest.raises(ValueError, match="cell 1"):
        strip_solutions(nb)


@pytest.mark.unit
def test_unbalanced_markdown_markers_name_the_cell():
    nb = new_notebook(cells=[new_markdown_cell("<!-- BEGIN SOLUTION -->\nanswer")])
    with pytest.raises(ValueError, match="cell 0"):
        strip_solutions(nb)


# ---------------------------------------------------------------- sync_exercises

@pytest.mark.unit
def test_exercises_are_in_sync_with_solutions():
    assert sync_exercises(ROOT / "solutions", ROOT / "exercises", check=True) == []


@pytest.mark.unit
def test_sync_check_ignores_outputs_and_detects_edits(tmp_path):
    solutions, exercises = tmp_path / "solutions", tmp_path / "exercises"
    solutions.mkdir()
    nbformat.write(tiny_notebook(), solutions / "01_tiny.ipynb")
    assert sync_exercises(solutions, exercises, check=True) == ["01_tiny.ipynb"]  # missing copy
    assert sync_exercises(solutions, exercises) == ["01_tiny.ipynb"]
    assert sync_exercises(solutions, exercises, check=True) == []

    nb = nbformat.read(solutions / "01_tiny.ipynb", as_version=4)
    nb.cells[1].outputs = [new_output("stream", name="stdout", text="re-executed\n")]
    nb.cells[1].execution_count = 99
    nbformat.write(nb, solutions / "01_tiny.ipynb")
    assert sync_exercises(solutions, exercises, check=True) == []  # outputs do not count

    nb.cells[1].source = nb.cells[1].source.replace("CONSTANT = 3", "CONSTANT = 4")
    nbformat.write(nb, solutions / "01_tiny.ipynb")
    assert sync_exercises(solutions, exercises, check=True) == ["01_tiny.ipynb"]
    assert exercises_command(check=True, solutions_dir=solutions, exercises_dir=exercises) == 1


@pytest.mark.unit
def test_regenerating_never_overwrites_a_students_answers_without_force(tmp_path, capsys):
    solutions, exercises = tmp_path / "solutions", tmp_path / "exercises"
    solutions.mkdir()
    nbformat.write(tiny_notebook(), solutions / "01_tiny.ipynb")
    sync_exercises(solutions, exercises)
    student = nbformat.read(exercises / "01_tiny.ipynb", as_version=4)
    student.cells[1].source += "\n# my answer"
    nbformat.write(student, exercises / "01_tiny.ipynb")
    assert exercises_command(check=True, solutions_dir=solutions, exercises_dir=exercises) == 1
    assert "--force" in capsys.readouterr().err
    assert exercises_command(solutions_dir=solutions, exercises_dir=exercises) == 2
    assert "my answer" in (exercises / "01_tiny.ipynb").read_text()      # untouched
    assert exercises_command(solutions_dir=solutions, exercises_dir=exercises, force=True) == 0
    assert "my answer" not in (exercises / "01_tiny.ipynb").read_text()


# ---------------------------------------------------------------- grading

@pytest.mark.unit
def test_load_checks_of_a_missing_exercise_raises():
    # the registries of the exercises 00-06: test_grading_exercises.py::test_checks_registry
    with pytest.raises(LookupError, match="no checks"):
        load_checks("99_missing")


@pytest.mark.pipeline
def test_grade_command_prints_table(capsys):
    assert grade_command(SOLUTION) == 0
    assert "Total 12/12" in capsys.readouterr().out
    assert grade_command(ROOT / "no_such_notebook.ipynb") == 2


# ---------------------------------------------------------------- isolation: time limits and tampering

@pytest.mark.unit
def test_an_endless_function_scores_zero_on_its_checks_only(tmp_path):
    path = with_solution(SOLUTION, "masked_mean", "while True:\n    pass", tmp_path)
    results = grade(path, check_timeout=1.0)
    lost = [r for r in results if r.points == 0]
    assert lost and all(r.name.startswith("masked_mean:") and "did not finish within 1 s" in r.message for r in lost)
    assert sum(r.points for r in results) == 12 - sum(r.max_points for r in lost)


@pytest.mark.unit
def test_an_endless_graded_cell_is_skipped_with_the_reason(tmp_path):
    nb = nbformat.read(SOLUTION, as_version=4)
    cell = next(c for c in nb.cells if "def masked_mean(" in c.source)
    cell.source = "while True:\n    pass\n" + cell.source
    path = tmp_path / SOLUTION.name
    nbformat.write(nb, path)
    namespace = load_functions(path, cell_timeout=1.0)
    assert "masked_mean" not in namespace and any("did not finish" in m for m in namespace.errors.values())


@pytest.mark.unit
@pytest.mark.parametrize("patch", [
    "import torch\ntorch.allclose = lambda *args, **kwargs: True",
    "import alignlib.checks.ex00_logprobs as grader\ngrader.assert_close = lambda *args, **kwargs: None",
    "import alignlib.logprobs as reference\nreference.masked_mean = lambda values, mask, dim=None: values.mean()",
])
def test_a_cell_that_patches_the_grader_scores_zero(patch, tmp_path):
    nb = nbformat.read(SOLUTION, as_version=4)
    cell = next(c for c in nb.cells if "def masked_mean(" in c.source)
    cell.source = cell.source + "\n\n" + patch
    path = tmp_path / SOLUTION.name
    nbformat.write(nb, path)
    saved = (torch.allclose, ex00_checks.assert_close, logprobs_reference.masked_mean)
    try:
        results = grade(path)
    finally:   # undo the patch for the other tests in this process
        torch.allclose, ex00_checks.assert_close, logprobs_reference.masked_mean = saved
    assert all(r.points == 0 and "modified the grader" in r.message for r in results)


@pytest.mark.pipeline
def test_the_grade_command_grades_in_a_separate_process_with_a_deadline(tmp_path):
    path = with_solution(SOLUTION, "masked_mean", "import os\nos._exit(3)", tmp_path)   # kills its process
    results = grade_in_subprocess(path)
    assert all(r.points == 0 and "exited with code 3" in r.message for r in results if r.name.startswith("masked"))
    path = with_solution(SOLUTION, "masked_mean", "import time\ntime.sleep(60)", tmp_path)
    # killed wherever it is; full marks: test_grade_command_prints_table
    results = grade_in_subprocess(path, timeout=0.5)
    assert all(r.points == 0 and "stopped after 0.5 s" in r.message for r in results)
