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
``python -m alignlib grade`` grades in worker processes (``grade_in_subprocess``, which ``_worker`` serves):

- Results travel on a pipe of their own (``pass_fds``), one JSON line per step, each carrying a random nonce that
  the worker read from stdin before any student code ran; the parent accepts only those lines, and a result only
  for the check that is running. stdout and stderr carry just what the student's code prints: the parent keeps
  the first ``OUTPUT_LIMIT`` bytes and counts the rest. Printing result lines, or exiting, earns nothing.
- The parent keeps the time. The worker runs in its own session and reports each cell and check as it starts;
  one still running ``KILL_GRACE`` s after its ``CHECK_TIMEOUT``, or the grading past its total ``timeout``, gets the
  whole process group killed (``os.killpg``), as do processes that left the group but hold the worker's pipes.
  A cell or check that was stopped, or that ended the worker (``os._exit``), costs only itself: the next worker
  skips that cell (its functions score zero) or starts at the next check. Inside the worker a ``SIGALRM`` limit
  (``time_limit``) ends an ordinary endless loop without a restart.
- The worker's working directory is an empty temporary directory, removed afterwards (the graded cells and the
  checks read nothing relative to it), so a cell that deletes files "here" cannot touch the repository.
- The grader's own code (the checks, alignlib's reference implementations, ``torch``) is fingerprinted before the
  student's cells run and compared after each step: a cell that patches any of it scores zero on everything.
  alignlib's implementations of the graded functions are disarmed while a graded cell or a student's function
  runs, and a copy of their code is stopped when called (``alignlib.checks.forbid_reference_calls``).

Limits: the student's code shares the worker's interpreter with the checks, so code written against the grader
(reading the nonce from memory, walking the grader's frames, calling a copy from a new thread) can still forge a
score; and a cell can read and write any file the user can, by its absolute path. Grading untrusted notebooks
for real takes an operating-system sandbox (a container with a read-only repository and no network).

Command line::

    python -m alignlib grade exercises/00_logprobs.ipynb
    python -m alignlib exercises            # write missing exercises/ files; refuses to overwrite edited ones
    python -m alignlib exercises --force    # regenerate exercises/ from solutions/, overwriting any answers
    python -m alignlib exercises --check    # exit 1 if exercises/ is out of date
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import Namespace, forbid_reference_calls, load_checks

if TYPE_CHECKING:
    import nbformat   # imported where it is used: a grading worker never needs it (it costs seconds to import)

BEGIN_CODE = "### BEGIN SOLUTION"
END_CODE = "### END SOLUTION"
BEGIN_MARKDOWN = "<!-- BEGIN SOLUTION -->"
END_MARKDOWN = "<!-- END SOLUTION -->"
GRADED_TAG = "graded"
STUB_LINE = 'raise NotImplementedError("Exercise: replace this line with your code, then re-run the cell.")'
ANSWER_PLACEHOLDER = "_Your answer here._"
CELL_FILENAME = "<graded cell {index}>"  # the filename of code compiled from a graded cell
CHECK_TIMEOUT = 60.0   # seconds for one graded cell to run, and for one check
KILL_GRACE = 2.0        # grade_in_subprocess kills a worker this long after a cell's or a check's limit passed
STARTUP_TIMEOUT = 120.0  # seconds for a worker to import torch and the checks, before any student code runs
OUTPUT_LIMIT = 1_000_000  # bytes of the student's output that grade_in_subprocess keeps; the rest is discarded
# the modules a student's cell could patch to make a wrong answer pass (checks are added per exercise)
GUARDED_MODULES = ("torch", "torch.testing", "torch.nn.functional", "alignlib.checks", "alignlib.logprobs",
                   "alignlib.ppo", "alignlib.rrhf", "alignlib.raft", "alignlib.soups", "alignlib.tiny_lab",
                   "alignlib.cai", "alignlib.evaluation", "alignlib.feedback", "alignlib.self_align",
                   "alignlib.multiple_choice", "alignlib.prefix_cache", "math")   # evaluation: cai's Elo


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
    import nbformat

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

class _Discard(io.TextIOBase):
    """A text stream that forgets what is written to it (what a graded cell prints is not kept)."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


def graded_sources(notebook_path: str | Path) -> dict[int, str]:
    """The source of each code cell tagged ``graded`` (cell index -> source), in order."""
    import nbformat

    nb = nbformat.read(Path(notebook_path), as_version=4)
    return {i: c.source for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and GRADED_TAG in c.get("metadata", {}).get("tags", [])}


def load_functions(notebook: str | Path | dict[int, str], cell_timeout: float | None = CHECK_TIMEOUT,
                   skip: dict[int, str] | None = None, on_cell=None) -> Namespace:
    """Run the ``graded`` code cells of a notebook (its path, or ``graded_sources`` of it), in order, in a fresh
    namespace, and return it.

    A cell that raises while running (syntax error, a missing import, ...) or runs longer than ``cell_timeout``
    seconds is recorded in ``namespace.errors`` (cell index -> one-line message) and skipped; the others still run.
    What the cells print is discarded, so the score table stays readable. alignlib's reference implementations
    are disarmed while a cell runs (``forbid_reference_calls``), so a cell cannot keep a copy of their code.
    ``skip`` (cell index -> why) names cells not to run (the grader stopped them before); ``on_cell(index)`` is
    called before each cell runs.
    """
    sources = notebook if isinstance(notebook, dict) else graded_sources(notebook)
    scope: dict = {"__name__": "__graded__"}
    errors: dict[int, str] = dict(skip or {})
    for index, source in sources.items():
        if index in errors:
            continue
        if on_cell is not None:
            on_cell(index)
        try:
            code = compile(source, CELL_FILENAME.format(index=index), "exec")
            with contextlib.redirect_stdout(_Discard()), time_limit(cell_timeout, f"graded cell {index}"), \
                    forbid_reference_calls():
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


def _run_check(chk, namespace: Namespace, check_timeout: float | None) -> Result:
    """Run one check under the time limit; any failure of the student's code (even ``sys.exit``) scores zero."""
    try:
        with time_limit(check_timeout, "the check"):
            chk.run(namespace)
    except NotImplementedError:
        return Result(chk.name, 0, chk.points, "not implemented")
    except AssertionError as err:
        return Result(chk.name, 0, chk.points, " ".join(str(err).split()) or "assertion failed")
    except BaseException as err:  # noqa: BLE001 - SystemExit too; only Ctrl-C stops the grader
        if isinstance(err, KeyboardInterrupt):
            raise
        return Result(chk.name, 0, chk.points, _one_line(err))
    return Result(chk.name, chk.points, chk.points, "ok")


def grade(notebook_path: str | Path, exercise: str | None = None, check_timeout: float | None = CHECK_TIMEOUT,
          skip_cells: dict[int, str] | None = None, first_check: int = 0, report=None,
          sources: dict[int, str] | None = None) -> list[Result]:
    """Grade a notebook in this process: load its graded functions and run every check of its exercise.

    ``exercise`` names the checks to use (``"00_logprobs"``); by default the notebook's file stem, so
    ``exercises/00_logprobs.ipynb`` is graded by ``alignlib.checks.ex00_logprobs``. Each cell and each check
    runs under ``check_timeout`` seconds; if a cell patched the grader, every check scores zero.

    The other arguments serve the worker of ``grade_in_subprocess``: ``skip_cells`` (cell index -> why) are not
    run, checks before number ``first_check`` are not run (nor returned), ``report(event, **fields)`` is told of
    every step: ``("cell", index=i)`` and ``("check", index=k)`` before it runs, ``("result", index=k,
    result={...})`` after, and ``("tampered", message=...)`` if the grader was modified; ``sources`` are the
    graded cells (``graded_sources``) if already read.
    """
    report = report or (lambda event, **fields: None)
    path = Path(notebook_path)
    if not path.exists():
        raise FileNotFoundError(f"notebook {path} not found.")
    checks = load_checks(exercise or path.stem)
    modules = GUARDED_MODULES + tuple(sorted({c.run.__module__ for c in checks}))
    importlib.import_module("torch._dynamo")   # which wraps torch.manual_seed when first imported
    before = fingerprint(modules)
    namespace = load_functions(path if sources is None else sources, cell_timeout=check_timeout, skip=skip_cells,
                               on_cell=lambda index: report("cell", index=index))
    results = []
    for index, chk in enumerate(checks):
        if index < first_check:
            continue
        if _tampered(before, modules):   # scored below: every check zero
            break
        report("check", index=index)
        results.append(_run_check(chk, namespace, check_timeout))
        report("result", index=index, result=asdict(results[-1]))
    changed = _tampered(before, modules)   # by a graded cell, or by the student's code during a check
    if changed:
        message = f"a graded cell modified the grader ({', '.join(changed[:3])}); nothing can be scored"
        report("tampered", message=message)
        return [Result(c.name, 0, c.points, message) for c in checks]
    return results


# ---------------------------------------------------------------- grading in a separate process

class _Output:
    """The first ``limit`` bytes of a stream and its last ``tail`` bytes; the rest is counted, not kept."""

    def __init__(self, limit: int = OUTPUT_LIMIT, tail: int = 4000):
        self.head, self.last, self.limit, self.tail_size, self.total = bytearray(), b"", limit, tail, 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limit - len(self.head)
        if room > 0:
            self.head += data[:room]
        self.last = (self.last + data)[-self.tail_size:]

    def text(self) -> str:
        """What was kept, with a note of how much was discarded."""
        text = self.head.decode(errors="replace")
        if self.total > len(self.head):
            text += f"\n[... {self.total - len(self.head)} more bytes of output discarded]\n"
        return text

    def last_words(self, count: int = 30) -> str:
        return " ".join(self.last.decode(errors="replace").split()[-count:])


class _Channel:
    """The worker's reports: JSON lines that carry this run's nonce. Anything else on the pipe is dropped, and so
    is a line longer than ``limit`` bytes, so the parent never holds more than that."""

    def __init__(self, nonce: str, limit: int = 65536):
        self.nonce, self.limit, self.partial, self.overlong = nonce, limit, b"", False

    def add(self, data: bytes) -> list[dict]:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        events = []
        for line in lines:
            if not self.overlong:
                with contextlib.suppress(ValueError, RecursionError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("nonce") == self.nonce:
                        events.append(event)
            self.overlong = False
        if len(self.partial) > self.limit:
            self.partial, self.overlong = b"", True
        return events


@dataclass
class _Run:
    """What one worker process did: the step it was in when it ended, its results and how it ended."""

    step: str = "startup"            # "startup", "cell", "check", "between" (after a result) or "done"
    index: int | None = None         # the cell or check of ``step``
    returncode: int | None = None    # None: the grader killed it at a deadline
    tampered: str | None = None
    results: dict | None = None      # check index -> Result


def _kill_all(proc: subprocess.Popen, pipes) -> None:
    """Kill the worker's process group, then any process that still holds one of ``pipes`` (a child of the
    student's that left the group with ``setsid``), so nothing the student started outlives the grading."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    targets = {f"pipe:[{os.fstat(fd).st_ino}]" for fd in pipes}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        pid = int(fd_dir.parent.name)
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in targets for fd in fd_dir.iterdir()):
                os.kill(pid, signal.SIGKILL)


def _run_worker(job: dict, checks, cwd: str, step_timeout: float, deadline: float, output: _Output) -> _Run:
    """Start a worker on ``job`` and follow its reports until it ends or misses a deadline: ``step_timeout``
    seconds for each cell and check (``STARTUP_TIMEOUT`` before the first), ``deadline`` for everything."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[2])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.Popen([sys.executable, "-m", "alignlib.checks.grader", "_worker", str(write_fd)],
                            cwd=cwd, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    with contextlib.suppress(BrokenPipeError), proc.stdin:
        proc.stdin.write(json.dumps(job).encode() + b"\n")
    channel, run = _Channel(job["nonce"]), _Run(results={})
    readers = {proc.stdout.fileno(): output.add, read_fd: lambda data: _follow(channel.add(data), run, checks)}
    step_deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while True:
            marker = (run.step, run.index)
            _read(readers, timeout=max(0.0, min(0.1, min(step_deadline, deadline) - time.monotonic())))
            if run.step == "done":   # (the student's threads or atexit handlers may keep it alive)
                break
            if (run.step, run.index) != marker:
                step_deadline = time.monotonic() + step_timeout
            if proc.poll() is not None:
                run.returncode = proc.returncode
                break
            if time.monotonic() >= min(step_deadline, deadline):
                break
    finally:
        _kill_all(proc, (read_fd, proc.stdout.fileno()))
        for _ in range(100):   # what the worker wrote before it ended (bounded: a writer may have escaped)
            if not _read(readers, timeout=0):
                break
        os.close(read_fd)
        proc.stdout.close()
    return run


def _read(readers: dict, timeout: float) -> bool:
    """Read what is ready on the ``readers`` pipes (fd -> consumer) within ``timeout`` s; False if nothing was."""
    ready, _, _ = select.select(list(readers), [], [], timeout)
    for fd in ready:
        data = os.read(fd, 1 << 16)
        if data:
            readers[fd](data)
        else:
            del readers[fd]   # end of file
    return bool(ready)


def _follow(events: list[dict], run: _Run, checks) -> None:
    """Update ``run`` from the worker's reports; a malformed one (not a Result of the check that runs) is ignored."""
    for event in events:
        kind, index = event.get("event"), event.get("index")
        if kind in ("cell", "check") and isinstance(index, int):
            run.step, run.index = kind, index
        elif kind == "result" and run.step == "check" and index == run.index:
            with contextlib.suppress(TypeError, ValueError, KeyError, IndexError):
                result = Result(**event["result"])
                chk = checks[index]
                if result.name == chk.name and result.max_points == chk.points and result.points in (0, chk.points):
                    run.results[index] = Result(result.name, result.points, result.max_points, str(result.message))
                    run.step = "between"
        elif kind == "tampered":
            run.tampered = str(event.get("message"))
        elif kind == "done":
            run.step = "done"


def grade_in_subprocess(notebook_path: str | Path, exercise: str | None = None,
                        check_timeout: float = CHECK_TIMEOUT, timeout: float | None = None,
                        log=None) -> list[Result]:
    """``grade`` in fresh Python processes that the student's code cannot forge, outlive or flood.

    Each cell and check has ``check_timeout`` seconds (the worker's own limit; this process kills the worker
    ``KILL_GRACE`` s later if that limit was defeated), and the whole grading ``timeout`` seconds (default: two
    minutes to start, plus ``check_timeout`` per graded cell and per check). A worker stopped in a cell or a check
    (at its deadline, or because the student's code ended the process) costs only that cell's functions or that
    check: the next worker skips the cell, or starts at the next check. What the deadline leaves ungraded scores
    zero with the reason. The student's output (at most ``OUTPUT_LIMIT`` bytes, then a note) goes to ``log``.
    """
    path = Path(notebook_path)
    if not path.exists():
        raise FileNotFoundError(f"notebook {path} not found.")
    checks = load_checks(exercise or path.stem)
    sources = graded_sources(path)
    timeout = timeout or STARTUP_TIMEOUT + (len(sources) + len(checks)) * check_timeout
    deadline = time.monotonic() + timeout
    stopped = f"did not finish within {check_timeout:g} s; the grader stopped it (time limit)"
    output, results, skip = _Output(), {}, {}
    reason = f"time limit (the grading stopped after {timeout:g} s)"
    while len(results) < len(checks) and time.monotonic() < deadline:
        job = {"nonce": secrets.token_hex(16), "path": str(path.resolve()), "exercise": exercise or path.stem,
               "check_timeout": check_timeout, "skip_cells": skip, "first_check": len(results), "sources": sources}
        with tempfile.TemporaryDirectory(prefix="alignlib-grade-", ignore_cleanup_errors=True) as scratch:
            run = _run_worker(job, checks, scratch, check_timeout + KILL_GRACE, deadline, output)
        results.update(run.results)
        if run.tampered:
            return [Result(c.name, 0, c.points, run.tampered) for c in checks]
        if run.step == "done" or time.monotonic() >= deadline:
            break
        killed, exited = run.returncode is None, f"the grading process exited with code {run.returncode}"
        if run.step == "startup":   # no student code ran: a restart would end the same way
            reason = (f"the grading process did not start within {STARTUP_TIMEOUT:g} s" if killed
                      else f"{exited}: {output.last_words()}")
            break
        if run.step == "cell":      # the next worker skips the cell: its functions score zero
            skip[run.index] = (f"TimeoutError: graded cell {run.index} {stopped}" if killed
                               else f"{exited} while graded cell {run.index} ran (os._exit? a crash?)")
        elif run.step == "check":   # the next worker starts at the next check
            chk = checks[run.index]
            results[run.index] = Result(chk.name, 0, chk.points, stopped if killed
                                        else f"{exited} during this check (os._exit? a crash?)")
    if log is not None:
        log.write(output.text())
    return [results.get(i) or Result(c.name, 0, c.points, f"not graded: {reason}") for i, c in enumerate(checks)]


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

def copy_warnings(notebook_path: str | Path, exercise: str | None = None) -> list[str]:
    """One warning line per graded function whose syntax tree matches alignlib's implementation of it (see
    ``alignlib.checks.similarity``; the versions to compare with are the check module's ``ALIGNLIB_VERSIONS``).
    The notebook's code is parsed, never run; a warning does not change the score."""
    from .similarity import copied_functions

    path = Path(notebook_path)
    module = importlib.import_module(f"{__package__}.ex{exercise or path.stem}")
    versions = getattr(module, "ALIGNLIB_VERSIONS", {})
    return [flag.message() for flag in copied_functions(graded_sources(path), versions)]


def grade_command(path: str | Path, exercise: str | None = None, check_timeout: float = CHECK_TIMEOUT,
                  timeout: float | None = None) -> int:
    """``python -m alignlib grade NOTEBOOK``: print the score table, then a warning for each graded function that
    copies alignlib's implementation (``copy_warnings``). 0 once graded, 2 on a usage error."""
    try:
        results = grade_in_subprocess(path, exercise, check_timeout=check_timeout, timeout=timeout)
    except (FileNotFoundError, LookupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_table(results)
    for line in copy_warnings(path, exercise):
        print(line)
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


def _worker(fd: str) -> None:
    """The process behind ``grade_in_subprocess``, started in an empty scratch directory.

    Its job (JSON: the notebook and its graded cells, the exercise, the limits, the cells to skip, the first check,
    and a nonce) comes on stdin, which is then closed; it reports every step as a JSON line with that nonce on pipe
    ``fd``, which the parent reads apart from stdout and stderr (those carry only what the student's code prints).
    It ends with ``os._exit(0)`` once done.
    """
    job = json.loads(sys.stdin.readline())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    channel, nonce = int(fd), job["nonce"]

    def report(event: str, **fields) -> None:
        data = json.dumps({"nonce": nonce, "event": event, **fields}).encode() + b"\n"
        while data:
            data = data[os.write(channel, data):]

    grade(job["path"], job["exercise"], job["check_timeout"], first_check=job["first_check"], report=report,
          skip_cells={int(index): why for index, why in job["skip_cells"].items()},
          sources={int(index): source for index, source in job["sources"].items()})
    report("done")
    sys.stdout.flush()
    os._exit(0)   # now: threads or atexit handlers of the student's must not run on


def main(argv: list[str] | None = None) -> int:
    """``python -m alignlib.checks.grader _worker FD``: the grading worker (``grade_in_subprocess`` starts it). The
    commands for people are ``python -m alignlib grade`` and ``python -m alignlib exercises``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"] and len(argv) == 2:
        _worker(argv[1])   # never returns
    print("usage: python -m alignlib grade NOTEBOOK | python -m alignlib exercises [--check]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
