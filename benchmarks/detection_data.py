"""Detection datasets built from real images that pip packages ship, written as Pascal VOC with
train/val/test image sets. Nothing is downloaded.

- ``objects``: three classes of real objects pasted onto real backgrounds: faces (scikit-image's
  ``lfw_subset``, photos from Labeled Faces in the Wild), coins (cut from scikit-image's ``coins``
  photo by thresholding) and handwritten digits (scikit-learn's scans). Each object instance
  belongs to one split only, and the backgrounds are crops of disjoint bands of scikit-image's
  photos, so no test object or test background pixel was seen in training.
- ``trees``: the deepforest wheel's aerial photos with tree boxes, in non-overlapping tiles (the
  detection demo's data), split seeded by tile.
- ``digits``: ten classes, scikit-learn's handwritten digit scans (each scan in one split only)
  pasted onto photos no other benchmark uses (scikit-learn's ``china`` and ``flower``, and
  scikit-image's ``camera``, ``moon``, ``hubble_deep_field``, ``ihc``, ``retina`` and
  ``motorcycle_right``, each cut into disjoint train/val/test bands), 128 px, in COCO layout. Built
  for the time-to-quality benchmark; no setting was chosen on it before.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DETECTION_DATASETS = ("objects", "trees", "digits")
BACKGROUNDS = ("grass.png", "gravel.png", "brick.png", "rocket.jpg", "coffee.png", "chelsea.png", "astronaut.png", "motorcycle_left.png")
CLASSES = ("coin", "digit", "face")
SCENE = 192


def _voc(root: Path, stem: str, image: Image.Image, boxes: list[tuple[str, list[float]]]) -> None:
    image.save(root / "JPEGImages" / f"{stem}.png")
    objects = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0] + 1:.0f}</xmin><ymin>{b[1] + 1:.0f}</ymin><xmax>{b[2]:.0f}</xmax><ymax>{b[3]:.0f}</ymax></bndbox></object>"
        for name, b in boxes
    )
    (root / "Annotations" / f"{stem}.xml").write_text(f"<annotation><filename>{stem}.png</filename><size><width>{image.width}</width><height>{image.height}</height><depth>3</depth></size>{objects}</annotation>")


def _instances(seed: int) -> dict[str, dict[str, list[Image.Image]]]:
    """Object crops per class, split 60/20/20 by instance."""
    import skimage.data
    from scipy import ndimage
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    faces = [Image.fromarray((f * 255).astype(np.uint8)).convert("RGB") for f in skimage.data.lfw_subset()[:100]]
    coins_img = skimage.data.coins()
    mask = coins_img > 110
    labels, n = ndimage.label(ndimage.binary_fill_holes(ndimage.binary_opening(mask, iterations=2)))
    coins = []
    for sl in ndimage.find_objects(labels):
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if 25 <= h <= 80 and 25 <= w <= 80:
            coins.append(Image.fromarray(coins_img[sl]).convert("RGB"))
    digits = [Image.fromarray((255 - d * 16).clip(0, 255).astype(np.uint8)).resize((24, 24), Image.BILINEAR).convert("RGB") for d in load_digits().images[:300]]
    out = {}
    for name, items in (("face", faces), ("coin", coins), ("digit", digits)):
        order = rng.permutation(len(items))
        a, b = int(0.6 * len(items)), int(0.8 * len(items))
        out[name] = {"train": [items[i] for i in order[:a]], "val": [items[i] for i in order[a:b]], "test": [items[i] for i in order[b:]]}
    return out


def _backgrounds(names: tuple[str, ...] = BACKGROUNDS) -> dict[str, list[Image.Image]]:
    """Each background photo cut into three horizontal bands: train, val, test."""
    import skimage
    import sklearn

    folders = [Path(skimage.__file__).parent / "data", Path(sklearn.__file__).parent / "datasets" / "images"]
    out: dict[str, list[Image.Image]] = {"train": [], "val": [], "test": []}
    for name in names:
        photo = Image.open(next(f / name for f in folders if (f / name).is_file())).convert("RGB")
        w, h = photo.size
        cuts = [0, int(0.6 * h), int(0.8 * h), h]
        for split, (top, bottom) in zip(("train", "val", "test"), zip(cuts, cuts[1:])):
            out[split].append(photo.crop((0, top, w, bottom)))
    return out


def write_objects(root: Path, *, seed: int = 0, counts: dict[str, int] | None = None) -> Path:
    counts = counts or {"train": 120, "val": 40, "test": 40}
    shutil.rmtree(root, ignore_errors=True)
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    objects, backgrounds = _instances(seed), _backgrounds()
    rng = random.Random(seed)
    for split, n in counts.items():
        stems = []
        for i in range(n):
            bg = rng.choice(backgrounds[split])
            side = min(bg.width, bg.height, rng.randint(SCENE, 2 * SCENE))
            x, y = rng.randint(0, bg.width - side), rng.randint(0, bg.height - side)
            scene = bg.crop((x, y, x + side, y + side)).resize((SCENE, SCENE), Image.BILINEAR)
            placed: list[tuple[str, list[float]]] = []
            for _ in range(rng.randint(1, 5)):
                name = rng.choice(CLASSES)
                obj = rng.choice(objects[name][split])
                size = rng.randint(18, 56)
                obj = obj.resize((size, max(8, round(size * obj.height / obj.width))), Image.BILINEAR)
                for _ in range(20):  # a place that overlaps nothing placed before
                    ox, oy = rng.randint(0, SCENE - obj.width), rng.randint(0, SCENE - obj.height)
                    box = [ox, oy, ox + obj.width, oy + obj.height]
                    if all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for _, b in placed):
                        scene.paste(obj, (ox, oy))
                        placed.append((name, [float(v) for v in box]))
                        break
            stem = f"{split}_{i:04d}"
            _voc(root, stem, scene, placed)
            stems.append(stem)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


def write_trees(root: Path, *, seed: int = 0) -> Path:
    """The deepforest tiles with a seeded 60/20/20 split by tile, as VOC image sets."""
    from graft.tasks.detect.deepforest import write_tree_tiles

    shutil.rmtree(root, ignore_errors=True)
    write_tree_tiles(root)
    stems = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    random.Random(seed).shuffle(stems)
    a, b = int(0.6 * len(stems)), int(0.8 * len(stems))
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, part in (("train", stems[:a]), ("val", stems[a:b]), ("test", stems[b:])):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(sorted(part)) + "\n")
    return root


DIGIT_BACKGROUNDS = ("china.jpg", "flower.jpg", "camera.png", "moon.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "motorcycle_right.png")
DIGIT_SCENE = 128


def _digit_background(rng: random.Random, backgrounds: list[Image.Image]) -> Image.Image:
    """A random square crop of a random background photo, resized to the scene size."""
    bg = rng.choice(backgrounds)
    side = min(bg.width, bg.height, rng.randint(DIGIT_SCENE, 3 * DIGIT_SCENE))
    x, y = rng.randint(0, bg.width - side), rng.randint(0, bg.height - side)
    return bg.crop((x, y, x + side, y + side)).resize((DIGIT_SCENE, DIGIT_SCENE), Image.BILINEAR)


def _place_digit(scene: Image.Image, rng: random.Random, scan: np.ndarray, placed: list[list[int]]) -> list[int] | None:
    """Paste one scan in a random ink and size where it overlaps nothing placed before; its box, or
    None when 20 tries found no room."""
    ink = rng.choice(((20, 20, 20), (240, 240, 240), (200, 30, 30), (30, 30, 160)))
    size = rng.randint(14, 36)
    alpha = Image.fromarray((scan * 16).clip(0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    for _ in range(20):
        ox, oy = rng.randint(0, DIGIT_SCENE - size), rng.randint(0, DIGIT_SCENE - size)
        box = [ox, oy, ox + size, oy + size]
        if all(box[2] <= q[0] or box[0] >= q[2] or box[3] <= q[1] or box[1] >= q[3] for q in placed):
            scene.paste(Image.new("RGB", (size, size), ink), (ox, oy), alpha)
            placed.append(box)
            return box
    return None


def _digit_scans(seed: int) -> tuple[Any, dict[str, np.ndarray]]:
    """scikit-learn's digits and their scans split 60/20/20 (each scan in one split only)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    a, b = int(0.6 * len(order)), int(0.8 * len(order))
    return digits, {"train": order[:a], "val": order[a:b], "test": order[b:]}


def _write_coco(root: Path, split: str, scenes: list[tuple[Image.Image, list[tuple[int, list[int]]]]], names: list[str], boxed: list[list[str]] | None = None) -> None:
    """Scenes with their (digit, box) objects as COCO; only the digits in ``names`` are boxed (in
    scene i, only those in ``boxed[i]`` when given)."""
    import json

    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (scene, objects) in enumerate(scenes):
        name = f"{split}_{i:04d}.png"
        scene.save(root / split / name)
        images.append({"id": i + 1, "file_name": name, "width": DIGIT_SCENE, "height": DIGIT_SCENE})
        for digit, (x0, y0, x1, y1) in objects:
            if str(digit) in names and (boxed is None or str(digit) in boxed[i]):
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": names.index(str(digit)) + 1,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    categories = [{"id": c + 1, "name": n} for c, n in enumerate(names)]
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def write_digits(root: Path, *, seed: int = 0, counts: dict[str, int] | None = None) -> Path:
    """Scenes of 1-6 handwritten digits (classes "0".."9") on real photos, COCO 2017 layout."""
    counts = counts or {"train": 400, "val": 100, "test": 150}
    shutil.rmtree(root, ignore_errors=True)
    digits, scans = _digit_scans(seed)
    backgrounds = _backgrounds(DIGIT_BACKGROUNDS)
    rng = random.Random(seed)
    for split, n in counts.items():
        scenes = []
        for _ in range(n):
            scene, objects, placed = _digit_background(rng, backgrounds[split]), [], []
            for _ in range(rng.randint(1, 6)):
                k = int(rng.choice(scans[split]))
                box = _place_digit(scene, rng, digits.images[k], placed)
                if box is not None:
                    objects.append((int(digits.target[k]), box))
            scenes.append((scene, objects))
        _write_coco(root, split, scenes, [str(d) for d in range(10)])
    return root


def write_digit_expansion(root: Path, *, seed: int = 0, new: tuple[int, ...] = (8, 9), old_scenes: str = "any", counts: dict[str, int] | None = None) -> dict[str, Path]:
    """The detector-expansion protocol on digits (COCO layout, 128 px), each a folder under ``root``:

    - ``old``: the original's scenes, only the old digits boxed; with ``old_scenes="any"`` they show
      any digit (the new ones unboxed, as in VOC's "19 + 1"), with ``"old-only"`` only old digits;
    - ``new``: scenes each showing a new digit, only the new digits boxed; every second one also
      shows 1-4 old digits that nobody boxed, as a user's new photos would;
    - ``joint``: the ``old`` and ``new`` scenes with every digit boxed (joint retraining);
    - ``matched``: the same scenes with the boxes the original and the expansion had between them
      (joint retraining with the expansion's labels: a bound on what those labels can teach);
    - ``full``: ``joint``'s scenes and fresh test scenes of any digits, every digit boxed.
    """
    counts = counts or {"old_train": 500, "old_val": 100, "new_train": 160, "new_val": 40, "test": 250}
    shutil.rmtree(root, ignore_errors=True)
    digits, scans = _digit_scans(seed)
    backgrounds = _backgrounds(DIGIT_BACKGROUNDS)
    rng = random.Random(seed + 1)
    new_set = set(new)
    if old_scenes not in ("any", "old-only"):
        raise ValueError(f"old_scenes is any or old-only, not {old_scenes!r}")
    pool = "any" if old_scenes == "any" else "old"
    pools = {split: {"old": [int(k) for k in ks if digits.target[k] not in new_set], "new": [int(k) for k in ks if digits.target[k] in new_set], "any": [int(k) for k in ks]}
             for split, ks in scans.items()}

    def scene(split: str, plan: list[str]) -> tuple[Image.Image, list[tuple[int, list[int]]]]:
        image, objects, placed = _digit_background(rng, backgrounds[split]), [], []
        for pool in plan:
            k = rng.choice(pools[split][pool])
            box = _place_digit(image, rng, digits.images[k], placed)
            if box is not None:
                objects.append((int(digits.target[k]), box))
        return image, objects

    def new_scene(split: str, i: int) -> tuple[Image.Image, list[tuple[int, list[int]]]]:
        plan = ["new"] * rng.randint(1, 2) + (["old"] * rng.randint(1, 4) if i % 2 else [])
        return scene(split, plan)

    made = {
        "old": {split: [scene(split, [pool] * rng.randint(1, 6)) for _ in range(counts[f"old_{split}"])] for split in ("train", "val")},
        "new": {split: [new_scene(split, i) for i in range(counts[f"new_{split}"])] for split in ("train", "val")},
        "test": [scene("test", ["any"] * rng.randint(1, 6)) for _ in range(counts["test"])],
    }
    old_names, new_names, every = [str(d) for d in range(10) if d not in new_set], [str(d) for d in new], [str(d) for d in range(10)]
    out = {name: root / name for name in ("old", "new", "joint", "matched", "full")}
    for split in ("train", "val"):
        _write_coco(out["old"], split, made["old"][split], old_names)
        _write_coco(out["new"], split, made["new"][split], new_names)
        _write_coco(out["joint"], split, made["old"][split] + made["new"][split], every)
        _write_coco(out["matched"], split, made["old"][split] + made["new"][split], every, [old_names] * len(made["old"][split]) + [new_names] * len(made["new"][split]))
    _write_coco(out["full"], "train", made["old"]["train"] + made["new"]["train"], every)  # joint's, so that it scans as a dataset
    _write_coco(out["full"], "val", made["old"]["val"] + made["new"]["val"], every)
    _write_coco(out["full"], "test", made["test"], every)
    return out


def write_detection_dataset(name: str, root: Path, seed: int = 0) -> Path:
    if name == "objects":
        return write_objects(root, seed=seed)
    if name == "digits":
        return write_digits(root, seed=seed)
    if name == "trees":
        return write_trees(root, seed=seed)
    raise ValueError(f"unknown detection dataset {name!r}; choose from {', '.join(DETECTION_DATASETS)}")
