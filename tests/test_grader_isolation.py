"""The grader against a hostile notebook: forged results, early exits, loops that defeat the in-process time limit,
detached children, output floods, deleted files and copies of alignlib's own code (issue 24, item 5).

Most tests grade through ``grade_in_subprocess`` (marked ``pipeline``: they start worker processes, a few seconds
each); a notebook is the exercise or the solution of 00_logprobs with one graded cell added or replaced.
"""
from __future__ import annotations

import io
import time
import tracemalloc
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell

from alignlib.checks import load_checks
from alignlib.checks.grader import GRADED_TAG, OUTPUT_LIMIT, grade, grade_in_subprocess, load_functions
from grading_helpers import exercise_path, solution_path, with_cell_replaced, with_solution

SOLUTION = solution_path("00_logprobs")
EXERCISE = exercise_path("00_logprobs")
CHECKS = load_checks("00_logprobs")
MASKED_MEAN = {c.name for c in CHECKS if c.function == "masked_mean"}


def with_cell(notebook: Path, source: str, tmp_path: Path) -> Path:
    """A copy of ``notebook`` in tmp_path (same name, so the same checks) with one more graded cell at the end."""
    nb = nbformat.read(notebook, as_version=4)
    nb.cells.append(new_code_cell(source, metadata={"tags": [GRADED_TAG]}))
    path = tmp_path / notebook.name
    nbformat.write(nb, path)
    return path


def total(results) -> int:
    return sum(r.points for r in results)


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, killed but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def assert_only_masked_mean_lost(results, message: str) -> None:
    lost = {r.name: r.message for r in results if r.points < r.max_points}
    assert set(lost) == MASKED_MEAN and all(message in m for m in lost.values()), lost
    assert total(results) == 12 - sum(c.points for c in CHECKS if c.function == "masked_mean")


# ---------------------------------------------------------------- forged results and early exits

FORGE = """
import json, os
lines = ""
for index, (name, points) in enumerate({checks}):
    result = {{"name": name, "points": points, "max_points": points, "message": "ok"}}
    lines += "RESULT " + json.dumps(result) + "\\n"                                     # the old protocol
    lines += json.dumps({{"event": "result", "index": index, "result": result}}) + "\\n"   # the new one, no nonce
for fd in range(1, 64):     # stdout, stderr and whatever else is open, the grader's own channel too
    try:
        os.write(fd, lines.encode())
    except OSError:
        pass
os._exit(0)
"""


@pytest.mark.pipeline
def test_forged_result_lines_score_nothing_on_an_unanswered_notebook(tmp_path):
    source = FORGE.format(checks=[(c.name, c.points) for c in CHECKS])
    results = grade_in_subprocess(with_cell(EXERCISE, source, tmp_path), check_timeout=20)
    assert total(results) == 0
    assert {r.message for r in results} == {"not implemented"}   # the forging cell was skipped, the rest graded


@pytest.mark.pipeline
@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)"])
def test_exiting_early_scores_only_what_was_earned(exit_call, tmp_path):
    path = with_solution(SOLUTION, "masked_mean", exit_call, tmp_path)
    results = grade_in_subprocess(path, check_timeout=20)
    assert_only_masked_mean_lost(results, "SystemExit" if "sys.exit" in exit_call else "exited with code 0")


# ---------------------------------------------------------------- deadlines the student's code cannot defeat

DEFEAT_ALARM = {
    "SIGALRM ignored": "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n",
    "TimeoutError caught": "while True:\n    try:\n        while True:\n            pass\n    except TimeoutError:\n"
                           "        pass\n",
}


@pytest.mark.pipeline
@pytest.mark.parametrize("loop", sorted(DEFEAT_ALARM))
def test_a_loop_that_defeats_the_alarm_is_killed_and_costs_only_its_cell(loop, tmp_path):
    nb = nbformat.read(EXERCISE, as_version=4)
    cell = next(c for c in nb.cells if "def masked_mean(" in c.source)
    cell.source = cell.source + "\n\n" + DEFEAT_ALARM[loop]
    path = tmp_path / EXERCISE.name
    nbformat.write(nb, path)
    start = time.monotonic()
    results = grade_in_subprocess(path, check_timeout=3, timeout=90)
    assert time.monotonic() - start < 90
    lost = {r.name: r.message for r in results if r.message != "not implemented"}   # the others were graded
    assert set(lost) == MASKED_MEAN and all("did not finish within 3 s; the grader stopped it (time limit)" in m
                                            for m in lost.values()), lost


@pytest.mark.pipeline
def test_a_hung_notebook_ends_at_the_stated_deadline(tmp_path):
    path = with_cell(EXERCISE, DEFEAT_ALARM["SIGALRM ignored"], tmp_path)
    start = time.monotonic()
    results = grade_in_subprocess(path, check_timeout=30, timeout=15)
    assert time.monotonic() - start < 15 + 5
    assert all(r.points == 0 and r.message == "not graded: time limit (the grading stopped after 15 s)"
               for r in results)


CHILDREN = """
import os, pathlib, subprocess, time
in_group = subprocess.Popen(["sleep", "1000"])                         # in the worker's process group
own_session = subprocess.Popen(["sleep", "1000"], start_new_session=True)   # left it, holds the output pipe
forked = os.fork()
if forked == 0:
    time.sleep(1000)
    os._exit(0)
pathlib.Path({pids!r}).write_text(f"{{in_group.pid}} {{own_session.pid}} {{forked}}")
"""


@pytest.mark.pipeline
def test_detached_children_neither_hang_the_grader_nor_outlive_it(tmp_path):
    pids_file = tmp_path / "pids"
    path = with_cell(EXERCISE, CHILDREN.format(pids=str(pids_file)), tmp_path)
    start = time.monotonic()
    results = grade_in_subprocess(path, check_timeout=20, timeout=60)
    assert time.monotonic() - start < 40
    assert {r.message for r in results} == {"not implemented"}
    pids = [int(p) for p in pids_file.read_text().split()]
    deadline = time.monotonic() + 5   # SIGKILL is delivered asynchronously
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if alive(pid)]


# ---------------------------------------------------------------- output floods

@pytest.mark.pipeline
def test_a_flooding_cell_keeps_the_output_and_the_memory_bounded(tmp_path):
    path = with_cell(EXERCISE, "import os\nwhile True:\n    os.write(1, b'x' * 65536)", tmp_path)
    log = io.StringIO()
    tracemalloc.start()
    try:
        results = grade_in_subprocess(path, check_timeout=3, log=log)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert {r.message for r in results} == {"not implemented"}
    kept, note = log.getvalue().split("\n[... ")
    assert len(kept.encode()) <= OUTPUT_LIMIT
    assert int(note.split()[0]) > 10 * OUTPUT_LIMIT and "bytes of output discarded" in note
    assert peak < 20_000_000


@pytest.mark.unit
def test_what_a_graded_cell_prints_is_not_kept(tmp_path):
    path = with_cell(EXERCISE, "for _ in range(200):\n    print('x' * 1_000_000)", tmp_path)
    load_functions(EXERCISE)   # imports what the grader disarms, so that only the cells' own memory is traced
    tracemalloc.start()
    try:
        namespace = load_functions(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert namespace.errors == {} and peak < 20_000_000


# ---------------------------------------------------------------- the file system

DELETE_ALL = """
import os, pathlib, shutil
pathlib.Path({report!r}).write_text(os.getcwd())
for name in os.listdir("."):
    (shutil.rmtree if os.path.isdir(name) else os.remove)(name)
"""


@pytest.mark.pipeline
def test_a_cell_that_deletes_files_in_its_directory_touches_only_a_scratch_copy(tmp_path, monkeypatch):
    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / "precious.txt").write_text("keep me")
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    report = tmp_path / "cwd"
    path = with_cell(EXERCISE, DELETE_ALL.format(report=str(report)), notebooks)
    monkeypatch.chdir(repository)
    results = grade_in_subprocess(path, check_timeout=20)
    assert {r.message for r in results} == {"not implemented"}
    assert (repository / "precious.txt").read_text() == "keep me" and path.exists()
    scratch = Path(report.read_text())
    assert scratch != repository and not scratch.exists()   # a temporary directory, removed after grading


# ---------------------------------------------------------------- copies of alignlib's own code

COPIES = {
    "FunctionType of its code object": (
        "import types\nimport alignlib.logprobs as _reference\n"
        "_copy = types.FunctionType(_reference.masked_mean.__code__, vars(_reference), 'mine',\n"
        "                           _reference.masked_mean.__defaults__)\n"),
    "its source compiled again": (
        "import alignlib.logprobs as _reference\n_module = {'__name__': 'my_logprobs'}\n"
        "exec(compile(open(_reference.__file__).read(), 'my_logprobs.py', 'exec'), _module)\n"
        "_copy = _module['masked_mean']\n"),
}
CALLS = {
    "called": "def masked_mean(values, mask, dim=None):\n    return _copy(values, mask, dim)\n",
    "error caught, called again": ("def masked_mean(values, mask, dim=None):\n    try:\n"
                                   "        return _copy(values, mask, dim)\n    except AssertionError:\n"
                                   "        return _copy(values, mask, dim)\n"),
}


@pytest.mark.unit
@pytest.mark.parametrize("copy", sorted(COPIES))
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_copy_of_alignlibs_own_code_scores_zero_like_the_original(copy, call, tmp_path):
    path = with_cell_replaced(SOLUTION, "masked_mean", COPIES[copy] + "\n" + CALLS[call], tmp_path)
    assert_only_masked_mean_lost(grade(path), "it calls alignlib's own implementation")
