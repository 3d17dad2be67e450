"""The checks that grade the exercises, one module per notebook, and the small registry they share.

A check is a function ``(ns) -> None`` that takes the student's namespace (what the notebook's ``graded``
cells defined) and raises ``AssertionError`` with a helpful message when the student's code is wrong.
Decorating it with ``@check(points=..., function=...)`` makes it worth points::

    @check(points=2, function="sequence_logprob")
    def matches_reference(ns):
        student = get_function(ns, "sequence_logprob")
        assert_close(student(lp, mask), reference(lp, mask), "sequence_logprob")

The decorator only marks the function; ``checks_in(module)`` collects the marked functions of a module in
the order they are written, and ``load_checks("00_logprobs")`` does that for ``alignlib.checks.ex00_logprobs``.
There is no global registry, so re-importing a module never registers a check twice.
"""
from __future__ import annotations

import functools
import importlib
import math
import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

MARK = "__alignlib_check__"


class Namespace(dict):
    """The names defined by a notebook's graded cells, plus ``errors``: cell index -> why that cell failed."""

    def __init__(self, scope: dict, errors: dict[int, str] | None = None):
        super().__init__(scope)
        self.errors = dict(errors or {})


@dataclass(frozen=True)
class Check:
    """One graded check: all ``points`` if ``run(ns)`` returns, none if it raises."""

    name: str                          # shown in the score table: "<function>: <first docstring line>"
    points: int                        # what the check is worth
    function: str                      # the student function it tests
    run: Callable[[Namespace], None]   # raises AssertionError (or anything) on failure


def check(points: int, function: str):
    """Mark ``fn(ns)`` as a check worth ``points`` that tests the student's ``function``.

    The check's name in the score table is ``"<function>: <first line of fn's docstring>"``.
    """
    if not isinstance(points, int) or points < 1:
        raise ValueError(f"points must be a positive integer, got {points!r}")

    def mark(fn):
        summary = (inspect.getdoc(fn) or fn.__name__).split("\n")[0].rstrip(".")
        setattr(fn, MARK, Check(f"{function}: {summary}", points, function, fn))
        return fn

    return mark


def checks_in(module: ModuleType) -> list[Check]:
    """The checks marked in ``module``, in the order they appear in its source."""
    found = [getattr(obj, MARK) for obj in vars(module).values() if callable(obj) and hasattr(obj, MARK)]
    return sorted(found, key=lambda c: c.run.__code__.co_firstlineno)


def load_checks(exercise: str) -> list[Check]:
    """The checks of exercise ``"00_logprobs"``, from module ``alignlib.checks.ex00_logprobs``."""
    module_name = f"{__name__}.ex{exercise}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise LookupError(
            f"no checks for exercise {exercise!r} (expected module {module_name}). Grade a notebook named like "
            f"its exercise (exercises/00_logprobs.ipynb) or pass --exercise NAME."
        ) from None
    checks = checks_in(module)
    if not checks:
        raise LookupError(f"module {module_name} defines no @check functions.")
    return checks


# ---------------------------------------------------------------- no delegation to alignlib's own answers

# alignlib's implementations of every graded function. A student's function runs while these are disarmed, so
# one that calls them (imported under any name, or through the module) scores zero instead of full marks.
GRADED_IMPLEMENTATIONS = {
    "alignlib.logprobs": ("token_logprobs_from_logits", "sequence_logprob", "length_normalized_logprob", "masked_mean"),
    "alignlib.ppo": ("kl_penalty", "shaped_rewards", "compute_gae", "clipped_policy_loss"),
    "alignlib.rrhf": ("rank_loss", "best_response_loss"),
    "alignlib.raft": ("select_local", "select_global", "distinct_n"),
    "alignlib.soups": ("interpolate", "lora_soup", "pareto_mask", "hypervolume"),
    # conversation() is the first half of critique_prompt, so it is disarmed with the graded functions
    "alignlib.cai": ("conversation", "critique_prompt", "revision_prompt", "sft_example", "elo_scores"),
    "alignlib.feedback": ("soft_labels",),
    "alignlib.self_align": ("principle_prompt", "query", "engraving_pairs", "novelty_filter"),
    "alignlib.multiple_choice": ("true_scores", "accuracy"),
}


def _disarmed(*args, **kwargs):
    raise AssertionError("it calls alignlib's own implementation of a graded function; write the computation "
                         "yourself (torch operations are fine)")


def _code_key(code) -> tuple:
    """What a copy of a code object shares with it: its bytecode, constants (the docstring too) and names."""
    return code.co_code, code.co_consts, code.co_names


@contextmanager
def forbid_reference_calls():
    """While active, every function in ``GRADED_IMPLEMENTATIONS`` raises instead of computing, and so does any copy.

    The function objects themselves are disarmed (their code is swapped), so any alias of them is caught too;
    the originals are restored on exit, even if the student's code raises. A copy (a function built from an
    original's code object, ``code.replace(...)``, or alignlib's source compiled again: the same bytecode,
    constants and names) is stopped by a trace hook when it is called, and the block then fails even if the
    student's code caught that error. Code compiled from a graded cell (``<graded cell N>``) is the student's
    own and never counts as a copy. Switching the hook off (``sys.settrace``) fails the block too.
    """
    saved, keys, copies_called = [], set(), []

    def trace(frame, event, arg):
        code = frame.f_code
        if (event == "call" and code.co_names in names and _code_key(code) in keys
                and not code.co_filename.startswith("<graded cell")):
            copies_called.append(code.co_name)
            _disarmed()
        return None   # no line events: the hook costs one call per Python function call

    previous = sys.gettrace()
    try:
        for module_name, fn_names in GRADED_IMPLEMENTATIONS.items():
            module = importlib.import_module(module_name)
            for name in fn_names:
                fn = getattr(module, name)
                saved.append((fn, fn.__code__))
                if fn.__code__ is not _disarmed.__code__:   # (already disarmed by an enclosing block)
                    keys.add(_code_key(fn.__code__))
                fn.__code__ = _disarmed.__code__
        names = {key[2] for key in keys}
        sys.settrace(trace)
        yield
        if copies_called or sys.gettrace() is not trace:   # a copy was called (and the error caught), or no hook
            _disarmed()
    finally:
        sys.settrace(previous)
        for fn, code in saved:
            fn.__code__ = code


# ---------------------------------------------------------------- helpers for writing checks

def _graded_function(ns: Namespace, name: str) -> Callable:
    """The student's function ``name`` as defined (with ``def``) in a graded cell, or an AssertionError saying
    why not."""
    fn = ns.get(name)
    if fn is None:
        failed = "; ".join(f"graded cell {i} failed with {msg}" for i, msg in sorted(ns.errors.items()))
        raise AssertionError(f"`{name}` is not defined" + (f" ({failed})" if failed else
                                                           " in the notebook's graded cells"))
    code = getattr(fn, "__code__", None)
    if code is None or not code.co_filename.startswith("<graded cell"):
        raise AssertionError(f"`{name}` must be a function written (with `def`) in its graded cell.")
    return fn


def get_function(ns: Namespace, name: str) -> Callable:
    """The student's function ``name``, which must be defined in a graded cell of the notebook."""
    fn = _graded_function(ns, name)

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        try:
            with forbid_reference_calls():
                return fn(*args, **kwargs)
        except AssertionError as err:
            if "alignlib's own implementation" in str(err):
                raise AssertionError(f"`{name}`: {err}") from None
            raise
    return guarded


def run_experiment(ns: Namespace, name: str):
    """Call the student's experiment ``name()`` (a function of a graded cell) and return what it chose.

    An experiment is graded on its outcome, not on how it was computed, so it runs unguarded: it may call any of
    alignlib (``alignlib.tiny_lab`` measures through functions that the other checks grade).
    """
    return _graded_function(ns, name)()


def as_number(value, what: str) -> float:
    """``value`` as a finite float, or an AssertionError that says what the experiment returned."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    assert isinstance(value, (int, float)) and not isinstance(value, bool), \
        f"{what} should be a number, got {type(value).__name__} {value!r}"
    assert math.isfinite(value), f"{what} should be finite, got {value!r}"
    return float(value)


def assert_close(actual, expected: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Assert ``actual`` is a tensor of ``expected``'s shape with close, finite values; explain any failure."""
    assert isinstance(actual, torch.Tensor), f"{what} should return a torch.Tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape, \
        f"{what} returned shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert torch.isfinite(actual).all(), f"{what} returned non-finite values (inf or nan)"
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        worst = (actual - expected).abs().argmax()
        where = ""
        if expected.dim():
            where = f" at index {tuple(int(i) for i in torch.unravel_index(worst, expected.shape))}"
        raise AssertionError(f"{what}: got {actual.flatten()[worst]:.6g}{where}, the reference gives "
                             f"{expected.flatten()[worst]:.6g}")


PADDING = ("", " ", "  ", "\n", " \n", "\n\n", "\t", " \t\n ")   # stray whitespace around text inputs


def pad(rng, text: str) -> str:
    """``text`` with stray whitespace drawn from ``PADDING`` at both ends (``rng``: a ``random.Random``)."""
    return rng.choice(PADDING) + text + rng.choice(PADDING)


def refuses(call, args: tuple, why: str, what: str) -> None:
    """``call(*args)`` raises ValueError; otherwise an AssertionError saying why it should."""
    try:
        got = call(*args)
    except ValueError:
        return
    raise AssertionError(f"{what} should raise ValueError ({why}), got {got!r}")


def assert_same_text(got, expected: str, what: str) -> None:
    """``got`` is the string ``expected``; otherwise say where they first differ."""
    assert isinstance(got, str), f"{what} should return a str, got {type(got).__name__}"
    if got == expected:
        return
    at = next((i for i, (x, y) in enumerate(zip(got, expected)) if x != y), min(len(got), len(expected)))
    lo = max(0, at - 40)
    raise AssertionError(f"{what} differs from the expected text at character {at}: got ...{got[lo:at + 25]!r}..., "
                         f"expected ...{expected[lo:at + 25]!r}... ({len(got)} against {len(expected)} characters)")


@contextmanager
def one_thread():
    """Run on one torch thread, the caller's setting restored after. Checks with tiny matrices use it: a second BLAS
    thread on a busy machine made each small product cost milliseconds, and iterative fits ran past the time limit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def generator(seed: int) -> torch.Generator:
    """A seeded CPU generator, so each check sees the same random inputs on every run."""
    return torch.Generator().manual_seed(seed)


def rollout_masks(batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``attention_mask`` and ``response_mask`` (B, T), int64, in alignlib's layout.

    Each row is ``[left padding | prompt (>= 1) | response (>= 1) | right padding]``.
    """
    if length < 2:
        raise ValueError("length must be >= 2 to fit one prompt and one response token")
    attention = torch.zeros(batch, length, dtype=torch.long)
    response = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        left = int(torch.randint(0, length - 1, (1,), generator=gen))           # left padding
        prompt = int(torch.randint(1, length - left, (1,), generator=gen))       # >= 1, leaves >= 1 column
        start = left + prompt
        resp = int(torch.randint(1, length - start + 1, (1,), generator=gen))    # >= 1 response token
        attention[row, left:start + resp] = 1
        response[row, start:start + resp] = 1
    return attention, response
