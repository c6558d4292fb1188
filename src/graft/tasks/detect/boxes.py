"""Boxes as annotation files state them, and the checks that turn them into training targets.

Every reader (COCO, YOLO, Pascal VOC) produces ``RawImage`` records in its format's own box
convention; ``finalise`` converts them to one form: ``[x1, y1, x2, y2]`` float32 pixels of the
image as ``load_image`` returns it, that is upright by its EXIF orientation (as labelling tools
show it, and as Ultralytics assumes). Where an annotation records the image's size and that size
matches the file as stored, not as upright (a 90-degree EXIF rotation), the boxes were drawn on the
stored pixels and are rotated with the image.

Bad boxes are expected, and each gets a message naming its file or annotation id: boxes partly
outside the image are clipped, boxes empty after clipping, with zero or negative size, or with
non-finite coordinates are dropped. A *format mix-up* (boxes that fit their images only in another
convention, like COCO boxes written as ``xyxy``) is not a bad box but a wrong file: graft stops and
names the convention that fits, rather than train on clipped garbage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graft.errors import DataError

# Box conventions by name: corner or centre form, pixels or normalised to the image size.
CONVENTIONS = ("xyxy", "xywh", "cxcywh", "xyxy normalised", "xywh normalised", "cxcywh normalised")
MIXUP_SHARE = 0.2  # a source is mixed up when this share of its boxes don't fit as declared...
FIT_SHARE = 0.02  # ...while at most this share fails in another convention
FIT_TOLERANCE = 1.0  # pixels a box may reach beyond the image and still "fit" (rounding, 1-based VOC)


@dataclass(eq=False)
class RawImage:
    """One image's annotations as the file states them."""

    path: Path
    image_id: str
    boxes: np.ndarray  # [N, 4] float64 in the source's declared convention
    labels: list[int]  # contiguous class indices (the reader maps names and category ids)
    where: list[str]  # per box: what names it in messages ("annotation id 17", "a.txt line 3")
    crowd: np.ndarray | None = None  # [N] bool: iscrowd (ignored in training, honoured by the metric)
    difficult: np.ndarray | None = None  # [N] bool: VOC difficult (trained on, ignored by the metric)
    size: tuple[int, int] | None = None  # (width, height) the annotation records, if any


@dataclass(eq=False)
class BoxSample:
    """One usable image and its targets, ready for training."""

    path: Path
    image_id: str
    width: int  # of the upright image
    height: int
    boxes: np.ndarray  # [N, 4] float32 xyxy pixels
    labels: np.ndarray  # [N] int64 indices into the classes
    crowd: np.ndarray  # [N] bool
    difficult: np.ndarray  # [N] bool

    @property
    def ignored(self) -> np.ndarray:
        """Boxes the metric does not count as misses (crowd regions, VOC difficult objects)."""
        return self.crowd | self.difficult


@dataclass
class BoxReport:
    """What ``finalise`` changed or dropped, one message each."""

    clipped: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def messages(self) -> list[str]:
        return [*self.dropped, *self.clipped]


def to_xyxy(boxes: np.ndarray, convention: str, width: float, height: float) -> np.ndarray:
    """``boxes [N, 4]`` in ``convention`` as xyxy pixels of a ``width`` x ``height`` image."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    form, _, scale = convention.partition(" ")
    if scale:
        b *= np.array([width, height, width, height])
    if form == "xywh":
        b[:, 2:] += b[:, :2]
    elif form == "cxcywh":
        half = b[:, 2:] / 2
        b = np.concatenate([b[:, :2] - half, b[:, :2] + half], 1)
    elif form != "xyxy":
        raise ValueError(f"unknown box convention {convention!r}")
    return b


def _fits(b: np.ndarray, width: float, height: float) -> np.ndarray:
    t = FIT_TOLERANCE
    with np.errstate(invalid="ignore"):
        return (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & (b[:, 0] >= -t) & (b[:, 1] >= -t) & (b[:, 2] <= width + t) & (b[:, 3] <= height + t)


def check_convention(images: list[tuple[RawImage, int, int]], declared: str, source: str) -> None:
    """DataError when the boxes of ``source`` fit their images in another convention but not in
    ``declared``. ``images``: (record, width, height) in the annotation's own orientation."""
    boxes = [(r, w, h) for r, w, h in images if len(r.boxes)]
    total = sum(len(r.boxes) for r, _, _ in boxes)
    if total == 0:
        return

    def misfits(convention: str) -> int:
        return sum(int((~_fits(to_xyxy(r.boxes, convention, w, h), w, h)).sum()) for r, w, h in boxes)

    bad = misfits(declared)
    if bad <= MIXUP_SHARE * total:
        return
    # Ties go to the commoner mix-up, in the order of CONVENTIONS; the others that fit are named too.
    fitting = sorted((misfits(c), i, c) for i, c in enumerate(CONVENTIONS) if c != declared)
    best_bad, _, best = fitting[0]
    also = [c for n, _, c in fitting[1:] if n == best_bad]
    alternatives = f" (and as {', '.join(also)})" if also else ""
    if best_bad > FIT_SHARE * total:
        return  # nothing fits better: bad boxes, reported one by one
    example = next((r, w, h, i) for r, w, h in boxes for i in np.flatnonzero(~_fits(to_xyxy(r.boxes, declared, w, h), w, h))[:1])
    r, w, h, i = example
    values = ", ".join(f"{v:g}" for v in r.boxes[i])
    raise DataError(
        f"{source}: {bad} of {total} boxes do not fit their images as {declared}, but {total - best_bad} fit as {best}{alternatives} "
        f"(e.g. {r.where[i]} in {r.path.name}, a {w}x{h} image: [{values}]); the boxes look like {best}: "
        f"write them as {declared}, which this format requires"
    )


# EXIF orientations that swap width and height (5-8) and how a stored-pixel point maps upright.
def exif_boxes(b: np.ndarray, orientation: int, width: int, height: int) -> np.ndarray:
    """xyxy boxes on the stored ``width`` x ``height`` pixels, moved to the upright image."""
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    w, h = width, height
    if orientation == 2:
        out = [w - x2, y1, w - x1, y2]
    elif orientation == 3:
        out = [w - x2, h - y2, w - x1, h - y1]
    elif orientation == 4:
        out = [x1, h - y2, x2, h - y1]
    elif orientation == 5:  # transpose
        out = [y1, x1, y2, x2]
    elif orientation == 6:  # rotate 270 (90 clockwise)
        out = [h - y2, x1, h - y1, x2]
    elif orientation == 7:  # transverse
        out = [h - y2, w - x2, h - y1, w - x1]
    elif orientation == 8:  # rotate 90 (counter-clockwise)
        out = [y1, w - x2, y2, w - x1]
    else:
        return b
    return np.stack(out, 1)


def clean_boxes(r: RawImage, b: np.ndarray, width: int, height: int, report: BoxReport) -> BoxSample:
    """Clip, drop and convert one image's xyxy pixel boxes (already upright) into a sample."""
    n = len(b)
    crowd = np.zeros(n, bool) if r.crowd is None else np.asarray(r.crowd, bool)
    difficult = np.zeros(n, bool) if r.difficult is None else np.asarray(r.difficult, bool)
    keep = np.ones(n, bool)
    finite = np.isfinite(b).all(1)
    for i in np.flatnonzero(~finite):
        report.dropped.append(f"{r.where[i]} ({r.path.name}): non-finite coordinates {b[i].tolist()}; box dropped")
    keep &= finite
    b = np.where(finite[:, None], b, 0.0)
    empty = keep & ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))
    for i in np.flatnonzero(empty):
        report.dropped.append(f"{r.where[i]} ({r.path.name}): zero or negative size (width {b[i, 2] - b[i, 0]:g}, height {b[i, 3] - b[i, 1]:g}); box dropped")
    keep &= ~empty
    clipped = np.stack([b[:, 0].clip(0, width), b[:, 1].clip(0, height), b[:, 2].clip(0, width), b[:, 3].clip(0, height)], 1)
    moved = keep & (np.abs(clipped - b) > FIT_TOLERANCE).any(1)
    outside = keep & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    for i in np.flatnonzero(outside):
        report.dropped.append(f"{r.where[i]} ({r.path.name}): box {b[i].round(1).tolist()} lies outside the {width}x{height} image; box dropped")
    for i in np.flatnonzero(moved & ~outside):
        report.clipped.append(f"{r.where[i]} ({r.path.name}): box {b[i].round(1).tolist()} reaches outside the {width}x{height} image; clipped")
    keep &= ~outside
    labels = np.asarray(r.labels, dtype=np.int64).reshape(-1)
    return BoxSample(
        r.path, r.image_id, width, height,
        clipped[keep].astype(np.float32).reshape(-1, 4), labels[keep], crowd[keep], difficult[keep],
    )
