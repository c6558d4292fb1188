"""``data.augment: auto`` for detectors, decided on the validation split.

As for classifiers (``graft.train.autotune``): each candidate, in growing strength, trains the
neck and heads exactly as the frozen-backbone phase would (same solver, seed, starting weights
and learning rate), on cached backbone features of its own augmented views, for at most
``MAX_SEARCH_EPOCHS`` epochs, and is scored by validation mAP (mAP@.5, then the earlier candidate,
break ties); test images are never looked at. A stronger candidate is tried only while the one
before it helped. The chosen candidate's feature cache is handed to the run, so its views are not
computed again. A value the user set is never searched.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from graft.config import GraftConfig
from graft.detection.cache import FeatureCache
from graft.detection.model import GraftDetector
from graft.detection.task import DetectionTask
from graft.train.autotune import Decision
from graft.train.loop import Phase, PhaseData, Trainer

AUTO_AUGMENTS = ("none", "flip", "flip-scale")  # growing strength; `strong` (colour) is opt-in
MAX_SEARCH_EPOCHS = 10  # each candidate trains this many epochs of the frozen phase's schedule at most
FALLBACK = "flip"  # without validation images or a cacheable frozen phase: torchvision's reference recipe


@dataclass
class DetectionTrial:
    augment: str
    val_map: float
    val_map50: float
    epoch: int


class _ScoredAtTheEnd(DetectionTask):
    """A trial is scored by its last epoch: mAP on the epochs before it would only cost time."""

    def __init__(self, task: DetectionTask) -> None:
        super().__init__(task.val_samples, task.classes, task.conf)

    def validate(self, trainer: Trainer) -> dict[str, float | None]:
        if trainer.state.epoch + 1 < trainer.phase.epochs:
            return {"val_map": None, "val_map50": None}
        return super().validate(trainer)


def best_trial(trials: list[DetectionTrial]) -> DetectionTrial:
    """Highest validation mAP; then mAP@.5; then the earlier (weaker) candidate."""
    return max(reversed(trials), key=lambda t: (round(t.val_map, 9), round(t.val_map50, 9)))


def summary(decision: Decision) -> list[str]:
    if not decision.trials:
        return [f"auto: {decision.note}"]
    lines = [f"auto: augmentation {decision.augment}, chosen on {decision.note} ({decision.seconds:.1f}s)"]
    lines += [f"  augment {t.augment:<11} val mAP {t.val_map:.3f} (mAP@.5 {t.val_map50:.3f}) after {t.epoch} epochs" for t in decision.trials]
    return lines


def decide_augment(
    cfg: GraftConfig,
    model: GraftDetector,
    frozen_phase: Phase,
    task: DetectionTask,
    *,
    train_cache: Callable[[str], FeatureCache],
    val_cache: FeatureCache,
    device: torch.device,
    say: Any = print,
) -> tuple[Decision, dict[str, FeatureCache]]:
    """Try the candidates; returns the decision and the feature caches built for them (the caller
    uses the chosen one's and closes the rest). ``train_cache(name)`` builds the training
    features under augmentation ``name``."""
    from graft.train.runner import seed_everything

    started = time.perf_counter()
    epochs = min(frozen_phase.epochs, MAX_SEARCH_EPOCHS)
    phase = Phase(frozen_phase.name, epochs, frozen_phase.trainable_from, frozen_phase.lr)
    initial = copy.deepcopy(model.state_dict())
    caches: dict[str, FeatureCache] = {}
    trials: list[DetectionTrial] = []
    trial_task = _ScoredAtTheEnd(task)
    try:
        for name in AUTO_AUGMENTS:
            caches[name] = train_cache(name)
            model.load_state_dict(initial)
            trainer = Trainer(
                model, [phase], solver=cfg.solver, train_data=caches[name], val_data=val_cache, device=device,
                freeze_patterns=cfg.model.freeze, lr_rules=cfg.model.lr_mult, task=trial_task,
                data_for_phase=lambda p, c=caches[name]: PhaseData(c, val_cache, forward=model, workers=0),
            )
            seed_everything(cfg.solver.seed)
            last = trainer.fit().history[-1]
            row = DetectionTrial(name, float(last["val_map"]), float(last["val_map50"]), int(last["epoch"]))
            improved = not trials or best_trial(trials + [row]) is row
            trials.append(row)
            if not improved:
                break
    finally:
        model.load_state_dict(initial)  # the run starts where every trial started
    decision = Decision(
        augment=best_trial(trials).augment, epochs=epochs, trials=trials,  # type: ignore[arg-type]
        note=f"{len(task.val_samples)} validation images, neck and heads trained {epochs} epochs on cached backbone features",
        seconds=time.perf_counter() - started,
    )
    for line in summary(decision):
        say(line)
    return decision, caches
