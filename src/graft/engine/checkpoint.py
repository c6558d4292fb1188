"""Snapshots: everything needed to continue a run exactly (Caffe's ``.solverstate``).

A snapshot is one file written atomically and loaded with ``weights_only=True``: model
tensors, optimizer state with its parameter groups keyed by parameter *name*, the LR schedule,
the AMP scaler, the loop's position (phase, epoch, iteration, batch), every RNG state, the
history so far, and the resolved config and data split of the run.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.errors import SnapshotError
from graft.io import atomic_link_or_copy, atomic_write

FORMAT = "graft-snapshot/1"


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def save_snapshot(path: str | os.PathLike, payload: dict[str, Any], *, also_as: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` atomically to ``path``; ``also_as`` (e.g. ``snapshots/last``) becomes a second name for it."""
    payload = {"format": FORMAT, **payload}
    path = atomic_write(path, lambda tmp: torch.save(payload, tmp), expected_bytes=tensor_bytes(payload))
    if also_as is not None and Path(also_as) != path:
        atomic_link_or_copy(path, also_as)
    return path


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a nested payload: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def newest_snapshot(folder: str | os.PathLike) -> Path | None:
    """``FOLDER/last``, else the newest numbered snapshot in ``FOLDER`` (a run killed after writing
    its first snapshot but before naming it ``last``), else None."""
    folder = Path(folder)
    if (folder / "last").is_file():
        return folder / "last"
    numbered = sorted((p for p in folder.glob("*-[0-9][0-9][0-9][0-9]*") if p.is_file() and p.name.rsplit("-", 1)[-1].isdigit()),
                      key=lambda p: int(p.name.rsplit("-", 1)[-1])) if folder.is_dir() else []
    return numbered[-1] if numbered else None


def resolve_snapshot_path(path: str | os.PathLike) -> Path:
    """Accept the snapshot file, or a run folder (its ``snapshots/last``, else its newest numbered snapshot)."""
    p = Path(path)
    if p.is_dir():
        for folder in (p / "snapshots", p):
            if (found := newest_snapshot(folder)) is not None:
                return found
        raise SnapshotError(f"{p} is a folder without snapshots; pass a snapshot file such as {p}/snapshots/last")
    if not p.is_file():
        newest = newest_snapshot(p.parent) if p.name == "last" else None
        if newest is not None:  # killed between writing the first snapshot and naming it last
            raise SnapshotError(f"snapshot not found: {p}; the newest snapshot there is {newest}: resume from it")
        raise SnapshotError(f"snapshot not found: {p}")
    return p


def load_snapshot(path: str | os.PathLike) -> dict[str, Any]:
    p = resolve_snapshot_path(path)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SnapshotError(f"cannot read snapshot {p}: it is corrupt or not a graft snapshot ({type(err).__name__}: {str(err)[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SnapshotError(f"{p} is not a graft snapshot (expected format {FORMAT}); to start from plain weights use --weights")
    payload["path"] = str(p)
    return payload


def snapshot_run_dir(snapshot_path: str | os.PathLike) -> Path:
    """``RUNDIR/snapshots/NAME`` -> ``RUNDIR``."""
    p = Path(snapshot_path).resolve()
    return p.parent.parent if p.parent.name == "snapshots" else p.parent


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"state_dict": optimizer.state_dict(), "group_names": [list(g["names"]) for g in optimizer.param_groups]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load optimizer state whose groups were saved by name; the rebuilt groups must hold the same
    parameters in the same order, otherwise the state would be applied to the wrong tensors."""
    now = [list(g["names"]) for g in optimizer.param_groups]
    if now != saved["group_names"]:
        flat_now = {n for g in now for n in g}
        flat_saved = {n for g in saved["group_names"] for n in g}
        diff = sorted(flat_now ^ flat_saved)[:3]
        raise SnapshotError(
            "the snapshot's optimizer parameter groups differ from the ones this run builds"
            + (f" (e.g. {', '.join(diff)})" if diff else " (same parameters, different grouping)")
            + "; was the snapshot made with another config? Start from its weights with --weights instead."
        )
    optimizer.load_state_dict(saved["state_dict"])
