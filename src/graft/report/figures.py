"""Training history (CSV) and report figures (PNG): learning curves, confusion matrix, predictions.

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

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from graft.io import atomic_write  # noqa: E402

__all__ = [
    "HISTORY_COLUMNS",
    "write_history_csv",
    "read_history_csv",
    "phase_changes",
    "plot_learning_curves",
    "plot_confusion_matrix",
    "plot_predictions",
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
MAX_PREDICTIONS = 32
CELL_TEXT_MAX_CLASSES = 30  # above this, confusion-matrix cells carry no text
TICK_LABEL_MAX_CLASSES = 120  # above this, class names are not written on the axes

_GREEN = "#1b7a2f"
_RED = "#c62828"
_BLOCK_COLORS = ["#e8590c", "#2f9e44", "#ae3ec9", "#d6336c", "#f59f00", "#1098ad"]

# ----------------------------------------------------------------------------- history CSV

_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|nan|inf|infinity)", re.I)


def _plain(value: Any) -> Any:
    """numpy / torch scalars -> Python scalars."""
    if value is not None and not isinstance(value, (str, int, float, bool)) and hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def _format_cell(value: Any) -> str:
    value = _plain(value)
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
    value = _plain(value)
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _save(fig, path: str | os.PathLike, dpi: int = DPI) -> Path:
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


def _short(name: str, limit: int) -> str:
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
    return _save(fig, path)


# ----------------------------------------------------------------------------- confusion matrix


def plot_confusion_matrix(
    cm: list[list[int]] | np.ndarray,
    classes: list[str],
    path: str | os.PathLike,
    *,
    normalize: bool = True,
    blocks: list[tuple[str, int, int]] | None = None,
    title: str | None = None,
) -> Path:
    """Confusion-matrix heatmap (true on y, predicted on x) as a PNG.

    With ``normalize`` the colours are row-normalised (each true class sums to 100%) and each
    cell shows its count and percentage; otherwise colours and text are raw counts. The figure
    grows with the number of classes; cell text is dropped above ``CELL_TEXT_MAX_CLASSES``.
    ``blocks`` — ``[(label, start, stop), ...]`` index ranges (stop exclusive) — are outlined as
    diagonal blocks with their label, e.g. ``[("old", 0, 5), ("new", 5, 7)]``.
    """
    m = np.asarray(cm, dtype=np.float64)
    k = len(classes)
    if k == 0:
        raise ValueError("classes must not be empty")
    if m.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {m.shape}, expected ({k}, {k}) for {k} classes")
    for block in blocks or []:
        label, start, stop = block
        if not (0 <= start < stop <= k):
            raise ValueError(f"block {label!r} ({start}, {stop}) is not a range inside 0..{k}")

    row_sums = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(row_sums > 0, m / np.where(row_sums > 0, row_sums, 1), 0.0)
    shown = frac if normalize else m

    side = min(max(3.0 + 0.55 * k, 5.0), 16.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    try:
        vmax = 1.0 if normalize else max(float(m.max()), 1.0)
        im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if normalize:
            cbar.set_ticks([0, 0.25, 0.5, 0.75, 1.0])
            cbar.set_ticklabels(["0%", "25%", "50%", "75%", "100%"])
            cbar.set_label("share of true class")
        else:
            cbar.set_label("count")

        if k <= TICK_LABEL_MAX_CLASSES:
            tick_size = 10 if k <= 12 else 8 if k <= 30 else 7 if k <= 50 else 5 if k <= 80 else 4
            names = [_short(c, 28) for c in classes]
            ax.set_xticks(range(k))
            ax.set_yticks(range(k))
            long = max(len(n) for n in names) > 4 or k > 12
            ax.set_xticklabels(names, fontsize=tick_size, rotation=45 if long else 0,
                               ha="right" if long else "center", rotation_mode="anchor")
            ax.set_yticklabels(names, fontsize=tick_size)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")

        if k <= CELL_TEXT_MAX_CLASSES:
            text_size = 10 if k <= 8 else 8 if k <= 15 else 6
            for i in range(k):
                for j in range(k):
                    count = int(round(m[i, j]))
                    if normalize and row_sums[i, 0] > 0:
                        text = f"{count}\n{frac[i, j]:.0%}" if k <= 15 else f"{count}"
                    else:
                        text = f"{count}"
                    dark = shown[i, j] / vmax > 0.55
                    ax.text(j, i, text, ha="center", va="center", fontsize=text_size,
                            color="white" if dark else ("0.15" if count else "0.6"))

        for n, (label, start, stop) in enumerate(blocks or []):
            color = _BLOCK_COLORS[n % len(_BLOCK_COLORS)]
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), stop - start, stop - start,
                                   fill=False, edgecolor=color, linewidth=2.5, zorder=5))
            ax.text(stop - 0.5, start - 0.5, f" {label} ", ha="right", va="bottom", fontsize=9,
                    color="white", fontweight="bold", zorder=6, clip_on=False,
                    bbox=dict(boxstyle="square,pad=0.15", facecolor=color, edgecolor="none"))

        default = "Confusion matrix" + (" (row-normalised)" if normalize else "")
        ax.set_title(title or default, pad=14 if blocks else 6)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, path)


# ----------------------------------------------------------------------------- predictions


def _load_image(image: Any, max_side: int = 256):
    from PIL import Image, ImageOps

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
    else:
        im = image.convert("RGB") if image.mode != "RGB" else image.copy()
    im.thumbnail((max_side, max_side))
    return im


def plot_predictions(items: list[dict], path: str | os.PathLike, *, columns: int = 4,
                     title: str | None = None) -> Path:
    """Grid of images with their predictions as a PNG.

    Each item is ``{"image": PIL.Image or path, "true": str | None, "pred": str, "prob": float}``.
    Captions read "pred (87%)" and "true: x", green when right, red when wrong, black when the
    true class is unknown (None). At most ``MAX_PREDICTIONS`` items are drawn (the title says so
    when some are left out); an unreadable image is drawn as a grey "unreadable image" tile.
    """
    total = len(items)
    items = list(items)[:MAX_PREDICTIONS]
    columns = max(1, min(int(columns), max(len(items), 1)))
    nrows = max(1, math.ceil(len(items) / columns))
    fig, axes = plt.subplots(nrows, columns, figsize=(2.6 * columns, 2.95 * nrows + (0.4 if title else 0)),
                             squeeze=False)
    try:
        for ax in axes.flat:
            ax.axis("off")
        if not items:
            axes[0, 0].text(0.5, 0.5, "no predictions", ha="center", va="center", color="0.5")
        for ax, item in zip(axes.flat, items):
            try:
                ax.imshow(np.asarray(_load_image(item["image"])))
            except (OSError, ValueError) as exc:  # unreadable/missing file: keep the rest of the grid
                ax.imshow(np.full((64, 64, 3), 225, dtype=np.uint8))
                ax.text(0.5, 0.5, f"unreadable image\n{type(exc).__name__}", ha="center", va="center",
                        fontsize=8, color="0.35", transform=ax.transAxes)
            pred = item.get("pred")
            true = item.get("true")
            prob = _plain(item.get("prob"))
            line1 = _short(pred, 22) if pred is not None else "?"
            if prob is not None and not (isinstance(prob, float) and math.isnan(prob)):
                line1 += f" ({float(prob):.0%})"
            if true is None:
                caption, color = line1, "black"
            else:
                caption = f"{line1}\ntrue: {_short(true, 22)}"
                color = _GREEN if str(true) == str(pred) else _RED
            ax.set_title(caption, fontsize=9, color=color,
                         fontweight="bold" if color == _RED else "normal")
        heading = title
        if total > len(items):
            heading = f"{title + ' ' if title else ''}(first {len(items)} of {total})"
        if heading:
            fig.suptitle(heading)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, path, dpi=100)
