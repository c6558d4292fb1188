"""Defaults decided from the data, not assumed: ``data.augment: auto`` and ``train.head_lr: auto``.

A flip turns a 2 into another glyph and a rotation turns a 6 into a 9, so no augmentation is right
for every dataset, and neither is one learning rate for every head. Both are decided the same way:
the new head is trained, exactly as the frozen-base phase would train it (same solver, seed,
epochs), on the frozen backbone's cached embeddings for each candidate, and scored on the
**validation** split; test images are never looked at. An augmented candidate costs
``SEARCH_VIEWS`` augmented views of each training image once (they are stored: the run reuses them
and computes only the views it has beyond those), and each learning rate about a second of head
training. A value the user set is never searched.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from graft.configuration import GraftConfig
from graft.console import plural
from graft.data.folder import DatasetSplits
from graft.data.transforms import Preprocessing, augmentation_from_config, eval_transform
from graft.models.classifier import GraftClassifier
from graft.train.embeddings import EmbeddingCache, EmbeddingDataset
from graft.train.loop import Phase, PhaseData, Trainer
from graft.train.task import ClassificationTask

AUTO_AUGMENTS = ("none", "flip", "flip-rotate")  # in growing strength; `strong` crops need full-resolution decoding per view: opt in
HEAD_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SEARCH_VIEWS = 2  # augmented views per training image for an augmented candidate (the run adds the rest)
SEARCH_EPOCHS = 5  # when the run has no frozen-base phase to copy the length from
MAX_SEARCH_EPOCHS = 20  # a longer frozen phase is searched over its first 20 epochs' schedule (each trial costs its epochs)


@dataclass
class Trial:
    augment: str
    lr: float
    val_accuracy: float
    val_loss: float
    epoch: int  # the epoch scored (the last, or the best one under early stopping)


@dataclass
class Decision:
    """What ``auto`` became, and the validation figures it was decided on."""

    augment: str | None = None  # None: the user set data.augment
    head_lr: float | None = None  # None: the user set train.head_lr (or there is no head phase)
    epochs: int = 0
    trials: list[Trial] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0

    def apply(self, cfg: GraftConfig) -> GraftConfig:
        """The config with the decided values in place of ``auto``: saved as the run's config, so
        a resumed or expanded run uses them without deciding again."""
        out = cfg.model_copy(deep=True)
        if self.augment is not None:
            out.data.augment = self.augment
        if self.head_lr is not None:
            out.train.head_lr = self.head_lr
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"augment": self.augment, "head_lr": self.head_lr, "epochs": self.epochs, "note": self.note, "seconds": round(self.seconds, 2), "trials": [asdict(t) for t in self.trials]}

    def summary(self) -> list[str]:
        """Lines for the console: the choice, then each candidate's best validation figure."""
        if not self.trials:
            return [f"auto: {self.note}"]
        chosen = [f"augmentation {self.augment}" if self.augment else None, f"head lr {self.head_lr:.0e}" if self.head_lr else None]
        lines = [f"auto: {', '.join(c for c in chosen if c)}, chosen on {self.note} ({self.seconds:.1f}s)"]
        for aug in dict.fromkeys(t.augment for t in self.trials):
            row = [t for t in self.trials if t.augment == aug]
            best = _best(row)
            rates = "  ".join(f"{t.lr:.0e}: {100 * t.val_accuracy:.1f}%" for t in row)
            lines.append(f"  augment {aug:<11} best val accuracy {100 * best.val_accuracy:5.1f}% (loss {best.val_loss:.3f})" + (f"   [lr {rates}]" if len(row) > 1 else ""))
        return lines


def wants_decision(cfg: GraftConfig) -> bool:
    return cfg.data.augment == "auto" or cfg.train.head_lr == "auto"


def _best(trials: list[Trial]) -> Trial:
    """Highest validation accuracy; equal accuracy goes to the lower validation loss, then to the
    earlier candidate (less augmentation, lower rate)."""
    return max(trials, key=lambda t: (round(t.val_accuracy, 9), -t.val_loss))  # max keeps the first of equals


def fallback(cfg: GraftConfig, note: str) -> Decision:
    """Without validation images nothing can be compared: no augmentation (it never turns one
    class into another) and ``solver.base_lr``."""
    return Decision(
        augment="none" if cfg.data.augment == "auto" else None,
        head_lr=cfg.solver.base_lr if cfg.train.head_lr == "auto" else None,
        note=note,
    )


def decide(cfg: GraftConfig, model: GraftClassifier, splits: DatasetSplits, pre: Preprocessing, cache: EmbeddingCache, *, device: torch.device, has_head_phase: bool, decoded: Any = None, say: Any = print) -> Decision:
    """Try the candidates for whatever is ``auto`` in ``cfg``; ``model`` is the freshly built
    model (its head's initial weights are every trial's starting point, as in the run)."""
    from graft.train.caches import training_views  # caches imports the loop, as we do

    if not splits.val:
        decision = fallback(cfg, "no validation images to decide on: augmentation none, head lr = solver.base_lr")
        say(decision.summary()[0])
        return decision
    started = time.perf_counter()
    augments = AUTO_AUGMENTS if cfg.data.augment == "auto" else (cfg.data.augment,)
    search_lr = cfg.train.head_lr == "auto" and has_head_phase
    fixed_lr = cfg.train.head_lr if isinstance(cfg.train.head_lr, float) else cfg.solver.base_lr
    if cfg.data.augment != "auto" and not search_lr:  # a head rate with no head phase to use it: nothing to try
        return Decision(head_lr=fixed_lr if cfg.train.head_lr == "auto" else None, note="no frozen-base phase, so no head rate to choose: nothing searched")
    rates = HEAD_LRS if search_lr else (fixed_lr,)
    epochs = min(cfg.train.epochs, MAX_SEARCH_EPOCHS) if cfg.train.epochs > 0 else SEARCH_EPOCHS
    val = EmbeddingDataset(cache.embed(splits.val, eval_transform(pre)), [s.label for s in splits.val])
    labels = [s.label for s in splits.train]
    trial_model = copy.deepcopy(model).to(device)
    initial_head = copy.deepcopy(trial_model.head.state_dict())
    trials: list[Trial] = []
    for aug_name in augments:
        aug = augmentation_from_config(cfg.data, aug_name)
        views = training_views(cache, splits.train, pre, aug, cfg, min(epochs, SEARCH_VIEWS), decoded=decoded)
        train = EmbeddingDataset(views, labels, seed=cfg.solver.seed)
        row = [_trial(cfg, trial_model, initial_head, train, val, aug_name, lr, epochs, device) for lr in rates]
        # The candidates grow stronger (none, flip, flip-rotate): once more augmentation is no
        # better than less, the next step is not tried (it costs its views' embeddings).
        improved = not trials or _best(trials + row) in row
        trials += row
        if not improved:
            break
    best = _best(trials)
    decision = Decision(
        augment=best.augment if cfg.data.augment == "auto" else None,
        head_lr=best.lr if search_lr else (fixed_lr if cfg.train.head_lr == "auto" else None),
        epochs=epochs,
        trials=trials,
        note=f"{plural(len(splits.val), 'validation image')}, head trained {plural(epochs, 'epoch')} on frozen embeddings",
        seconds=time.perf_counter() - started,
    )
    for line in decision.summary():
        say(line)
    return decision


def _trial(cfg: GraftConfig, model: GraftClassifier, initial_head: dict[str, torch.Tensor], train: EmbeddingDataset, val: EmbeddingDataset, aug: str, lr: float, epochs: int, device: torch.device) -> Trial:
    """The frozen-base phase on embeddings, through the run's own loop, from the run's head."""
    from graft.train.hooks import EarlyStoppingHook
    from graft.train.runner import seed_everything

    model.head.load_state_dict(initial_head)
    hooks = [EarlyStoppingHook(cfg.train.early_stopping, cfg.train.early_stopping_monitor)] if cfg.train.early_stopping else []
    trainer = Trainer(
        model,
        [Phase("feature-extract", epochs, None, lr)],
        solver=cfg.solver,
        train_data=train,
        val_data=val,
        device=device,
        freeze_patterns=cfg.model.freeze,
        lr_rules=cfg.model.lr_mult,
        task=ClassificationTask(cfg.train.label_smoothing),
        data_for_phase=lambda phase: PhaseData(train, val, forward=model.head, workers=0),
        hooks=hooks,
    )
    seed_everything(cfg.solver.seed)
    history = trainer.fit().history
    scored = history[-1]
    if hooks and hooks[0].best is not None:
        scored = history[hooks[0].best["epoch"] - 1]
    return Trial(aug, lr, float(scored["val_accuracy"]), float(scored["val_loss"]), int(scored["epoch"]))
