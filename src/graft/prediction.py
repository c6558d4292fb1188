"""What a prediction is, whoever made it (a run's PyTorch model or an exported one), and how it is
drawn. Nothing here imports torch: ``graft predict`` on an exported model needs only onnxruntime."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import ImageDraw

from graft.data.images import IMAGE_EXTENSIONS, ImageError, load_image

PALETTE = ["#e8590c", "#1971c2", "#2f9e44", "#ae3ec9", "#f59f00", "#c2255c", "#0c8599", "#5c940d"]


@dataclass
class Prediction:
    """A classifier's answer for one image."""

    path: str
    top: list[tuple[str, float]]  # (class, probability), most likely first
    error: str | None = None

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None


@dataclass
class Box:
    label: str
    score: float
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass
class ImageDetections:
    """A detector's boxes for one image, in its own pixels, highest score first."""

    path: str
    boxes: list[Box] = field(default_factory=list)
    error: str | None = None


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files as given; folders expanded to the image files under them (hidden ones left out)."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = [
                f
                for f in sorted(p.rglob("*"))
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in f.relative_to(p).parts)
            ]
            paths.extend(found)
        else:
            paths.append(p)
    return paths


def classify_files(inputs: list[str | os.PathLike], prepare: Callable[[Any], Any], classify: Callable[[list[Any]], Sequence[list[tuple[str, float]]]], batch_size: int) -> list[Prediction]:
    """One ``Prediction`` per image file (folders searched recursively, in sorted order):
    ``prepare`` turns a loaded image into a model input, ``classify`` a batch of them into each
    one's (class, probability) list. A file that cannot be read gets a Prediction with ``error``
    set instead of stopping the rest."""
    results: list[Prediction] = []
    batch: list[tuple[str, Any]] = []

    def flush() -> None:
        if batch:
            results.extend(Prediction(path, top) for (path, _), top in zip(batch, classify([x for _, x in batch])))
            batch.clear()

    for path in expand_inputs(inputs):
        try:
            batch.append((str(path), prepare(load_image(path))))
        except ImageError as err:
            flush()
            results.append(Prediction(str(path), [], error=str(err)))
            continue
        if len(batch) >= batch_size:
            flush()
    flush()
    return results


def drawn_names(paths: list[str]) -> list[str]:
    """File names for drawn images, one per input and all distinct: the input's stem, with as many
    of its parent folders as tell it apart from another input of the same stem (``val__0.png``),
    its extension beside a sibling of the same stem (``0.jpg.png``), and a count for a repeat."""
    files = [Path(p).resolve() for p in paths]
    folders = [[part for part in f.parent.parts if part != f.anchor] for f in files]
    depth = [0] * len(files)
    siblings = Counter((f.parent, f.stem) for f in files)  # folders cannot tell these apart: extensions can
    base = [f.stem + f.suffix if siblings[f.parent, f.stem] > 1 else f.stem for f in files]
    names = list(base)
    while True:
        owners: dict[str, set[Path]] = {}
        for n, f in zip(names, files):
            owners.setdefault(n, set()).add(f)
        clashes = {n for n, fs in owners.items() if len(fs) > 1}  # the same file given twice is no clash
        grow = [i for i, n in enumerate(names) if n in clashes and depth[i] < len(folders[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
            names[i] = "__".join([*folders[i][len(folders[i]) - depth[i]:], base[i]])
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(f"{n}.png" if seen[n] == 1 else f"{n}-{seen[n]}.png")
    return out


def draw(path: str | os.PathLike, detections: ImageDetections, classes: list[str], out: Path, name: str | None = None) -> Path:
    """The image with its boxes, class and score drawn, saved under ``out`` as ``name`` (default:
    the input's stem, as PNG)."""
    image = load_image(path).copy()
    pen = ImageDraw.Draw(image)
    width = max(1, round(max(image.size) / 300))
    for b in detections.boxes:
        colour = PALETTE[classes.index(b.label) % len(PALETTE)]
        pen.rectangle([b.x1, b.y1, b.x2, b.y2], outline=colour, width=width)
        text = f"{b.label} {b.score:.2f}"
        left, top, right, bottom = pen.textbbox((b.x1, b.y1), text)
        pen.rectangle([left, top - (bottom - top) - 2, right + 2, b.y1], fill=colour)
        pen.text((b.x1 + 1, top - (bottom - top) - 1), text, fill="white")
    out.mkdir(parents=True, exist_ok=True)
    target = out / (name or Path(path).stem + ".png")
    image.save(target)
    return target
