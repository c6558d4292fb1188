"""Training history (CSV) and the figures every task draws: learning curves, and how a figure is
saved (each task draws its own figures besides: ``tasks/*/plots.py``).

Everything is written atomically (``graft.io.atomic_write``) and every figure is closed after
saving, so long runs neither leave half-written files nor leak memory. Matplotlib runs on the
non-interactive Agg backend: no window is ever opened.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from graft.io import atomic_write


def pyplot():  # noqa: ANN201 (matplotlib.pyplot)
    """matplotlib's pyplot on the file-only Agg backend, imported on first use: a process that
    draws nothing (another rank of a distributed run, a command that only predicts) never loads it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

__all__ = [
    "HISTORY_COLUMNS",
    "write_history_csv",
    "read_history_csv",
    "phase_changes",
    "plot_learning_curves",
    "save_figure",
]

HISTORY_COLUMNS = [
    "epoch",
    "phase",
    "lr",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "seconds",
]

DPI = 110

# ----------------------------------------------------------------------------- history CSV

_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|nan|inf|infinity)", re.I)


def plain(value: Any) -> Any:
    """numpy / torch scalars -> Python scalars."""
    if value is not None and not isinstance(value, (str, int, float, bool)) and hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def _format_cell(value: Any) -> str:
    value = plain(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest string that reads back to the same float
    return str(value)


def _parse_cell(text: str) -> Any:
    if text == "":
        return None
    s = text.strip()
    if _INT_RE.fullmatch(s):
        return int(s)
    if _FLOAT_RE.fullmatch(s):
        return float(s)
    return text


def write_history_csv(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write one row per epoch to ``path`` (atomically).

    Columns are ``HISTORY_COLUMNS`` followed by any extra keys found in ``rows``, in first-seen
    order. ``None`` (and missing keys) become empty cells. Floats are written with ``repr`` so
    they read back bit-for-bit.
    """
    # The classifier's columns lead (those a detector's rows lack are left out), then the rest.
    columns = [c for c in HISTORY_COLUMNS if not rows or any(c in r for r in rows)]
    seen = set(columns)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                columns.append(str(key))

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format_cell(row.get(col)) for col in columns])
    data = buf.getvalue()

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(data)

    return atomic_write(path, write)


def read_history_csv(path: str | os.PathLike) -> list[dict]:
    """Inverse of ``write_history_csv``: ints and floats parsed back, empty cells -> None."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return [{key: _parse_cell(val or "") for key, val in row.items() if key is not None} for row in reader]


# ----------------------------------------------------------------------------- helpers


def _num(value: Any) -> float:
    value = plain(value)
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def save_figure(fig, path: str | os.PathLike, dpi: int = DPI) -> Path:
    plt = pyplot()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _epochs(rows: Sequence[dict]) -> list[float]:
    out = []
    for i, row in enumerate(rows):
        e = _num(row.get("epoch"))
        out.append(float(i + 1) if math.isnan(e) else e)
    return out


def _phase_segments(rows: Sequence[dict]) -> list[tuple[int, float, str]]:
    """(row index, epoch, new phase) for every row whose phase differs from the previous phase.

    Rows with no phase (None / empty) are skipped: they neither start nor end a phase.
    """
    epochs = _epochs(rows)
    changes = []
    previous = None
    for i, row in enumerate(rows):
        phase = row.get("phase")
        if phase is None or phase == "":
            continue
        phase = str(phase)
        if previous is not None and phase != previous:
            changes.append((i, epochs[i], phase))
        previous = phase
    return changes


def phase_changes(rows: Sequence[dict]) -> list[int]:
    """Epochs at which a new phase starts (the epoch of the first row of the new phase).

    ``[]`` for a single phase. E.g. phases feature-extract x3 then fine-tune x2, epochs 1..5 -> [4].
    """
    out = []
    for _, epoch, _ in _phase_segments(rows):
        out.append(int(epoch) if float(epoch).is_integer() else epoch)
    return out


def _change_label(phase: str) -> str:
    p = phase.lower().replace("_", "-")
    if p.startswith("fine") or "finetun" in p.replace("-", ""):
        return "fine-tuning starts"
    return f"{phase} starts"


def short_name(name: str, limit: int) -> str:
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


# ----------------------------------------------------------------------------- learning curves


CLASSIFIER_PANELS = [
    ("accuracy", "Accuracy", [("train_accuracy", "train"), ("val_accuracy", "val")]),
    ("loss", "Loss", [("train_loss", "train"), ("val_loss", "val")]),
]


def plot_learning_curves(rows: list[dict], path: str | os.PathLike, *, title: str | None = None, panels: list | None = None) -> Path:
    """Accuracy (train & val) and loss (train & val) against epoch, side by side, as a PNG.

    A dashed vertical line labelled e.g. "fine-tuning starts" marks each change of ``phase``
    (drawn half-way between the last epoch of the old phase and the first of the new one).
    Copes with a single epoch, missing values (None -> gap) and a single phase. ``panels``:
    (kind, title, [(column, label), ...]) per panel, "accuracy" kinds bounded to 0..1; default
    the classifier's accuracy and loss.
    """
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    epochs = _epochs(rows)
    changes = _phase_segments(rows)
    panels = panels or CLASSIFIER_PANELS
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    try:
        styles = {"train": dict(color="#1f77b4", marker="o"), "val": dict(color="#ff7f0e", marker="s")}
        cycle = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
        for ax, (kind, ylabel, series) in zip(axes[0], panels):
            drawn = False
            all_values = []
            for key, label in series:
                ys = [_num(r.get(key)) for r in rows]
                if all(math.isnan(y) for y in ys):
                    continue
                all_values += [y for y in ys if not math.isnan(y)]
                style = styles.get(label) or dict(color=cycle[series.index((key, label)) % len(cycle)], marker=".")
                ax.plot(epochs, ys, label=label, markersize=4 if len(rows) <= 60 else 0, linewidth=1.6, **style)
                drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
            if kind == "accuracy" and all_values and min(all_values) >= 0 and max(all_values) <= 1:
                ax.set_ylim(-0.02, 1.02)
            if kind == "loss" and all_values and min(all_values) >= 0:
                ax.set_ylim(0, max(max(all_values) * 1.08, 1e-3))
            ax.set_title(ylabel)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel.lower())
            if epochs and max(epochs) - min(epochs) < 4:
                ax.set_xticks(sorted({int(e) for e in epochs if float(e).is_integer()}) or epochs)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            if epochs:
                lo, hi = min(epochs), max(epochs)
                pad = 0.5 if hi - lo < 2 else 0.03 * (hi - lo) + 0.2
                ax.set_xlim(lo - pad, hi + pad)

            trans = ax.get_xaxis_transform()  # x in data, y in axes fraction
            for i, epoch, phase in changes:
                prev = epochs[i - 1] if i > 0 else epoch - 1
                x = (prev + epoch) / 2 if prev < epoch else epoch - 0.5
                ax.axvline(x, color="0.35", linestyle="--", linewidth=1.2)
                ax.text(x, 0.97, " " + _change_label(phase), transform=trans, rotation=90,
                        ha="right", va="top", fontsize=8, color="0.25")
            if drawn:
                ax.legend(loc="best", fontsize=9)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- confusion matrix


# ----------------------------------------------------------------------------- predictions


