"""Progress output: a bar on a terminal, one plain line per epoch everywhere else."""

from __future__ import annotations

import io
import re

from graft.configuration import parse_config
from graft.engine.hooks import ProgressHook
from graft.pipeline.train import train
from helpers import make_class_folders, tiny_config


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_with(stream, tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=6)
    cfg = tiny_config(data, model={"name": "test_resnet"}, train={"strategy": "two-phase", "epochs": 1, "fine_tune_epochs": 1})
    train(parse_config(cfg), tmp_path / "run", quiet=True, hooks=[ProgressHook(stream)])
    return stream.getvalue()


def test_plain_output_is_one_line_per_epoch_with_loss_accuracy_and_throughput(tmp_path):
    out = run_with(io.StringIO(), tmp_path)
    lines = out.strip().splitlines()
    assert len(lines) == 2
    pattern = r"epoch +\d+ \[(feature-extract|fine-tune)\] lr \S+ train_loss \d+\.\d+ train_acc \d\.\d+ val_loss \d+\.\d+ val_acc \d\.\d+ \(\d+\.\ds, [\d.]+ img/s\)"
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert "[feature-extract]" in lines[0] and "[fine-tune]" in lines[1]
    assert "\r" not in out  # no bar redraws in logs


def test_a_terminal_gets_a_progress_bar(tmp_path):
    out = run_with(Terminal(), tmp_path)
    assert "\r" in out and "batch" in out and "loss=" in out and "acc=" in out
