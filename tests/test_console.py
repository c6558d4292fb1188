"""What a person reads on stderr: counted nouns, and data notices that --quiet does not hide."""

from __future__ import annotations

from pathlib import Path

from graft.console import data_notices, plural, progress
from graft.data.samples import Skipped


def test_plural_counts_one_and_many() -> None:
    assert plural(1, "epoch") == "1 epoch"
    assert plural(0, "epoch") == "0 epochs"
    assert plural(2, "box", "boxes") == "2 boxes" and plural(1, "box", "boxes") == "1 box"


def test_each_kind_of_problem_is_a_count_with_its_first_example() -> None:
    skipped = [Skipped(Path("a/x.jpg"), "zero-byte file"), Skipped(Path("a/y.jpg"), "truncated")]
    lines = data_notices(warnings=["ignoring empty folder a/z"], problems=["f.json: annotation id 9: unknown category id 99; left out"], skipped=skipped, listed_in="run/metrics.json")
    assert lines == [
        "warning: ignoring empty folder a/z",
        "warning: 1 annotation problem (boxes or images left out), listed in run/metrics.json; e.g. f.json: annotation id 9: unknown category id 99; left out",
        "warning: skipped 2 unreadable files, listed in run/metrics.json; e.g. a/x.jpg: zero-byte file",
    ]
    assert data_notices(listed_in="anywhere") == []


def test_quiet_progress_says_nothing(capsys) -> None:
    progress(True)("epoch 1")
    progress(False)("epoch 2")
    assert capsys.readouterr().err == "epoch 2\n"
