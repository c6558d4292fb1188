"""One small box dataset, written in each of the three formats graft reads.

Objects are bright squares (class "square") and dark discs (class "disc") on noise, so that tiny
detectors can learn them; every writer states the same boxes in its own convention."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["disc", "square"]


def make_scene(rng: np.random.Generator, size: tuple[int, int] = (64, 48), objects: int | None = None) -> tuple[np.ndarray, list[tuple[list[float], int]]]:
    w, h = size
    pixels = rng.normal(120, 25, size=(h, w, 3))
    boxes = []
    for _ in range(int(rng.integers(1, 4)) if objects is None else objects):
        s = int(rng.integers(10, 18))
        x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        label = int(rng.integers(0, 2))
        draw(pixels, ("disc", "square")[label], x, y, s)
        boxes.append(([float(x), float(y), float(x + s), float(y + s)], label))
    return np.clip(pixels, 0, 255).astype(np.uint8), boxes


def draw(pixels: np.ndarray, kind: str, x: int, y: int, s: int) -> None:
    """A dark disc, a bright square, or a bright ring (the class that expansion tests add)."""
    if kind == "square":
        pixels[y : y + s, x : x + s] = 235
        return
    yy, xx = np.mgrid[0:s, 0:s]
    r2 = (yy - s / 2 + 0.5) ** 2 + (xx - s / 2 + 0.5) ** 2
    if kind == "disc":
        pixels[y : y + s, x : x + s][r2 <= (s / 2) ** 2] = 20
    else:
        pixels[y : y + s, x : x + s][(r2 <= (s / 2) ** 2) & (r2 >= (s / 2 - 3) ** 2)] = 235


def ring_scenes(n: int, seed: int, names: tuple[str, ...] = ("ring",), prefix: str = "new") -> list[tuple[str, np.ndarray, list[tuple[list[float], int]]]]:
    """Scenes with one or two rings and one disc or square each, as the new data of an expansion:
    only objects of classes in ``names`` are labelled (index into ``names``); the others are there,
    unlabelled, as old objects in new photos are."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = 64, 48
        pixels = rng.normal(120, 25, size=(h, w, 3))
        boxes: list[tuple[list[float], int]] = []
        kinds = ["ring"] * int(rng.integers(1, 3)) + [("disc", "square")[int(rng.integers(0, 2))]]
        taken: list[tuple[int, int, int]] = []
        for kind in kinds:
            for _ in range(50):  # objects do not overlap
                s = int(rng.integers(12, 18))
                x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
                if all(x + s <= a or a + b <= x or y + s <= c or c + b <= y for a, c, b in taken):
                    break
            taken.append((x, y, s))
            draw(pixels, kind, x, y, s)
            if kind in names:
                boxes.append(([float(x), float(y), float(x + s), float(y + s)], names.index(kind)))
        out.append((f"{prefix}_{i:03d}", np.clip(pixels, 0, 255).astype(np.uint8), boxes))
    return out


def make_scenes(n: int, seed: int = 0, negatives: int = 1) -> list[tuple[str, np.ndarray, list[tuple[list[float], int]]]]:
    """``n`` scenes named img_000..., the last ``negatives`` of them without objects."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels, boxes = make_scene(rng, objects=0 if i >= n - negatives else None)
        out.append((f"img_{i:03d}", pixels, boxes))
    return out


def write_coco(root: Path, splits: dict[str, list], *, category_ids: tuple[int, ...] = (3, 7), names: tuple[str, ...] = tuple(CLASSES)) -> Path:
    """COCO 2017 layout: annotations/instances_<split>.json beside <split>/ image folders."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, scenes in splits.items():
        images, anns = [], []
        for n, (name, pixels, boxes) in enumerate(scenes, 1):
            (root / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / split / f"{name}.png")
            images.append({"id": n, "file_name": f"{name}.png", "width": pixels.shape[1], "height": pixels.shape[0]})
            for (x1, y1, x2, y2), label in boxes:
                anns.append({"id": ann_id, "image_id": n, "category_id": category_ids[label], "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
                ann_id += 1
        cats = [{"id": cid, "name": name} for cid, name in zip(category_ids, names)]
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def write_yolo(root: Path, splits: dict[str, list], names: list[str] | tuple[str, ...] = tuple(CLASSES)) -> Path:
    for split, scenes in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for name, pixels, boxes in scenes:
            h, w = pixels.shape[:2]
            Image.fromarray(pixels).save(root / "images" / split / f"{name}.png")
            lines = [f"{label} {(x1 + x2) / 2 / w:.8f} {(y1 + y2) / 2 / h:.8f} {(x2 - x1) / w:.8f} {(y2 - y1) / h:.8f}" for (x1, y1, x2, y2), label in boxes]
            if lines:
                (root / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + "\n")
    entries = "\n".join(f"{s}: images/{s}" for s in splits)
    (root / "data.yaml").write_text(f"path: .\n{entries}\nnames:\n" + "".join(f"  {i}: {c}\n" for i, c in enumerate(names)))
    return root


def voc_xml(name: str, width: int, height: int, boxes: list[tuple[list[float], int]], filename: str | None = None) -> str:
    objects = "".join(
        f"<object><name>{CLASSES[label]}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1:g}</xmin><ymin>{y1 + 1:g}</ymin><xmax>{x2:g}</xmax><ymax>{y2:g}</ymax></bndbox></object>"
        for (x1, y1, x2, y2), label in boxes
    )
    return f"<annotation><filename>{filename or name + '.png'}</filename><size><width>{width}</width><height>{height}</height><depth>3</depth></size>{objects}</annotation>"


def write_voc(root: Path, splits: dict[str, list]) -> Path:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, scenes in splits.items():
        for name, pixels, boxes in scenes:
            Image.fromarray(pixels).save(root / "JPEGImages" / f"{name}.png")
            (root / "Annotations" / f"{name}.xml").write_text(voc_xml(name, pixels.shape[1], pixels.shape[0], boxes))
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{name}\n" for name, _, _ in scenes))
    return root


def three_splits(n_train: int = 12, n_val: int = 4, n_test: int = 4, seed: int = 0) -> dict[str, list]:
    """Given train/val/test splits; the last training image is a negative (no objects, no boxes)."""
    train = make_scenes(n_train, seed=seed, negatives=1)
    held = [(f"held_{i:03d}", pixels, boxes) for i, (_, pixels, boxes) in enumerate(make_scenes(n_val + n_test, seed=seed + 1, negatives=0))]
    return {"train": train, "val": held[:n_val], "test": held[n_val:]}
