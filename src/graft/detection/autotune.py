"""``data.augment: auto`` for detectors, decided on the validation split.

As for classifiers (``graft.train.autotune``): each candidate, in growing strength, trains the
neck and heads exactly as the frozen-backbone phase would (same solver, seed, starting weights
and learning rate), on cached backbone features of its own augmented views, for at most
``MAX_SEARCH_EPOCHS`` epochs, and is scored by validation mAP (mAP@.5, then the earlier candidate,
break ties); test images are never looked at. A stronger candidate is tried only while the one
before it helped. The chosen candidate's feature cache is handed to the run, so its views are not
computed again; a loser's is closed at once. A value the user set is never searched.
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
from graft.detection.cache import FeatureCache
from graft.detection.model import GraftDetector
from graft.detection.task import DetectionTask
from graft.train.autotune import Decision
from graft.train.loop import Phase, PhaseData, Trainer

AUTO_AUGMENTS = ("none", "flip", "flip-scale")  # growing strength; `strong` (colour) is opt-in
MAX_SEARCH_EPOCHS = 10  # each candidate trains the frozen phase's schedule compressed into at most this many epochs
FALLBACK = "flip"  # without validation images or a cacheable frozen phase: torchvision's reference recipe


@dataclass
class DetectionTrial:
    augment: str
    val_map: float
    val_map50: float
    epoch: int
    cache_seconds: float = 0.0  # building its feature cache (the winner's is the run's)


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
) -> tuple[Decision, FeatureCache]:
    """Try the candidates; returns the decision and the chosen candidate's training features for
    the run. ``train_cache(name)`` builds them under augmentation ``name``. A candidate's cache is
    closed as soon as it loses, so at most two are held at once; on any failure all are closed."""
    from graft.train.runner import seed_everything

    started = time.perf_counter()
    epochs = min(frozen_phase.epochs, MAX_SEARCH_EPOCHS)
    phase = dataclasses.replace(frozen_phase, epochs=epochs)
    initial = copy.deepcopy(model.state_dict())
    trials: list[DetectionTrial] = []
    best: tuple[DetectionTrial, FeatureCache] | None = None
    trial_task = _ScoredAtTheEnd(task)
    current: FeatureCache | None = None
    try:
        for name in AUTO_AUGMENTS:
            t0 = time.perf_counter()
            current = train_cache(name)
            cache_seconds = time.perf_counter() - t0
            model.load_state_dict(initial)
            trainer = Trainer(
                model, [phase], solver=cfg.solver, train_data=current, val_data=val_cache, device=device,
                freeze_patterns=cfg.model.freeze, lr_rules=cfg.model.lr_mult, task=trial_task,
                data_for_phase=lambda p, c=current: PhaseData(c, val_cache, forward=model, workers=0),
            )
            seed_everything(cfg.solver.seed)
            last = trainer.fit().history[-1]
            if last["val_map"] is None:  # stopped early by solver.max_iter: score where it stopped
                last = {**last, **DetectionTask.validate(trial_task, trainer)}  # the base class's: scores now
            row = DetectionTrial(name, float(last["val_map"]), float(last["val_map50"]), int(last["epoch"]), round(cache_seconds, 2))
            trials.append(row)
            if best is None or best_trial([best[0], row]) is row:
                if best is not None:
                    best[1].close()
                best, current = (row, current), None
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
        model.load_state_dict(initial)  # the run starts where every trial started
    assert best is not None
    decision = Decision(
        augment=best[0].augment, epochs=epochs, trials=trials,  # type: ignore[arg-type]
        note=f"{plural(len(task.val_samples), 'validation image')}, neck and heads trained {plural(epochs, 'epoch')} on cached backbone features",
        seconds=time.perf_counter() - started,
    )
    for line in summary(decision):
        say(line)
    return decision, best[1]
