"""Exercises: strip solutions into student notebooks, grade a notebook, print a score table.

How an exercise is built
------------------------
``solutions/NN_name.ipynb`` is the single source of an exercise. Inside a code cell, the lines from
``### BEGIN SOLUTION`` to ``### END SOLUTION`` are the answer; ``strip_solutions`` replaces them with one
``raise NotImplementedError(...)`` line at the marker's indentation. In a markdown cell, the text between
``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->`` becomes "_Your answer here._".
``sync_exercises`` writes the stripped copies to ``exercises/`` (never edit those by hand).

How a notebook is graded
------------------------
Code cells tagged ``graded`` (cell metadata ``tags``) hold the functions the student writes, and the
imports they need. ``load_functions`` runs only those cells, in order, in a fresh namespace; a cell that
fails (a syntax error, say) is recorded and skipped, so its exercise scores zero and the rest still count.
The checks of notebook ``NN_name`` live in ``alignlib.checks.exNN_name`` (see ``alignlib.checks``); each is
worth some points and passes unless it raises. ``grade`` runs them and ``print_table`` shows the scores.

Isolation
---------
``python -m alignlib grade`` grades in a separate process (``grade_in_subprocess``), so a student's cell can
neither hang nor crash the caller. Inside, every graded cell and every check runs under a time limit
(``CHECK_TIMEOUT`` seconds; an endless loop scores zero on its checks and the rest still count), and the
grader's own code (the checks, alignlib's reference implementations, ``torch``) is fingerprinted before the
student's cells run and compared after each step: a cell that patches any of it scores zero on everything.

Command line::

    python -m alignlib grade exercises/00_logprobs.ipynb
    python -m alignlib exercises            # write missing exercises/ files; refuses to overwrite edited ones
    python -m alignlib exercises --force    # regenerate exercises/ from solutions/, overwriting any answers
    python -m alignlib exercises --check    # exit 1 if exercises/ is out of date
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from .checks import Namespace, load_checks

BEGIN_CODE = "### BEGIN SOLUTION"
END_CODE = "### END SOLUTION"
BEGIN_MARKDOWN = "<!-- BEGIN SOLUTION -->"
END_MARKDOWN = "<!-- END SOLUTION -->"
GRADED_TAG = "graded"
STUB_LINE = 'raise NotImplementedError("Exercise: replace this line with your code, then re-run the cell.")'
ANSWER_PLACEHOLDER = "_Your answer here._"
CELL_FILENAME = "<graded cell {index}>"  # the filename of code compiled from a graded cell
CHECK_TIMEOUT = 60.0   # seconds for one graded cell to run, and for one check
# the modules a student's cell could patch to make a wrong answer pass (checks are added per exercise)
GUARDED_MODULES = ("torch", "torch.testing", "torch.nn.functional", "alignlib.checks", "alignlib.logprobs",
                   "alignlib.ppo", "alignlib.rrhf", "alignlib.raft", "alignlib.soups", "alignlib.tiny_lab",
                   "alignlib.cai", "alignlib.feedback", "alignlib.self_align", "alignlib.multiple_choice",
                   "alignlib.prefix_cache", "math")


class GraderTampered(RuntimeError):
    """A graded cell changed the grader's own code."""


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str):
    """Raise ``TimeoutError`` in the block after ``seconds`` (main thread only; elsewhere no limit)."""
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds:g} s (an endless loop?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fingerprint(module_names) -> dict:
    """Identity of every global of the grader's modules (and each function's code object); submodules, which
    appear as attributes when they are first imported, are left out."""
    import types

    prints = {}
    for name in module_names:
        module = importlib.import_module(name)
        for key, value in list(vars(module).items()):
            if not isinstance(value, types.ModuleType):
                prints[f"{name}.{key}"] = (id(value), id(getattr(value, "__code__", None)))
    return prints


def _tampered(before: dict, modules) -> list[str]:
    """Globals of the grader that were replaced or deleted, and new globals in alignlib's own modules (which
    could shadow a builtin that a check uses); new attributes of torch (its lazy caches) do not count."""
    after = fingerprint(modules)
    changed = [k for k in before if before[k] != after.get(k)]
    added = [k for k in after.keys() - before.keys() if k.startswith("alignlib.")]
    return sorted(changed + added)


# ---------------------------------------------------------------- solutions -> exercises

def _strip_lines(lines: list[str], begin: str, end: str, replacement: str, cell_index: int,
                 keep_indent: bool) -> list[str]:
    """Replace every ``begin ... end`` block of ``lines`` (markers included) by one ``replacement`` line."""
    out: list[str] = []
    open_at = None  # line number of the BEGIN marker of the block being skipped
    for number, line in enumerate(lines):
        marker = line.strip()
        if marker.startswith(begin):
            if open_at is not None:
                raise ValueError(f"cell {cell_index}: '{begin}' on line {number + 1} inside the block opened on "
                                 f"line {open_at + 1}; close it with '{end}' first.")
            open_at = number
            indent = line[: len(line) - len(line.lstrip())] if keep_indent else ""
            out.append(indent + replacement)
        elif marker.startswith(end):
            if open_at is None:
                raise ValueError(f"cell {cell_index}: '{end}' on line {number + 1} has no matching '{begin}'.")
            open_at = None
        elif open_at is None:
            out.append(line)
    if open_at is not None:
        raise ValueError(f"cell {cell_index}: '{begin}' on line {open_at + 1} is never closed by '{end}'.")
    return out


def strip_solutions(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The student copy of a solution notebook; ``nb`` itself is left unchanged.

    Code cells: each solution block becomes ``raise NotImplementedError(...)`` at the indentation of its
    BEGIN marker; outputs, execution counts and execution timings are cleared. Markdown cells: each
    solution block becomes "_Your answer here._". Raises ValueError naming the cell of an unbalanced marker.
    """
    nb = copy.deepcopy(nb)
    for index, cell in enumerate(nb.cells):
        lines = cell.source.split("\n")
        if cell.cell_type == "code":
            cell.source = "\n".join(_strip_lines(lines, BEGIN_CODE, END_CODE, STUB_LINE, index, keep_indent=True))
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
        elif cell.cell_type == "markdown":
            cell.source = "\n".join(
                _strip_lines(lines, BEGIN_MARKDOWN, END_MARKDOWN, ANSWER_PLACEHOLDER, index, keep_indent=False))
    return nb


def _fingerprint(nb: nbformat.NotebookNode) -> str:
    """What must agree for an exercise to be up to date: each cell's type, source and tags (not outputs)."""
    cells = [
        {"type": c.cell_type, "source": c.source.rstrip(), "tags": sorted(c.get("metadata", {}).get("tags", []))}
        for c in nb.cells
    ]
    return json.dumps(cells, sort_keys=True)


class WouldOverwrite(RuntimeError):
    """``exercises/`` holds files that differ from what would be generated (a student's answers, say)."""


def sync_exercises(solutions_dir: str | Path = "solutions", exercises_dir: str | Path = "exercises",
                   check: bool = False, force: bool = False) -> list[str]:
    """Regenerate ``exercises/`` from ``solutions/``, or with ``check=True`` only report what is stale.

    Returns the file names written (``check=False``) or the names whose exercise copy is missing or differs
    from the stripped solution (``check=True``; nothing is written, an empty list means up to date). Without
    ``force``, an existing exercise whose cells differ from the generated copy is never overwritten: it may hold
    a student's work. Then nothing at all is written and ``WouldOverwrite`` names the files.
    """
    solutions_dir, exercises_dir = Path(solutions_dir), Path(exercises_dir)
    if not solutions_dir.is_dir():
        raise FileNotFoundError(f"solutions directory {solutions_dir} not found; run from the repository root.")
    generated = {source.name: strip_solutions(nbformat.read(source, as_version=4))
                 for source in sorted(solutions_dir.glob("*.ipynb"))}
    stale = [name for name, exercise in generated.items()
             if not (exercises_dir / name).exists()
             or _fingerprint(nbformat.read(exercises_dir / name, as_version=4)) != _fingerprint(exercise)]
    if check:
        return stale
    edited = [name for name in stale if (exercises_dir / name).exists()]
    if edited and not force:
        raise WouldOverwrite(
            f"{', '.join(edited)} in {exercises_dir}/ differ from the generated copies and may hold answers; nothing "
            f"was written. Save your work elsewhere, then run `python -m alignlib exercises --force`.")
    exercises_dir.mkdir(parents=True, exist_ok=True)
    for name in stale:
        nbformat.write(generated[name], exercises_dir / name)
    return stale


# ---------------------------------------------------------------- loading and grading a notebook

def load_functions(notebook_path: str | Path, cell_timeout: float | None = CHECK_TIMEOUT) -> Namespace:
    """Run the ``graded`` code cells of a notebook, in order, in a fresh namespace, and return it.

    A cell that raises while running (syntax error, a missing import, ...) or runs longer than ``cell_timeout``
    seconds is recorded in ``namespace.errors`` (cell index -> one-line message) and skipped; the others still run.
    Output printed by the cells is swallowed so the score table stays readable.
    """
    nb = nbformat.read(Path(notebook_path), as_version=4)
    scope: dict = {"__name__": "__graded__"}
    errors: dict[int, str] = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or GRADED_TAG not in cell.get("metadata", {}).get("tags", []):
            continue
        try:
            code = compile(cell.source, CELL_FILENAME.format(index=index), "exec")
            with contextlib.redirect_stdout(io.StringIO()), time_limit(cell_timeout, f"graded cell {index}"):
                exec(code, scope)
        except BaseException as err:  # noqa: BLE001 - a student's cell may raise anything, even SystemExit
            if isinstance(err, KeyboardInterrupt):
                raise
            errors[index] = _one_line(err)
    return Namespace(scope, errors=errors)


@dataclass
class Result:
    """The score of one check."""

    name: str          # the check's name, e.g. "sequence_logprob: matches the reference"
    points: int        # points earned: max_points or 0
    max_points: int    # what the check is worth
    message: str       # "ok", "not implemented", or why it failed (one line)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def grade(notebook_path: str | Path, exercise: str | None = None,
          check_timeout: float | None = CHECK_TIMEOUT) -> list[Result]:
    """Grade a notebook in this process: load its graded functions and run every check of its exercise.

    ``exercise`` names the checks to use (``"00_logprobs"``); by default the notebook's file stem, so
    ``exercises/00_logprobs.ipynb`` is graded by ``alignlib.checks.ex00_logprobs``. Each cell and each check
    runs under ``check_timeout`` seconds; if a cell patched the grader, every check scores zero.
    """
    path = Path(notebook_path)
    if not path.exists():
        raise FileNotFoundError(f"notebook {path} not found.")
    checks = load_checks(exercise or path.stem)
    modules = GUARDED_MODULES + tuple(sorted({c.run.__module__ for c in checks}))
    importlib.import_module("torch._dynamo")   # which wraps torch.manual_seed when first imported
    before = fingerprint(modules)
    namespace = load_functions(path, cell_timeout=check_timeout)
    results = []
    for chk in checks:
        if _tampered(before, modules):   # scored below: every check zero
            break
        try:
            with time_limit(check_timeout, "the check"):
                chk.run(namespace)
        except NotImplementedError:
            results.append(Result(chk.name, 0, chk.points, "not implemented"))
        except AssertionError as err:
            results.append(Result(chk.name, 0, chk.points, " ".join(str(err).split()) or "assertion failed"))
        except Exception as err:  # noqa: BLE001 - any failure of the student's code scores zero
            results.append(Result(chk.name, 0, chk.points, _one_line(err)))
        else:
            results.append(Result(chk.name, chk.points, chk.points, "ok"))
    changed = _tampered(before, modules)   # by a graded cell, or by the student's code during a check
    if changed:
        message = f"a graded cell modified the grader ({', '.join(changed[:3])}); nothing can be scored"
        return [Result(c.name, 0, c.points, message) for c in checks]
    return results


def grade_in_subprocess(notebook_path: str | Path, exercise: str | None = None,
                        check_timeout: float = CHECK_TIMEOUT, timeout: float | None = None) -> list[Result]:
    """``grade`` in a fresh Python process, killed after ``timeout`` seconds (default: a limit per check plus
    two minutes); a check that never reported scores zero with the reason."""
    path = Path(notebook_path)
    if not path.exists():
        raise FileNotFoundError(f"notebook {path} not found.")
    checks = load_checks(exercise or path.stem)
    timeout = timeout or (len(checks) + 2) * check_timeout + 120
    cmd = [sys.executable, "-m", "alignlib.grading", "_worker", str(path), exercise or path.stem, str(check_timeout)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, reason = proc.stdout, (f"the grading process exited with code {proc.returncode}: "
                                    f"{' '.join(proc.stderr.split()[-30:])}")
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        reason = f"the grading process was stopped after {timeout:g} s"
    reported = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            r = Result(**json.loads(line[len("RESULT "):]))
            reported[r.name] = r
    return [reported.get(c.name) or Result(c.name, 0, c.points, f"not graded: {reason}") for c in checks]


def print_table(results: list[Result], file=None) -> None:
    """Print one line per check (points, name, message) and a final ``Total earned/possible`` line."""
    file = file or sys.stdout
    width = max([len(r.name) for r in results] + [5])
    print(f"{'points':>7}  {'check':<{width}}  result", file=file)
    for r in results:
        print(f"{r.points:>3}/{r.max_points:<3}  {r.name:<{width}}  {r.message}", file=file)
    earned, possible = sum(r.points for r in results), sum(r.max_points for r in results)
    print(f"Total {earned}/{possible}", file=file)


# ---------------------------------------------------------------- command line

def grade_command(path: str | Path, exercise: str | None = None) -> int:
    """``python -m alignlib grade NOTEBOOK``: print the score table. 0 once graded, 2 on a usage error."""
    try:
        results = grade_in_subprocess(path, exercise)
    except (FileNotFoundError, LookupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_table(results)
    return 0


def exercises_command(check: bool = False, solutions_dir: str | Path = "solutions",
                      exercises_dir: str | Path = "exercises", force: bool = False) -> int:
    """``python -m alignlib exercises [--check] [--force]``: regenerate exercises/, or exit 1 if it is out of date."""
    try:
        names = sync_exercises(solutions_dir, exercises_dir, check=check, force=force)
    except (FileNotFoundError, ValueError, WouldOverwrite) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not check:
        for name in names:
            print(f"wrote {Path(exercises_dir) / name}")
        return 0
    if names:
        print("out of date: " + ", ".join(names) + ". Regenerating overwrites answers written in those files: save "
              "them, then run `python -m alignlib exercises --force`.", file=sys.stderr)
        return 1
    print(f"{exercises_dir}/ is up to date with {solutions_dir}/")
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Sub-commands ``grade`` and ``exercises`` (added to ``parser``'s sub-parsers if one is given)."""
    parser = parser or argparse.ArgumentParser(prog="python -m alignlib.grading", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grade", help="grade an exercise notebook and print the score table")
    g.add_argument("notebook", help="path to the notebook, e.g. exercises/00_logprobs.ipynb")
    g.add_argument("--exercise", default=None, help="which checks to use (default: the notebook's file stem)")
    e = sub.add_parser("exercises", help="regenerate exercises/ from solutions/")
    e.add_argument("--check", action="store_true", help="write nothing; exit 1 if exercises/ is out of date")
    e.add_argument("--force", action="store_true", help="overwrite exercise files that differ (answers are lost)")
    return parser


def _worker(path: str, exercise: str, check_timeout: str) -> int:
    """The process behind ``grade_in_subprocess``: one ``RESULT {json}`` line per check, as soon as it is known."""
    from dataclasses import asdict

    for r in grade(path, exercise, check_timeout=float(check_timeout)):
        print("RESULT " + json.dumps(asdict(r)), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``grade NOTEBOOK [--exercise NAME]`` or ``exercises [--check]``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        return _worker(*argv[1:4])
    args = build_parser().parse_args(argv)
    if args.command == "grade":
        return grade_command(args.notebook, args.exercise)
    return exercises_command(args.check, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
