"""The classifier demo's data: real photographs that scikit-image ships (brick wall, grass,
gravel), cut into patches for a three-class material-recognition task. Training patches come from
the top three quarters of each photo and validation patches from the bottom quarter, so no
validation pixel was ever seen in training."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from graft.configuration import parse_config
from graft.errors import DataError


TEXTURES = ("brick", "grass", "gravel")


def skimage_photo(name: str) -> Path:
    try:
        import skimage
    except ImportError as err:
        raise DataError("the demo needs scikit-image, which ships its photos (pip install scikit-image)") from err
    folder = Path(skimage.__file__).parent / "data"
    for ext in (".png", ".jpg"):
        if (folder / f"{name}{ext}").is_file():
            return folder / f"{name}{ext}"
    raise DataError(f"scikit-image's photo {name} is missing from {folder}; reinstall scikit-image")


def make_texture_dataset(
    root: Path,
    *,
    train_per_class: int = 40,
    val_per_class: int = 15,
    seed: int = 0,
    photos: tuple[str, ...] = TEXTURES,
    sizes: tuple[int, int] = (80, 160),
) -> Path:
    """Write ``root/{train,val}/PHOTO/*.jpg`` (patches of side ``sizes``); returns ``root``."""
    rng = random.Random(seed)
    for name in photos:
        photo = Image.open(skimage_photo(name)).convert("RGB")
        w, h = photo.size
        cut = int(h * 0.75)
        for split, count, (top, bottom) in (("train", train_per_class, (0, cut)), ("val", val_per_class, (cut, h))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                size = rng.randint(sizes[0], min(sizes[1], bottom - top))
                x = rng.randint(0, w - size)
                y = rng.randint(top, bottom - size)
                photo.crop((x, y, x + size, y + size)).save(folder / f"{name}_{i:03d}.jpg", quality=92)
    return root


def demo_config(data_dir: Path, epochs: int | None = None, fine_tune_epochs: int | None = None):
    return parse_config(
        {
            "data": {"dir": str(data_dir)},  # augmentation and the head's rate: auto, decided on the validation split
            "model": {"name": "tf_efficientnet_lite0", "weights": "bundled"},
            "train": {"strategy": "two-phase", "epochs": 5 if epochs is None else epochs, "fine_tune_epochs": 5 if fine_tune_epochs is None else fine_tune_epochs},
            "solver": {"base_lr": 1e-3, "batch_size": 16, "lr_policy": "cosine", "seed": 0},
        },
        "demo",
    )
