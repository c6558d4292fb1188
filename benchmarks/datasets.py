"""Real labelled image datasets that ship inside pip packages, written as graft image folders.

    from datasets import write_dataset
    root = write_dataset("digits", Path("/tmp/bench"), seed=0)   # -> root/{train,val,test}/CLASS/*.png

Every dataset is split per class into train/val/test (60/20/20), seeded. Nothing is downloaded:

- ``digits``: scikit-learn's 1797 handwritten digit scans (8x8, 10 classes), dark ink on white.
  Not flip-invariant: a mirrored 2 or 5 is another glyph.
- ``faces``: scikit-image's ``lfw_subset``: 100 faces from Labeled Faces in the Wild and 100
  non-face patches, 25x25 grayscale; 2 classes.
- ``photo-crops``: 12 scikit-image photos; each class is crops of one photo. Train, val and test
  crops come from disjoint horizontal bands of the photo, so no test pixel was seen in training.
- ``textures``: scikit-image's brick, grass and gravel textures (the demo's data), crops from
  disjoint bands as above; 3 classes, easy (saturated).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATASETS = ("digits", "faces", "photo-crops", "textures")
PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg", "page.png")
TEXTURES = ("brick.png", "grass.png", "gravel.png")
SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}


def _save(img: np.ndarray, path: Path, size: int | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(img)
    if size:
        im = im.resize((size, size), Image.BILINEAR)
    im.convert("RGB").save(path)


def _split_indices(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    idx = rng.permutation(n)
    a, b = int(SPLITS["train"] * n), int((SPLITS["train"] + SPLITS["val"]) * n)
    return {"train": idx[:a], "val": idx[a:b], "test": idx[b:]}


def _write_arrays(images: np.ndarray, labels: np.ndarray, names: list[str], root: Path, seed: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(names):
        for split, ids in _split_indices(int((labels == c).sum()), rng).items():
            members = np.flatnonzero(labels == c)[ids]
            for i in members:
                _save(images[i], root / split / name / f"{i:04d}.png", size)


def _band_crops(photo: np.ndarray, name: str, root: Path, rng: np.random.Generator, per_split: dict[str, int], size: int) -> None:
    """Random square crops, each split from its own horizontal band (train top 60%, val, test)."""
    h, w = photo.shape[:2]
    top = 0
    for split, share in SPLITS.items():
        band = photo[top : top + int(share * h)]
        top += int(share * h)
        bh = band.shape[0]
        for i in range(per_split[split]):
            side = int(rng.integers(max(16, bh // 3), max(17, min(bh, w) + 1)))
            side = min(side, bh, w)
            y, x = int(rng.integers(0, bh - side + 1)), int(rng.integers(0, w - side + 1))
            _save(band[y : y + side, x : x + side], root / split / name / f"{i:04d}.png", size)


def write_dataset(name: str, root: Path, seed: int = 0) -> Path:
    """Write dataset ``name`` under ``root/name-sSEED`` (once) and return that folder."""
    out = Path(root) / f"{name}-s{seed}"
    if (out / ".complete").exists():
        return out
    rng = np.random.default_rng(seed)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels = (255 - d.images * 255 / 16).astype(np.uint8)
        _write_arrays(pixels, d.target, [f"digit{k}" for k in range(10)], out, seed, 64)
    elif name == "faces":
        from skimage import data

        faces = (data.lfw_subset() * 255).astype(np.uint8)
        labels = np.array([0] * 100 + [1] * 100)
        _write_arrays(faces, labels, ["face", "non-face"], out, seed, 64)
    elif name in ("photo-crops", "textures"):
        import skimage
        from PIL import Image

        folder = Path(skimage.__file__).parent / "data"  # the files the package ships, read directly
        names = PHOTOS if name == "photo-crops" else TEXTURES
        per = {"train": 48, "val": 16, "test": 16} if name == "photo-crops" else {"train": 60, "val": 20, "test": 20}
        for photo in names:
            img = np.asarray(Image.open(folder / photo).convert("RGB"))
            _band_crops(img, photo.split(".")[0], out, rng, per, 96)
    else:
        raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    (out / ".complete").touch()
    return out
