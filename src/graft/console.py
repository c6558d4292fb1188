"""What graft prints for a person on stderr: progress, which ``--quiet`` hides, and notices about
the user's data, which it never hides.

A quiet run still says what it left out of the data: each kind of problem (warnings, annotations
left out, files skipped) as a count with one example. The full lists are in ``metrics.json`` (or in
``graft eval``'s JSON), which each notice names.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``1 epoch``, ``2 epochs``; ``many`` for nouns that do not just take an s (``1 box``, ``2 boxes``)."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"


def warn(message: str) -> None:
    """A line the user must see, quiet or not."""
    print(message, file=sys.stderr, flush=True)


def progress(quiet: bool) -> Callable[[str], None]:
    """The ``say`` of a command: progress lines on stderr, none with ``--quiet``."""
    return (lambda message: None) if quiet else warn


def data_notices(*, warnings: Iterable[str] = (), problems: Iterable[str] = (), skipped: Iterable[Any] = (), listed_in: str) -> list[str]:
    """The lines that report a scan's warnings (each in full: they are few and each says what to do),
    its annotation problems and its skipped files (``.path``, ``.reason``), each of the last two as a
    count with its first example; ``listed_in`` says where the full list is."""
    problems, skipped = list(problems), list(skipped)
    lines = [f"warning: {w}" for w in warnings]
    if problems:
        lines.append(f"warning: {plural(len(problems), 'annotation problem')} (boxes or images left out), listed in {listed_in}; e.g. {problems[0]}")
    if skipped:
        lines.append(f"warning: skipped {plural(len(skipped), 'unreadable file')}, listed in {listed_in}; e.g. {skipped[0].path}: {skipped[0].reason}")
    return lines


def tell_data(*, warnings: Iterable[str] = (), problems: Iterable[str] = (), skipped: Iterable[Any] = (), listed_in: str) -> None:
    """Print ``data_notices`` on stderr, in every mode."""
    for line in data_notices(warnings=warnings, problems=problems, skipped=skipped, listed_in=listed_in):
        warn(line)
