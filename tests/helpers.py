"""Generated datasets and configs that tiny timm models learn in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_image(path: Path, colour: tuple[int, int, int], rng: np.random.Generator, size: int = 40) -> Path:
    """A noisy image of one dominant colour with a random bright square: easy to learn, not trivial."""
    base = np.array(colour, dtype=np.float32)
    pixels = base + rng.normal(0, 35, size=(size, size, 3))
    x, y = rng.integers(0, size - 10, size=2)
    pixels[y : y + 10, x : x + 10] += 60
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def make_class_folders(root: Path, per_class: int = 12, classes: dict | None = None, seed: int = 0, ext: str = ".png") -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in (classes or COLOURS).items():
        for i in range(per_class):
            make_image(root / name / f"{name}_{i:02d}{ext}", colour, rng)
    return root


def tiny_config(data_dir: Path | str, **sections) -> dict:
    """A config for a tiny random-init timm model that trains in a second or two."""
    cfg = {
        "data": {"dir": str(data_dir), "img_size": 32, "num_workers": 0, "augment": "flip-rotate"},
        "model": {"name": "test_efficientnet", "weights": "none", "dropout": 0.2},
        "train": {"strategy": "two-phase", "epochs": 2, "fine_tune_epochs": 2, "device": "cpu"},
        "solver": {"batch_size": 8, "base_lr": 0.01, "seed": 0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``graft ARGS`` in this process: (exit status, stdout, stderr)."""
    from graft.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def StopAfter(epoch: int, steps: int):  # noqa: N802 (a hook class, built where graft is importable)
    """A hook that simulates Ctrl-C after ``steps`` optimizer steps of epoch ``epoch`` (the SIGINT
    handler sets the same flag)."""
    from graft.engine.loop import Hook

    class _StopAfter(Hook):
        def after_step(self, trainer, loss):
            if trainer.state.epoch + 1 == epoch and trainer.state.batch == steps:
                trainer.stop_requested = True

    return _StopAfter()
