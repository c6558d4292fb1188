"""Where a run computes and how its randomness starts: the same for every task."""

from __future__ import annotations

import random

import numpy as np
import torch

from graft.errors import ConfigError


def select_device(name: str = "auto") -> torch.device:
    """The device ``name`` asks for; under torchrun, this rank's (``cuda:LOCAL_RANK`` on GPUs), with
    the process group joined (``graft.engine.distributed.join``)."""
    from graft.engine import distributed

    return distributed.join(_named_device(name))


def _named_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device '{name}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for (--device or train.device), but no CUDA GPU is available here; use auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed every global RNG a run draws from (dropout, drop-path; data order has its own). With
    several processes each rank gets its own stream (seed + rank): dropout masks differ between
    the ranks' images as they do between one process's batches."""
    from graft.engine import distributed

    seed += distributed.rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
