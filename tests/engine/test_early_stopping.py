"""Early stopping (Keras ``EarlyStopping(patience, restore_best_weights=True)``), per phase, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from graft.configuration import parse_config
from graft.engine import checkpoint
from graft.engine.hooks import EarlyStoppingHook
from graft.pipeline.train import train
from helpers import make_class_folders, tiny_config

EPOCHS = 8


def stopping_config(data: Path, tmp: Path) -> dict:
    # A rate far too high for the head: the validation loss bounces, so a better epoch is followed by worse ones.
    return tiny_config(
        data,
        data={"augment": "none"},
        train={"strategy": "two-phase", "epochs": EPOCHS, "fine_tune_epochs": 3, "head_lr": 3.0, "early_stopping": 2, "cache_dir": str(tmp / "cache")},
        solver={"lr_policy": "fixed", "keep_snapshots": 20},  # the tests read the best epoch's snapshot
    )


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("early")
    data = make_class_folders(tmp / "data")
    cfg = stopping_config(data, tmp)
    result = train(parse_config(cfg), tmp / "run", quiet=True)
    return tmp, cfg, result


def test_a_phase_ends_after_patience_epochs_without_a_better_validation_loss(stopped):
    _, _, result = stopped
    first = [r for r in result.history if r["phase"] == "feature-extract"]
    assert len(first) < EPOCHS  # it stopped early
    losses = [r["val_loss"] for r in first]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert best == len(first) - 3  # the best, then exactly `patience` (2) epochs without improving
    assert all(losses[i] >= losses[best] for i in range(best + 1, len(first)))
    assert [r["best_epoch"] for r in first][-1] == first[best]["epoch"]  # recorded in the history
    summary = result.metrics["early_stopping"]
    assert summary["phases"][0] == {"phase": "feature-extract", "epochs_run": len(first), "stopped_early": True, "best_epoch": first[best]["epoch"], "best": pytest.approx(losses[best]), "restored": True}
    assert [r["phase"] for r in result.history].count("fine-tune") >= 1  # the run went on with the next phase


def test_the_best_weights_are_restored_at_the_end_of_each_phase(stopped):
    tmp, _, result = stopped
    run = tmp / "run"
    phases = result.metrics["early_stopping"]["phases"]
    head_best = checkpoint.load_snapshot(run / "snapshots" / f"epoch-{phases[0]['best_epoch']:04d}")["model"]
    first_fine_tune = next(r["epoch"] for r in result.history if r["phase"] == "fine-tune")
    # The fine-tune phase started from the frozen phase's best head, not its last one: a fine-tune
    # epoch's snapshot is after training, so compare the backbone, untouched before fine-tuning.
    assert phases[1]["phase"] == "fine-tune"
    final = load_file(str(run / "model.safetensors"))
    best_ft = checkpoint.load_snapshot(run / "snapshots" / f"epoch-{phases[1]['best_epoch']:04d}")["model"]
    assert all(torch.equal(final[k], best_ft[k]) for k in final)  # the model is the fine-tune phase's best epoch
    assert first_fine_tune == phases[0]["epochs_run"] + 1
    assert result.metrics["val_loss"] == pytest.approx(phases[1]["best"], rel=1e-4)
    assert head_best.keys() == best_ft.keys()


def test_a_run_resumed_before_the_stop_stops_at_the_same_epoch(stopped, tmp_path):
    tmp, _, result = stopped
    saved = checkpoint.load_snapshot(tmp / "run" / "snapshots" / "epoch-0002")["hooks"]["early_stopping"]
    assert saved["best"] is not None and saved["best_state"]  # the counters and best weights travel in the snapshot
    resumed = train(None, tmp_path / "r", resume=tmp / "run" / "snapshots" / "epoch-0002", quiet=True)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(result.history)
    assert resumed.metrics["early_stopping"] == result.metrics["early_stopping"]
    a, b = load_file(str(tmp / "run" / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Trainer:
    """Just what the hook touches."""

    def __init__(self) -> None:
        self.model = torch.nn.Linear(2, 2)
        self.stopped = False
        self.state = type("S", (), {"epoch": 0, "epoch_in_phase": 0, "phase_stopped": False})()
        self.phase = type("P", (), {"name": "feature-extract"})()

    def phase_done(self) -> bool:
        return self.state.phase_stopped

    def stop_phase(self) -> None:
        self.state.phase_stopped = True


def test_monitoring_accuracy_stops_when_it_does_not_rise_and_restores_the_best():
    hook, trainer = EarlyStoppingHook(patience=1, monitor="val_accuracy"), _Trainer()
    weights = []
    for epoch, acc in enumerate([0.5, 0.8, 0.8], 1):
        with torch.no_grad():
            trainer.model.weight.fill_(epoch)
        weights.append(trainer.model.weight.detach().clone())
        trainer.state.epoch = trainer.state.epoch_in_phase = epoch
        hook.after_epoch(trainer, {"epoch": epoch, "phase": "feature-extract", "val_accuracy": acc})
    assert trainer.state.phase_stopped  # 0.8 again is no improvement
    hook.after_phase(trainer)
    assert torch.equal(trainer.model.weight, weights[1])
    assert hook.phases[0]["best_epoch"] == 2 and hook.best is None  # reset for the next phase


def test_without_validation_images_nothing_stops():
    hook, trainer = EarlyStoppingHook(patience=1), _Trainer()
    for epoch in (1, 2, 3):
        hook.after_epoch(trainer, {"epoch": epoch, "phase": "feature-extract", "val_loss": None})
    assert not trainer.state.phase_stopped


def test_the_report_and_the_console_say_what_early_stopping_did(stopped, capsys):
    """The report's phase table gives the epochs run ("5 of 8"), and its settings say which epoch
    was restored; a run that prints says so too."""
    from graft.pipeline.report import write_report
    from graft.engine.hooks import ProgressHook

    tmp, _, result = stopped
    first = result.metrics["early_stopping"]["phases"][0]
    html = write_report(tmp / "run").read_text()
    assert f"{first['epochs_run']} of {EPOCHS}" in html
    assert f"stopped early after {first['epochs_run']} of {EPOCHS} epochs; restored epoch {first['best_epoch']}" in html
    hook = EarlyStoppingHook(2)
    hook.phases = [first]
    trainer = type("T", (), {"hooks": [hook], "phase": type("P", (), {"name": "feature-extract", "epochs": EPOCHS})()})()
    ProgressHook().after_phase(trainer)
    assert f"early stopping, feature-extract: stopped early after {first['epochs_run']} of {EPOCHS} epochs; restored epoch {first['best_epoch']}" in capsys.readouterr().err


def test_a_detectors_monitor_on_a_classifier_is_refused(tmp_path):
    from graft.errors import ConfigError

    cfg = tiny_config(make_class_folders(tmp_path / "data"), train={"early_stopping": 1, "early_stopping_monitor": "val_map"})
    with pytest.raises(ConfigError, match="val_map is a detector's validation mAP"):
        train(parse_config(cfg), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
