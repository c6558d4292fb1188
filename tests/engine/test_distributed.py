"""Two processes on the loopback interface (gloo, CPU), started by PyTorch's own launcher, against
one process at the same global batch: the same weights (allclose: the reduction order differs),
the same validation figures, decisions made once, only rank 0 writing, a resume that is bit-exact,
and failures that end every rank with one message.

Each run is a real ``graft`` command in ``torchrun`` (``tests/engine/dist_driver.py`` injects a
fault by name); the single-process references run in this process.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from box_data import three_splits, write_yolo, ring_scenes
from graft.cli import main
from graft.engine import checkpoint
from helpers import make_class_folders, tiny_config

DRIVER = Path(__file__).with_name("dist_driver.py")
LIMIT_S = 120  # a hang fails the test instead of the suite


def torchrun(fault: str, *args: object, nproc: int = 2, launcher: tuple[str, ...] | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``graft ARGS`` in ``nproc`` processes under ``python -m torch.distributed.run``."""
    launch = launcher or ("--standalone", f"--nproc-per-node={nproc}")
    full_env = {**os.environ, "GRAFT_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="graft-test-torchrun-") as logs:  # else a /tmp/torchelastic_* per launch, kept
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch, f"--log-dir={logs}", str(DRIVER), fault, *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT_S, env=full_env)


def one_process(*args: object) -> int:
    """``graft ARGS`` in this process."""
    return main([str(a) for a in args])


def graft_cli(*args: object) -> subprocess.CompletedProcess:
    """The ``graft`` command itself, as a user types it."""
    exe = Path(sys.executable).with_name("graft")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=LIMIT_S, env={**os.environ, "GRAFT_DIST_TIMEOUT": "60"})


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].numel())


def history(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "history.csv").open()))


def iterations(run: Path) -> int:
    return checkpoint.load_snapshot(run / "snapshots" / "last")["loop"]["iteration"]


def same_figures(a: Path, b: Path, columns: tuple[str, ...], tol: float = 1e-5) -> None:
    ha, hb = history(a), history(b)
    assert len(ha) == len(hb)
    for ra, rb in zip(ha, hb):
        for c in columns:
            if ra[c] or rb[c]:
                assert float(ra[c]) == pytest.approx(float(rb[c]), abs=tol), (c, ra, rb)


# ---------------------------------------------------------------------------- classifier

TOL = 1e-4  # float reduction order; a missing all-reduce moves weights by > 1e-2 (see the mutation test)


@pytest.fixture(scope="module")
def cls(tmp_path_factory) -> dict[str, Path]:
    """Class folders with an odd number of validation images, a config whose every random draw is
    a function of (seed, epoch, image) (augmentation included; dropout off, BatchNorm in inference
    mode, as trainable BatchNorm would see each process's part of the batch), and its 1-process run."""
    root = tmp_path_factory.mktemp("dist-cls")
    data = make_class_folders(root / "data", per_class=13)
    cfg = tiny_config(data, model={"dropout": 0.0, "bn_inference": True}, data={"augment": "auto"}, solver={"batch_size": 8})
    del cfg["data"]["dir"]
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    one = root / "one"
    assert one_process("train", "--config", config, "--data", data, "--out", one, "--quiet") == 0
    return {"root": root, "data": data, "config": config, "one": one}


@pytest.fixture(scope="module")
def cls_two(cls) -> Path:
    """The same run in two processes, every file write of rank 1 counted."""
    out = cls["root"] / "two"
    ok(torchrun(f"count-writes={cls['root'] / 'writes'}", "train", "--config", cls["config"], "--data", cls["data"], "--out", out, "--quiet"))
    return out


def test_two_processes_train_a_classifier_as_one_does(cls, cls_two) -> None:
    one, two = cls["one"], cls_two
    assert iterations(one) == iterations(two)
    # auto decided once (rank 0), the same as one process decides; the cached frozen phase, then fine-tuning
    decided = [{k: v for k, v in json.loads((r / "model.json").read_text())["decided"].items() if k != "seconds"} for r in (one, two)]
    assert decided[0] == decided[1]
    assert [r["phase"] for r in history(two)] == ["feature-extract"] * 2 + ["fine-tune"] * 2
    assert max_difference(one, two) < TOL
    same_figures(one, two, ("train_loss", "train_accuracy", "val_loss", "val_accuracy"))


def test_the_run_folder_is_laid_out_as_one_process_writes_it(cls, cls_two) -> None:
    def files(run: Path) -> list[str]:
        return sorted(str(p.relative_to(run)) for p in run.rglob("*"))

    assert files(cls["one"]) == files(cls_two)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (cls["one"], cls_two))
    assert m1["counts"] == m2["counts"] and sum(m1["counts"]["val"].values()) % 2 == 1  # an odd split: one shard is shorter
    assert m1["val_accuracy"] == pytest.approx(m2["val_accuracy"]) and m1["val_loss"] == pytest.approx(m2["val_loss"], abs=1e-5)


def test_only_rank_0_writes(cls, cls_two) -> None:
    assert (cls["root"] / "writes.1").read_text() == ""
    assert (cls["root"] / "writes.0").read_text() == ""  # the counter counts rank 1's writes only


def test_the_equality_test_catches_a_missing_gradient_all_reduce(cls) -> None:
    """Mutation: nothing is wrapped, so each rank steps on its half of every batch alone."""
    out = cls["root"] / "mutant"
    ok(torchrun("no-allreduce", "train", "--config", cls["config"], "--data", cls["data"], "--out", out, "--quiet"))
    assert max_difference(cls["one"], out) > 100 * TOL


def test_the_image_path_and_early_stopping_agree_too(cls) -> None:
    """No embedding cache (the frozen phase runs the backbone on images) and early stopping,
    whose stop and restore follow rank 0's validation row on every rank."""
    extra = ["--set", "train.embedding_cache=false", "--set", "train.prefix_cache=false", "--early-stopping", "1", "--augment", "flip"]
    one, two = cls["root"] / "img-one", cls["root"] / "img-two"
    assert one_process("train", "--config", cls["config"], "--data", cls["data"], "--out", one, "--quiet", *extra) == 0
    ok(torchrun("none", "train", "--config", cls["config"], "--data", cls["data"], "--out", two, "--quiet", *extra))
    assert json.loads((one / "model.json").read_text())["early_stopping"] == json.loads((two / "model.json").read_text())["early_stopping"]
    assert max_difference(one, two) < TOL


def test_a_run_stopped_mid_epoch_resumes_bit_for_bit(cls, cls_two) -> None:
    out = cls["root"] / "stopped"
    proc = torchrun("stop-at=6", "train", "--config", cls["config"], "--data", cls["data"], "--out", out, "--quiet")
    assert proc.returncode != 0 and proc.stderr.count("interrupted: a resumable snapshot") == 1, proc.stderr[-2000:]
    last = checkpoint.load_snapshot(out / "snapshots" / "last")
    assert last["loop"]["batch"] > 0 and last["world"] == 2 and len(last["rng_ranks"]) == 2  # mid-epoch, each rank's RNG
    ok(torchrun("none", "train", "--resume", out / "snapshots" / "last", "--quiet"))
    a, b = weights(cls_two), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    same_figures(cls_two, out, ("train_loss", "train_accuracy", "val_loss"), tol=1e-12)


def test_a_torchrun_restart_continues_from_the_newest_snapshot(cls, cls_two) -> None:
    """Rank 1 is killed (SIGKILL) in the second epoch; ``--max-restarts 1`` starts both ranks
    again, the command continues from ``snapshots/last`` (epoch 1) and ends where the run that was
    never killed ended, bit for bit."""
    out = cls["root"] / "restarted"
    proc = torchrun("kill-rank1-at=6", "train", "--config", cls["config"], "--data", cls["data"], "--out", out, "--quiet",
                    launcher=("--standalone", "--nproc-per-node=2", "--max-restarts=1"))
    ok(proc)
    a, b = weights(cls_two), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(history(out)) == len(history(cls_two))


def test_resuming_with_another_number_of_processes_says_it_is_not_bit_exact(cls, cls_two, tmp_path) -> None:
    proc = ok(graft_cli("train", "--resume", cls_two / "snapshots" / "epoch-0002", "--out", tmp_path / "one"))
    assert "snapshot was made by 2 processes, this run has 1" in proc.stderr
    assert max_difference(cls_two, tmp_path / "one") < 1e-2  # the same data order from the same batch


def test_graft_train_devices_starts_the_processes_itself(cls, tmp_path) -> None:
    proc = ok(graft_cli("train", "--config", cls["config"], "--data", cls["data"], "--out", tmp_path / "run", "--devices", "2", "--epochs", "1", "--fine-tune-epochs", "0"))
    assert "x 2 processes (gloo)" in proc.stderr and proc.stderr.count("done: val accuracy") == 1
    # a mistake every rank meets is told once, with graft's exit status
    proc = graft_cli("train", "--config", cls["config"], "--data", tmp_path / "missing", "--out", tmp_path / "bad", "--devices", "2")
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr


def test_ctrl_c_stops_every_rank_after_the_same_step_and_writes_last(cls, tmp_path) -> None:
    """A real Ctrl-C: SIGINT to the terminal's process group (the launcher and both ranks), which
    torchrun also passes on to the ranks as SIGTERM."""
    out = tmp_path / "run"
    exe = Path(sys.executable).with_name("graft")
    cmd = [str(exe), "train", "--config", str(cls["config"]), "--data", str(cls["data"]), "--out", str(out), "--devices", "2", "--epochs", "200", "--fine-tune-epochs", "0", "--augment", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env={**os.environ, "GRAFT_DIST_TIMEOUT": "60"})
    deadline = time.monotonic() + LIMIT_S
    while not any(int(p.name[6:]) >= 2 for p in (out / "snapshots").glob("epoch-0*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=LIMIT_S)
    assert proc.returncode == 130, err[-3000:]
    assert err.count("interrupted: a resumable snapshot is at") == 1, err[-3000:]
    last = checkpoint.load_snapshot(out / "snapshots" / "last")
    assert last["world"] == 2 and last["loop"]["epoch"] >= 2


def test_an_error_on_one_rank_ends_every_rank_with_one_message(cls, tmp_path) -> None:
    started = time.perf_counter()
    proc = torchrun("fail-rank1", "train", "--config", cls["config"], "--data", cls["data"], "--out", tmp_path / "run", "--quiet")
    assert proc.returncode != 0
    assert proc.stderr.count("error: injected failure on rank 1") == 1, proc.stderr[-3000:]
    assert time.perf_counter() - started < 60
    assert (tmp_path / "run" / "snapshots" / "last").is_file()  # the epoch before still resumes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost(cls, tmp_path) -> None:
    """``--nnodes 2``: two launchers (one process each) meet at one rendezvous endpoint."""
    port = _free_port()
    out = tmp_path / "nodes"
    cmd = lambda node: [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",  # noqa: E731
                        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=graft-test", f"--log-dir={tmp_path / f'logs-{node}'}", str(DRIVER), "none",
                        "train", "--config", str(cls["config"]), "--data", str(cls["data"]), "--out", str(out), "--quiet"]
    env = {**os.environ, "GRAFT_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd(n), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for n in (0, 1)]
    results = [(p.wait(timeout=LIMIT_S), p.stderr.read()) for p in nodes]
    assert all(code == 0 for code, _ in results), results
    assert max_difference(cls["one"], out) < TOL


def test_classifier_expansion_in_two_processes(cls) -> None:
    new = make_class_folders(cls["root"] / "new", classes={"purple": (128, 0, 128), "cyan": (0, 200, 200)}, seed=3)
    for mode in ("fine-tune",):  # its new rows train on cached embeddings first, then the backbone's top on images
        one, two = cls["root"] / f"x1-{mode}", cls["root"] / f"x2-{mode}"
        args = ["expand", cls["one"], "--data", new, "--mode", mode, "--epochs", "3", "--fine-tune-epochs", "2", "--batch-size", "11", "--quiet"]
        assert one_process(*args, "--out", one) == 0
        ok(torchrun("none", *args, "--out", two))
        assert iterations(one) == iterations(two)
        assert max_difference(one, two) < TOL, mode
        c1, c2 = (json.loads((r / "expand_metrics.json").read_text())["calibration"] for r in (one, two))
        assert c1["shift"] == pytest.approx(c2["shift"], abs=1e-4) and c1["scale"] == pytest.approx(c2["scale"])


# ---------------------------------------------------------------------------- detector

DET = ["--model", "fcos", "--set", "model.name=test_efficientnet", "--weights", "none", "--img-size", "64", "--batch-size", "4", "--augment", "none",
       "--set", "model.bn_inference=true", "--set", "data.num_workers=0", "--set", "train.device=cpu", "--set", "solver.base_lr=0.001", "--quiet"]


@pytest.fixture(scope="module")
def det(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist-det")
    data = write_yolo(root / "boxes", three_splits(n_train=12, n_val=5, n_test=4))
    one = root / "one"
    assert one_process("train", "--data", data, "--out", one, "--epochs", "1", "--fine-tune-epochs", "1", *DET) == 0
    return {"root": root, "data": data, "one": one}


def test_two_processes_train_a_detector_as_one_does(det) -> None:
    """The cached frozen phase, then fine-tuning; FCOS's loss normalised by the global batch's
    foreground count; validation mAP on 5 images (an odd split), gathered by image."""
    two = det["root"] / "two"
    ok(torchrun("none", "train", "--data", det["data"], "--out", two, "--epochs", "1", "--fine-tune-epochs", "1", *DET))
    assert [r["phase"] for r in history(two)] == ["feature-extract", "fine-tune"]
    assert max_difference(det["one"], two) < 1e-3
    same_figures(det["one"], two, ("train_loss", "train_loss_classification", "val_map", "val_map50"))


def test_detector_expansion_in_two_processes(det) -> None:
    rings = write_yolo(det["root"] / "rings", {"train": ring_scenes(8, 5), "val": ring_scenes(3, 6)}, names=["ring"])
    for mode in ("fine-tune",):  # the new block on cached features first, then the backbone's top with distillation
        one, two = det["root"] / f"x1-{mode}", det["root"] / f"x2-{mode}"
        args = ["expand", det["one"], "--data", rings, "--mode", mode, "--epochs", "2", "--fine-tune-epochs", "1", "--set", "expand.pseudo_labels=false", "--quiet"]
        assert one_process(*args, "--out", one) == 0
        ok(torchrun("none", *args, "--out", two))
        assert iterations(one) == iterations(two)
        assert max_difference(one, two) < 1e-3, mode
