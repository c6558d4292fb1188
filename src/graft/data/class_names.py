"""Which class folders of an expansion's data are new classes and which are old-class examples."""

from __future__ import annotations

import re
from pathlib import Path

from graft.errors import DataError


def name_key(name: str) -> str:
    """What two class names that differ only by case or spacing share."""
    return re.sub(r"[\s_\-]+", "", name.casefold())


def plan_classes(old: list[str], found: list[str], folder: Path) -> tuple[list[str], list[str]]:
    """``(new, rehearsal)``: folder names that are not old classes, in sorted order (appended after
    the old classes in that order), and old class names that have a folder (optional examples).
    A name that matches an old class only up to case or spacing is an error naming both."""
    new = [name for name in sorted(found) if name not in old]
    rehearsal = [name for name in sorted(found) if name in old]
    refuse_near_twins(old, new, lambda name: f"class folder {folder / name!s}", str(folder), "holds images")
    if not new:
        raise DataError(
            f"no new classes in {folder}: its class folders ({', '.join(sorted(found))}) are all classes the model already has; "
            "put the images of each new class in a folder named after it"
        )
    return new, rehearsal


def refuse_near_twins(old: list[str], new: list[str], subject, where: str, holds: str) -> None:
    """A new class name equal to an old one, or to another new one, up to case or spacing is almost
    always a typo, not a new class: an error naming both. ``subject(name)`` says where the name is."""
    by_key = {name_key(n): n for n in old}
    for name in new:
        twin = by_key.get(name_key(name))
        if twin is not None:
            raise DataError(
                f"{subject(name)} differs from the model's class {twin!r} only by case or spacing: "
                f"rename it to {twin!r} if it {holds} of that class, or give the new class a distinct name"
            )
    seen: dict[str, str] = {}
    for name in new:
        other = seen.setdefault(name_key(name), name)
        if other != name:
            raise DataError(f"classes {other!r} and {name!r} in {where} differ only by case or spacing: merge them or rename one")
