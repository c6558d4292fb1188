"""The seeded Hypothesis profile of the fuzz tests (test_fuzz_*.py), and what they check of every
outcome: a result, or a GraftError that names the file (or key) it is about, of bounded length.

The profile is derandomized (the same examples on every run and machine) and keeps no example
database, so a run writes nothing and never depends on an earlier one. Its deadline is far above
what an example takes (milliseconds): it is there to flag an input that makes a reader blow up
(an entity or alias bomb), not to time anything.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, settings

from graft.errors import GraftError

settings.register_profile(
    "graft-fuzz",
    derandomize=True,
    database=None,
    max_examples=40,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=False,
)
FUZZ = settings.get_profile("graft-fuzz")

MESSAGE_LIMIT = 100_000
"""Longest error message or problem line a fuzz case may produce: far above any real one, far below
what an expanded bomb would give."""


def attempt(fn, *args, **kwargs):
    """``fn``'s result, or the GraftError it raised instead; any other exception propagates (it
    is a bug, and Hypothesis shrinks the input that raised it)."""
    try:
        return fn(*args, **kwargs)
    except GraftError as e:
        return e


def assert_named(outcome: object, *names: str) -> None:
    """An error ``outcome`` (from ``attempt``) names one of ``names`` (file paths, keys) and stays short."""
    if isinstance(outcome, GraftError):
        text = str(outcome)
        assert any(n in text for n in names), f"{text[:300]!r} names none of {names}"
        assert len(text) <= MESSAGE_LIMIT, f"a message of {len(text)} characters"
