"""Fresh worker processes for the benchmarks: one function call, one new interpreter, one JSON result.

Why fresh processes. A benchmark that reports peak memory (the resident set size on a CPU, the allocator's peak on
a GPU) or depends on torch's thread count must not share its process with another measurement: the kernel's
high-water mark, torch's thread pool, the allocator's cached blocks and every module imported stay with a process
until it ends. So each measurement (one method of ``peer``, one method and seed of ``methods``, one run of
``ppo_check``, one measurement of ``throughput``) runs in an interpreter of its own, and its numbers are its alone.

How results come back. ``run_worker("alignlib.bench.ppo_check:worker", spec, env={"OMP_NUM_THREADS": "1"})`` starts
``python -m alignlib.bench.workers alignlib.bench.ppo_check:worker SPEC_JSON RESULT_PATH`` with the environment
overrides given (and, for a source checkout, the checkout first on ``PYTHONPATH``: the worker runs the same library
as its parent, wherever it is started). The worker imports the module, calls the function on the argument decoded
from JSON, and writes its return value as JSON to RESULT_PATH, a file in a temporary directory that the parent reads
once the worker exited with status 0 and then removes. Arguments and results are therefore JSON: no pickling, and
nothing of the parent's state reaches the worker. The worker's stdout is the parent's (or ``subprocess.DEVNULL``);
its stderr passes through the parent to the parent's stderr as it comes, and its last lines are kept, so that a
worker that exits non-zero or without a result gives a ``WorkerError`` naming the worker, its exit code and those
lines.

How SIGINT/SIGTERM stops them. ``run_workers`` starts several workers at once and waits for all of them with
``alignlib.training.checkpoint.wait_workers``. Given the ``StopRequest`` of ``graceful_stop``, the first SIGINT or
SIGTERM terminates every running worker (a second signal kills them at once), as a failed worker terminates the
others. The workers that had finished keep their results, so a caller can store them and ``--resume`` the rest.
"""
from __future__ import annotations

import codecs
import importlib
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

TAIL_LINES = 20                      # lines of a failed worker's stderr in its WorkerError
_LIBRARY = str(Path(__file__).resolve().parents[2])   # the directory holding the alignlib imported here
_SITE = {str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]}


class WorkerError(RuntimeError):
    """A worker exited with a non-zero status, or with 0 but without writing its result."""

    def __init__(self, name: str, returncode: int | None, stderr_tail: str = ""):
        self.name, self.returncode, self.stderr_tail = name, returncode, stderr_tail
        what = "exited without writing its result" if returncode == 0 else f"failed with exit code {returncode}"
        super().__init__(f"the worker {name} {what}"
                         + (f"; the last lines of its stderr:\n{stderr_tail}" if stderr_tail else "."))


@dataclass
class Job:
    """One call ``module:function(arg)`` in a worker; ``env`` overrides the environment (``OMP_NUM_THREADS``)."""

    target: str
    arg: object = None
    name: str | None = None
    env: dict = field(default_factory=dict)


class _Worker:
    """A started job: its process, its result file and a thread copying its stderr (keeping the last bytes)."""

    def __init__(self, job: Job, stdout):
        self.name = job.name or job.target
        self.dir = Path(tempfile.mkdtemp(prefix="alignlib_worker_"))
        self.path, self.stderr, self.proc = self.dir / "result.json", b"", None
        env = {**os.environ, **{k: str(v) for k, v in job.env.items()}}
        if _LIBRARY not in _SITE:              # a source checkout (an installed copy is found anyway)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [_LIBRARY, env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "alignlib.bench.workers", job.target, json.dumps(job.arg), str(self.path)]
        try:
            self.proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, env=env)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.echo = threading.Thread(target=self._echo, daemon=True)
        self.echo.start()

    def _echo(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for chunk in iter(lambda: os.read(self.proc.stderr.fileno(), 1 << 16), b""):
            self.stderr = (self.stderr + chunk)[-(1 << 16):]
            try:
                sys.stderr.write(decoder.decode(chunk))
                sys.stderr.flush()
            except (OSError, ValueError):          # our stderr is closed: keep reading, so the worker never blocks
                pass

    def outcome(self):
        """The result, or a WorkerError (after the process exited)."""
        self.echo.join(timeout=5)
        if self.proc.returncode == 0 and self.path.exists():
            return json.loads(self.path.read_text())
        lines = self.stderr.decode("utf-8", errors="replace").splitlines()
        return WorkerError(self.name, self.proc.returncode, "\n".join(lines[-TAIL_LINES:]))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None:
            self.echo.join(timeout=5)
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_workers(jobs: list[Job], stop=None, stdout=None) -> list:
    """Run every job at once, each in a fresh interpreter, and wait for all (``wait_workers``, with the
    ``StopRequest`` ``stop`` of ``graceful_stop`` if given). Returns, per job in order, its result or, where it did
    not finish (it failed, or was terminated by a stop request or by another's failure), its ``WorkerError``:
    returned, not raised, so that the caller keeps the results that did come back."""
    from ..training.checkpoint import StopRequest, wait_workers

    workers = []
    try:
        for job in jobs:
            workers.append(_Worker(job, stdout))
        wait_workers([w.proc for w in workers], stop if stop is not None else StopRequest())
        return [w.outcome() for w in workers]
    finally:
        for w in workers:
            w.close()


def run_worker(target: str, arg=None, *, name: str | None = None, env: dict | None = None, stop=None,
               stdout=None):
    """``target`` (``"module:function"``) called on ``arg`` in a fresh interpreter; its result. Raises
    ``WorkerError`` if it failed; returns None if the stop request ``stop`` ended it before it finished."""
    (outcome,) = run_workers([Job(target, arg, name, env or {})], stop, stdout)
    if isinstance(outcome, WorkerError):
        if stop is not None and stop.signum:
            return None
        raise outcome
    return outcome


def main(argv: list[str] | None = None) -> None:
    """The worker's side: ``python -m alignlib.bench.workers module:function ARG_JSON RESULT_PATH``."""
    target, arg, path = sys.argv[1:] if argv is None else argv
    module, _, function = target.partition(":")
    result = getattr(importlib.import_module(module), function)(json.loads(arg))
    Path(path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
