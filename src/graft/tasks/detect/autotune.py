"""``data.augment: auto`` for detectors, decided on the validation split.

Each candidate, in growing strength, runs the first epochs of the run's own frozen-backbone phase
(same solver, schedule, seed and starting weights) on cached backbone features of its own
augmented views, and is scored by validation mAP there (mAP@.5, then the earlier candidate, break
ties); test images are never looked at. A stronger candidate is tried only while the one before it
helped. The winner's trial is not thrown away: its weights, optimizer and schedule are the run's
first epochs (``Trainer.fit(resume=...)``, as a snapshot continues), and its feature cache is the
run's; a loser's is closed at once. So the search costs the losers' epochs and caches only. A value
the user set is never searched.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from graft.configuration import GraftConfig
from graft.console import plural
from graft.tasks.detect.cache import FeatureCache
from graft.tasks.detect.model import GraftDetector
from graft.tasks.detect.task import DetectionTask
from graft.engine.decision import Decision
from graft.engine.loop import Hook, Phase, PhaseData, Trainer

# Growing strength. flip-scale and strong are opt-in: on validation images flip-scale lost to flip on
# objects and trees and was not reached on digits (benchmarks/detection.py), and its 4 cached views
# cost a backbone pass each.
AUTO_AUGMENTS = ("none", "flip")
SEARCH_EPOCHS = 2  # each candidate runs the frozen phase's first 2 epochs; the loser's cost is the search's
FALLBACK = "flip"  # without validation images or a cacheable frozen phase: torchvision's reference recipe


@dataclass
class DetectionTrial:
    augment: str
    val_map: float
    val_map50: float
    epoch: int
    cache_seconds: float = 0.0  # building its feature cache (the winner's is the run's)


class _ScoredAtTheEnd(DetectionTask):
    """A trial is scored at its last epoch: mAP on the epochs before it would only cost time."""

    def __init__(self, task: DetectionTask, until: int) -> None:
        super().__init__(task.val_samples, task.classes, task.conf)
        self.until = until

    def validate(self, trainer: Trainer) -> dict[str, float | None]:
        if trainer.state.epoch + 1 < self.until:
            return {"val_map": None, "val_map50": None}
        return super().validate(trainer)


class _KeepAt(Hook):
    """Keeps the trainer's exact state after epoch ``until``, as a snapshot would."""

    def __init__(self, until: int) -> None:
        self.until, self.payload = until, None

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if trainer.state.epoch == self.until:
            self.payload = copy.deepcopy(trainer.snapshot_payload())


def search_epochs(frozen_epochs: int) -> int:
    """Epochs of the frozen phase each candidate runs before the choice."""
    return min(frozen_epochs, SEARCH_EPOCHS)


def best_trial(trials: list[DetectionTrial]) -> DetectionTrial:
    """Highest validation mAP; then mAP@.5; then the earlier (weaker) candidate."""
    return max(trials, key=lambda t: (round(t.val_map, 9), round(t.val_map50, 9)))  # max keeps the first of equals


def summary(decision: Decision) -> list[str]:
    if not decision.trials:
        return [f"auto: {decision.note}"]
    lines = [f"auto: augmentation {decision.augment}, chosen on {decision.note} ({decision.seconds:.1f}s)"]
    return lines + [trial_line(dataclasses.asdict(t)) for t in decision.trials]


def trial_line(trial: dict[str, Any]) -> str:
    """One candidate's validation figures, for the run's console and for ``graft plan --decide``."""
    return f"  augment {trial['augment']:<11} val mAP {trial['val_map']:.3f} (mAP@.5 {trial['val_map50']:.3f}) after {plural(trial['epoch'], 'epoch')}"


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
) -> tuple[Decision, FeatureCache, dict[str, Any]]:
    """Try the candidates; returns the decision, the chosen candidate's training features and its
    trial's state after ``decision.epochs`` epochs (a snapshot payload the run continues from).
    ``train_cache(name)`` builds the features under augmentation ``name``. A candidate's cache is
    closed as soon as it loses, so at most two are held at once; on any failure all are closed."""
    from graft.engine.device import seed_everything

    started = time.perf_counter()
    epochs = search_epochs(frozen_phase.epochs)
    initial = copy.deepcopy(model.state_dict())
    trials: list[DetectionTrial] = []
    best: tuple[DetectionTrial, FeatureCache, dict[str, Any]] | None = None
    current: FeatureCache | None = None
    try:
        for name in AUTO_AUGMENTS:
            t0 = time.perf_counter()
            current = train_cache(name)
            cache_seconds = time.perf_counter() - t0
            model.load_state_dict(initial)
            trial_task, keep = _ScoredAtTheEnd(task, epochs), _KeepAt(epochs)
            trainer = Trainer(
                model, [frozen_phase], solver=cfg.solver, train_data=current, val_data=val_cache, device=device,
                freeze_patterns=cfg.model.freeze, lr_rules=cfg.model.lr_mult, task=trial_task, hooks=[keep],
                data_for_phase=lambda p, c=current: PhaseData(c, val_cache, forward=model, workers=0),
            )
            seed_everything(cfg.solver.seed)
            last = trainer.fit(until_epoch=epochs).history[-1]
            if last["val_map"] is None:  # stopped early by solver.max_iter: score where it stopped
                last = {**last, **DetectionTask.validate(trial_task, trainer)}  # the base class's: scores now
                keep.payload = copy.deepcopy(trainer.snapshot_payload())
            row = DetectionTrial(name, float(last["val_map"]), float(last["val_map50"]), int(last["epoch"]), round(cache_seconds, 2))
            trials.append(row)
            if best is None or best_trial([best[0], row]) is row:
                if best is not None:
                    best[1].close()
                best, current = (row, current, keep.payload), None
            else:
                current.close()
                current = None
                break  # more augmentation did not help: stronger is not tried
    except BaseException:
        for c in (current, best[1] if best else None):
            if c is not None:
                c.close()
        raise
    finally:
        model.load_state_dict(initial)  # the run starts where every trial started, then takes the winner's state
    assert best is not None and best[2] is not None
    decision = Decision(
        augment=best[0].augment, epochs=epochs, trials=trials,  # type: ignore[arg-type]
        note=f"{plural(len(task.val_samples), 'validation image')}, the first {plural(epochs, 'epoch')} of the frozen phase on cached backbone features (the winner's are the run's)",
        seconds=time.perf_counter() - started,
    )
    for line in summary(decision):
        say(line)
    return decision, best[1], best[2]
