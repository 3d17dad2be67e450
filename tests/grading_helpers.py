"""Shared helpers of the grading tests (tests/test_grading*.py): notebooks with one solution block replaced,
and the assertions every exercise must pass (full marks for the solution, zero for the exercise, in sync)."""
from __future__ import annotations

import io
from pathlib import Path

import nbformat

from alignlib.checks import load_checks
from alignlib.checks.grader import BEGIN_CODE, END_CODE, GRADED_TAG, Result, grade, load_functions, print_table, \
    sync_exercises

ROOT = Path(__file__).resolve().parents[1]


def solution_path(exercise: str) -> Path:
    return ROOT / "solutions" / f"{exercise}.ipynb"


def exercise_path(exercise: str) -> Path:
    return ROOT / "exercises" / f"{exercise}.ipynb"


def graded_cells(notebook: Path) -> list:
    """The code cells tagged ``graded``, in order."""
    nb = nbformat.read(notebook, as_version=4)
    return [c for c in nb.cells if c.cell_type == "code" and GRADED_TAG in c.metadata.get("tags", [])]


def with_solution(solution: Path, function: str, body: str, tmp_path: Path) -> Path:
    """Copy ``solution`` to tmp_path with ``function``'s solution block replaced by ``body``.

    The copy keeps the file name, so the same checks grade it. ``body`` is written at the indentation of the
    BEGIN marker.
    """
    nb = nbformat.read(solution, as_version=4)
    (cell,) = [c for c in nb.cells if f"def {function}(" in c.source and GRADED_TAG in c.metadata.get("tags", [])]
    head, rest = cell.source.split(BEGIN_CODE)
    _, tail = rest.split(END_CODE)
    indent = head.split("\n")[-1]
    cell.source = head + body.strip("\n").replace("\n", "\n" + indent) + tail  # head ends with the indent
    path = tmp_path / solution.name
    nbformat.write(nb, path)
    return path


def with_cell_replaced(solution: Path, function: str, source: str, tmp_path: Path) -> Path:
    """Copy ``solution`` to tmp_path with the whole cell that defines ``function`` replaced by ``source``."""
    nb = nbformat.read(solution, as_version=4)
    for cell in nb.cells:
        if f"def {function}(" in cell.source:
            cell.source = source
    path = tmp_path / solution.name
    nbformat.write(nb, path)
    return path


# ---------------------------------------------------------------- assertions

def assert_registry(exercise: str, points: dict[str, int]) -> None:
    """The checks of ``exercise`` test exactly ``points``' functions, worth those points, with unique names."""
    checks = load_checks(exercise)
    assert {c.function for c in checks} == set(points)
    assert {f: sum(c.points for c in checks if c.function == f) for f in points} == points
    assert len({c.name for c in checks}) == len(checks)


def assert_one_graded_cell_per_function(solution: Path, functions) -> None:
    """Imports first (no answer there), then one graded cell per function with one answer and a docstring."""
    graded = graded_cells(solution)
    assert "import torch" in graded[0].source and BEGIN_CODE not in graded[0].source  # imports first
    for function in functions:
        (cell,) = [c for c in graded if f"def {function}(" in c.source]
        assert cell.source.count(BEGIN_CODE) == 1 and '"""' in cell.source  # one answer, a docstring
    assert not any("import" in c.source for c in graded[1:])  # the functions use only the first cell's imports


def assert_in_sync(exercise: str) -> None:
    assert f"{exercise}.ipynb" not in sync_exercises(ROOT / "solutions", ROOT / "exercises", check=True)


def assert_full_marks(notebook: Path, total: int) -> list[Result]:
    """Every check passes, and the score table ends with ``Total total/total``."""
    results = grade(notebook)
    assert [(r.name, r.message) for r in results if r.points != r.max_points] == []
    table = io.StringIO()
    print_table(results, file=table)
    assert table.getvalue().strip().endswith(f"Total {total}/{total}")
    return results


def assert_scores_zero(notebook: Path) -> None:
    """Every check scores 0 with "not implemented" (the stripped exercise)."""
    results = grade(notebook)
    assert results and all(r.points == 0 for r in results)
    assert {r.message for r in results} == {"not implemented"}


def assert_loses_exactly(notebook: Path, function: str, expected_failures: set[str]) -> None:
    """Grading ``notebook`` fails exactly ``expected_failures`` (check names), all of them checks of ``function``."""
    results = grade(notebook)
    failed = {r.name for r in results if r.points == 0}
    assert failed == expected_failures, [(r.name, r.message) for r in results if r.points == 0]
    assert all(r.points == r.max_points for r in results if r.name not in failed)
    assert all(r.name.startswith(f"{function}:") for r in results if r.name in failed)


def assert_syntax_error_costs_only(solution: Path, function: str, other: str, total: int, tmp_path: Path) -> None:
    """A syntax error in ``function``'s cell scores that function 0 and keeps every other mark."""
    path = with_solution(solution, function, "return (x *", tmp_path)
    namespace = load_functions(path)
    assert function not in namespace and other in namespace
    assert any("SyntaxError" in msg for msg in namespace.errors.values())
    results = grade(path)
    mine = [r for r in results if r.name.startswith(f"{function}:")]
    assert mine and all(r.points == 0 and "SyntaxError" in r.message for r in mine)
    assert all(r.points == r.max_points for r in results if not r.name.startswith(f"{function}:"))
    assert sum(r.points for r in results) == total - sum(r.max_points for r in mine)


def assert_import_not_accepted(solution: Path, function: str, module: str, tmp_path: Path) -> None:
    """Importing the reference ``module.function``, or wrapping it in a ``def`` of one's own, scores 0 on its
    checks and keeps every other function's marks (the disarmed reference is restored after each call)."""
    wrapper = (f"import {module} as _reference\n\ndef {function}(*args, **kwargs):\n"
               f"    return _reference.{function}(*args, **kwargs)")
    for source, message in ((f"from {module} import {function}", "def"), (wrapper, "alignlib's own implementation")):
        results = grade(with_cell_replaced(solution, function, source, tmp_path))
        mine = [r for r in results if r.name.startswith(f"{function}:")]
        assert mine and all(r.points == 0 and message in r.message for r in mine), [(r.name, r.message) for r in mine]
        assert all(r.points == r.max_points for r in results if r not in mine)
