"""A classifier run's figures: the confusion matrix and a grid of predictions, mistakes first."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from graft.report.figures import plain, pyplot, save_figure, short_name

import numpy as np

MAX_PREDICTIONS = 32
CELL_TEXT_MAX_CLASSES = 30  # above this, confusion-matrix cells carry no text


TICK_LABEL_MAX_CLASSES = 120  # above this, class names are not written on the axes


_GREEN = "#1b7a2f"


_RED = "#c62828"


_BLOCK_COLORS = ["#e8590c", "#2f9e44", "#ae3ec9", "#d6336c", "#f59f00", "#1098ad"]


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
    from matplotlib.patches import Rectangle

    plt = pyplot()
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
            names = [short_name(c, 28) for c in classes]
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
    return save_figure(fig, path)


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
    plt = pyplot()
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
            prob = plain(item.get("prob"))
            line1 = short_name(pred, 22) if pred is not None else "?"
            if prob is not None and not (isinstance(prob, float) and math.isnan(prob)):
                line1 += f" ({float(prob):.0%})"
            if true is None:
                caption, color = line1, "black"
            else:
                caption = f"{line1}\ntrue: {short_name(true, 22)}"
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
    return save_figure(fig, path, dpi=100)
