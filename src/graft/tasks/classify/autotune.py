"""Defaults decided from the data, not assumed: ``data.augment: auto`` and ``train.head_lr: auto``.

A flip turns a 2 into another glyph and a rotation turns a 6 into a 9, so no augmentation is right
for every dataset, and neither is one learning rate for every head. Both are decided the same way:
the new head is trained as the frozen-base phase would train it (same solver, seed, epochs), on
the frozen backbone's cached embeddings, for each candidate, and scored on the **validation**
split; test images are never looked at.

The price is bounded: the candidates are no augmentation and a flip, whose two outcomes are each
embedded once (the unflipped one is the run's own), so deciding costs at most one extra backbone
pass over the training images, and none when the flip wins (the run reuses it). Every head rate
of a candidate trains in the same pass over the embeddings (``_train_heads``), well under a
second an epoch. A value the user set is never searched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
import time
from typing import Any

import torch
import torch.nn.functional as F

from graft.configuration import GraftConfig
from graft.console import plural
from graft.data.samples import DatasetSplits
from graft.data.transforms import Preprocessing, augmentation_from_config, eval_transform
from graft.errors import GraftError
from graft.models.classifier import GraftClassifier
from graft.tasks.classify.embeddings import EmbeddingCache, EmbeddingDataset
from graft.engine.loop import Phase, phase_param_groups
from graft.engine.solver import LRSchedule, make_optimizer
from graft.engine.decision import Decision

AUTO_AUGMENTS = ("none", "flip")  # a flip has 2 outcomes: one extra backbone pass, none if it wins. flip-rotate (a view per epoch) and strong: opt in
HEAD_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SEARCH_VIEWS = 2  # augmented views per image for a user-set augmentation with more outcomes than a flip (the run adds the rest)
SEARCH_EPOCHS = 5  # when the run has no frozen-base phase to copy the length from
MAX_SEARCH_EPOCHS = 20  # a longer frozen phase is searched over its first 20 epochs' schedule


def decide(cfg: GraftConfig, model: GraftClassifier, splits: DatasetSplits, pre: Preprocessing, cache: EmbeddingCache, *, device: torch.device, has_head_phase: bool, decoded: Any = None, say: Any = print) -> Decision:
    """Try the candidates for whatever is ``auto`` in ``cfg``; ``model`` is the freshly built
    model (its head's initial weights are every trial's starting point, as in the run)."""
    from graft.tasks.classify.caches import training_views  # caches imports the loop, as we do

    if not splits.val:
        decision = fallback(cfg, "no validation images to decide on: augmentation none, head lr = solver.base_lr")
        say(summary(decision)[0])
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
        trials += _train_heads(cfg, trial_model, initial_head, train, val, aug_name, rates, epochs, device)
    best = _best(trials)
    decision = Decision(
        augment=best.augment if cfg.data.augment == "auto" else None,
        head_lr=best.lr if search_lr else (fixed_lr if cfg.train.head_lr == "auto" else None),
        epochs=epochs,
        trials=trials,
        note=f"{plural(len(splits.val), 'validation image')}, head trained {plural(epochs, 'epoch')} on frozen embeddings",
        seconds=time.perf_counter() - started,
    )
    for line in summary(decision):
        say(line)
    return decision


def _train_heads(cfg: GraftConfig, model: GraftClassifier, initial_head: dict[str, torch.Tensor], train: EmbeddingDataset, val: EmbeddingDataset, aug: str, rates: tuple[float, ...], epochs: int, device: torch.device) -> list[Trial]:
    """The frozen-base phase on embeddings for every head rate at once: one copy of the run's
    initial head per rate, each with its own optimizer and schedule built as the run builds them
    (``phase_param_groups``, ``make_optimizer``, ``LRSchedule``), all fed the same batches in the
    run's order under the same dropout mask. The copies share no parameter, so each learns as it
    would alone, and a batch costs one pass over the data for all of them. Each copy is scored on
    its last epoch, or under early stopping on its best one (its later epochs are ignored)."""
    from graft.data.dataset import EpochBatchSampler
    from graft.engine.hooks import improves
    from graft.engine.device import seed_everything

    seed_everything(cfg.solver.seed)
    original = model.head
    heads, optimizers, schedules = [], [], []
    sampler = EpochBatchSampler(len(train), cfg.solver.batch_size, seed=cfg.solver.seed)
    total = epochs * len(sampler)
    if cfg.solver.max_iter:
        total = min(total, cfg.solver.max_iter)
    try:
        for lr in rates:
            head = copy.deepcopy(original)
            head.load_state_dict(initial_head)
            model.head = head  # parameter names, freezing and lr_mult rules exactly as in the run
            groups = phase_param_groups(model, Phase("feature-extract", epochs, None, lr), cfg.solver, cfg.model.freeze, cfg.model.lr_mult)
            optimizers.append(make_optimizer(groups, cfg.solver))
            schedules.append(LRSchedule(optimizers[-1], cfg.solver, total_iters=total, iters_per_epoch=len(sampler)))
            heads.append(head)
    finally:
        model.head = original
    monitor, patience = cfg.train.early_stopping_monitor, cfg.train.early_stopping
    scored: list[dict[str, Any] | None] = [None] * len(rates)
    waited = [0] * len(rates)
    val_x, val_y = val.embeddings[:, 0].to(device), val.labels.to(device)
    step = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for head in heads:
            head.train()
        for batch in sampler.batches():
            x, y = (t.to(device) for t in train.batch(batch, epoch))
            dropped = heads[0].dropout(x)  # one mask for every copy, as seeded trials would each draw it
            loss = sum(F.cross_entropy(head.fc(dropped).float(), y, label_smoothing=cfg.train.label_smoothing) for head in heads)
            if not torch.isfinite(loss):
                raise GraftError(f"auto: a head rate diverged (loss {loss.item()}); set train.head_lr and solver.base_lr lower")
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer, schedule in zip(optimizers, schedules):
                optimizer.step()
                schedule.step()
            step += 1
            if step >= total:
                break
        with torch.no_grad():
            for k, head in enumerate(heads):
                head.eval()
                logits = head(val_x).float()
                row = {"epoch": epoch + 1, "val_loss": float(F.cross_entropy(logits, val_y)), "val_accuracy": float((logits.argmax(1) == val_y).float().mean())}
                schedules[k].epoch_end(row["val_loss"])
                if not patience:
                    scored[k] = row
                elif waited[k] < patience:  # still running, as the early-stopped phase would be
                    if improves(monitor, row[monitor], None if scored[k] is None else scored[k][monitor]):
                        scored[k], waited[k] = row, 0
                    else:
                        waited[k] += 1
        if step >= total:
            break
    return [Trial(aug, lr, row["val_accuracy"], row["val_loss"], row["epoch"]) for lr, row in zip(rates, scored)]


@dataclass
class Trial:
    augment: str
    lr: float
    val_accuracy: float
    val_loss: float
    epoch: int  # the epoch scored (the last, or the best one under early stopping)


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


def summary(decision: Decision) -> list[str]:
    """Lines for the console: the choice, then each candidate's best validation accuracy."""
    if not decision.trials:
        return [f"auto: {decision.note}"]
    chosen = [f"augmentation {decision.augment}" if decision.augment else None, f"head lr {decision.head_lr:.0e}" if decision.head_lr else None]
    lines = [f"auto: {', '.join(c for c in chosen if c)}, chosen on {decision.note} ({decision.seconds:.1f}s)"]
    for aug in dict.fromkeys(t.augment for t in decision.trials):
        row = [t for t in decision.trials if t.augment == aug]
        best = _best(row)
        rates = "  ".join(f"{t.lr:.0e}: {100 * t.val_accuracy:.1f}%" for t in row)
        lines.append(f"  augment {aug:<11} best val accuracy {100 * best.val_accuracy:5.1f}% (loss {best.val_loss:.3f})" + (f"   [lr {rates}]" if len(row) > 1 else ""))
    return lines
