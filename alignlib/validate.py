"""Checks of counts and thread numbers, and the argparse types built on them, importable without torch (the
command line parses and answers ``--help`` before any heavy import)."""
from __future__ import annotations

import argparse
import numbers
import os


def check_count(value, name: str, minimum: int = 0, allow_none: bool = True):
    """``value`` if it is a count: an int >= ``minimum`` (or None where ``allow_none``); else a ValueError naming
    ``name``. Bools are refused (True is not 1 prompt), and so are negative numbers, which slicing would read as
    "all but the last few"."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        none = "None (all) or " if allow_none else ""
        raise ValueError(f"{name} must be {none}an integer >= {minimum}, got {value!r}.")
    return value


def count(minimum: int = 1):
    """An argparse ``type=`` for counts: ``type=count(0)`` turns "-1" into a one-line usage error
    ("argument --helpful: must be an integer >= 0, got '-1'") instead of a count that slices from the end."""
    def parse(text: str) -> int:
        try:
            return check_count(int(text), "the value", minimum, allow_none=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None

    parse.__name__ = f"count(>= {minimum})"
    return parse


def check_threads(n) -> int:
    cores = os.cpu_count() or 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be an integer >= 1, got {n!r}; this machine has {cores} cores "
                         f"(--threads {cores} uses them all; leave it out for torch's choice).")
    return n


def threads_arg(text: str) -> int:
    """The argparse ``type=`` of every ``--threads``: an integer >= 1, with the machine's core count in the error."""
    try:
        return check_threads(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}; this machine has "
                                         f"{os.cpu_count() or 1} cores") from None
