"""``graft report RUNDIR``: the run's page written again, in its task's layout."""

from __future__ import annotations

from pathlib import Path

from graft.io import read_json
from graft.pipeline.registry import task_of
from graft.report import html


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of the finished run in ``run_dir`` to ``out`` (default ``RUNDIR/report.html``);
    ``graft.report.html.write_report`` says what a folder needs."""
    info_path = Path(run_dir) / "model.json"
    try:
        info = read_json(info_path) if info_path.is_file() else {}
    except (OSError, ValueError):
        info = {}  # the page's own reading names the file that cannot be read
    return html.write_report(run_dir, task_of(info if isinstance(info, dict) else {}).report_spec(), out)
