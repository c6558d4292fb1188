"""Caffe's solver: the optimizer and its learning-rate policy, per phase.

The schedule is one small class rather than a chain of torch schedulers so that warm-up,
every policy and plateau drops compose, and its whole state is three numbers in a snapshot.
LRs change every iteration (smooth warm-up and cosine); plateau drops happen at epoch ends.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from graft.errors import ConfigError


def make_optimizer(groups: list[dict[str, Any]], solver: Any) -> torch.optim.Optimizer:
    """``groups`` from ``surgery.param_groups`` (each has lr, weight_decay and names)."""
    if not groups:
        raise ConfigError("nothing to train: every parameter is frozen (check model.freeze, model.lr_mult and train.fine_tune_at)")
    kind = solver.type
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=solver.base_lr, momentum=solver.momentum, nesterov=solver.momentum > 0)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=solver.base_lr, betas=(solver.momentum, 0.999))
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=solver.base_lr, betas=(solver.momentum, 0.999))
    if kind == "rmsprop":
        return torch.optim.RMSprop(groups, lr=solver.base_lr, momentum=solver.momentum, alpha=0.9, eps=1e-7)
    raise ConfigError(f"solver.type '{kind}' is not one of sgd, adam, adamw, rmsprop")


class LRSchedule:
    """Sets every group's lr to ``initial_lr * factor(iteration) * plateau_scale``."""

    def __init__(self, optimizer: torch.optim.Optimizer, solver: Any, *, total_iters: int, iters_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.policy = solver.lr_policy
        self.gamma = solver.gamma
        self.total = max(1, total_iters)
        self.per_epoch = max(1, iters_per_epoch)
        self.warmup = int(round(solver.warmup_epochs * self.per_epoch))
        self.stepsize = solver.stepsize * self.per_epoch
        self.milestones = sorted(v * self.per_epoch for v in solver.stepvalue)
        self.patience = solver.plateau_patience
        self.iteration = 0
        self.plateau_scale = 1.0
        self.best = math.inf
        self.bad_epochs = 0
        self._apply()

    def factor(self, it: int) -> float:
        f = 1.0
        if self.policy == "step":
            f = self.gamma ** (it // self.stepsize)
        elif self.policy == "multistep":
            f = self.gamma ** sum(it >= m for m in self.milestones)
        elif self.policy == "cosine":
            t = min(1.0, max(0, it - self.warmup) / max(1, self.total - self.warmup))
            f = 0.5 * (1.0 + math.cos(math.pi * t))
        elif self.policy == "one-cycle":
            # As torch's OneCycleLR: up from 1/25 over 30% of the phase, cosine down to 1/(25*1e4).
            peak = max(1, int(0.3 * self.total))
            if it < peak:
                f = 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * it / peak))
            else:
                t = min(1.0, (it - peak) / max(1, self.total - peak))
                f = 1 / 25e4 + (1 - 1 / 25e4) * 0.5 * (1 + math.cos(math.pi * t))
        if self.warmup and it < self.warmup and self.policy != "one-cycle":
            f *= (it + 1) / (self.warmup + 1)
        return f

    def _apply(self) -> None:
        f = self.factor(self.iteration) * self.plateau_scale
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f

    def step(self) -> None:
        """After each optimizer step."""
        self.iteration += 1
        self._apply()

    def epoch_end(self, val_loss: float | None) -> None:
        if self.policy != "plateau" or val_loss is None or math.isnan(val_loss):
            return
        if val_loss < self.best - 1e-4:
            self.best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.plateau_scale *= self.gamma
                self.bad_epochs = 0
        self._apply()

    @property
    def lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "plateau_scale": self.plateau_scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.plateau_scale = float(state["plateau_scale"])
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self._apply()
