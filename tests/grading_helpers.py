"""Shared helpers of the grading tests (tests/test_grading*.py, tests/test_grader_isolation.py): the solution and
exercise notebooks, copies with one solution block or cell replaced, and the check that a wrong implementation loses
exactly the right checks. The assertions every exercise must pass are in test_grading_exercises.py."""
from __future__ import annotations

from pathlib import Path

import nbformat

from alignlib.checks.grader import BEGIN_CODE, END_CODE, GRADED_TAG, grade

ROOT = Path(__file__).resolve().parents[1]


def solution_path(exercise: str) -> Path:
    return ROOT / "solutions" / f"{exercise}.ipynb"


def exercise_path(exercise: str) -> Path:
    return ROOT / "exercises" / f"{exercise}.ipynb"


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

def assert_loses_exactly(notebook: Path, function: str, expected_failures: set[str]) -> None:
    """Grading ``notebook`` fails exactly ``expected_failures`` (check names), all of them checks of ``function``."""
    results = grade(notebook)
    failed = {r.name for r in results if r.points == 0}
    assert failed == expected_failures, [(r.name, r.message) for r in results if r.points == 0]
    assert all(r.points == r.max_points for r in results if r.name not in failed)
    assert all(r.name.startswith(f"{function}:") for r in results if r.name in failed)
