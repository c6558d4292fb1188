"""graft export, driven through the CLI: a classifier and an FCOS detector go to ONNX and
TorchScript (float32 and float16), each checked against its run on the run's validation images;
the export predicts as the run does, with torch unavailable; bad requests and a disagreeing export
leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest

from box_data import three_splits, write_yolo
from graft.cli import main
from helpers import make_class_folders, run_cli

COMMON = ["--weights", "none", "--augment", "none", "--set", "data.num_workers=0", "--set", "train.device=cpu", "--quiet"]



@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    data = make_class_folders(root / "colours")
    boxes = write_yolo(root / "boxes", three_splits(n_train=12, n_val=4, n_test=4))
    out = {"classifier": root / "cls", "detector": root / "det", "images": data / "red", "boxes": boxes / "images" / "test"}
    assert main(["train", "--data", str(data), "--out", str(out["classifier"]), "--model", "test_efficientnet", "--img-size", "32", "--batch-size", "8",
                 "--epochs", "2", "--fine-tune-epochs", "1", "--set", "train.head_lr=0.01", *COMMON]) == 0
    assert main(["train", "--data", str(boxes), "--out", str(out["detector"]), "--model", "fcos", "--set", "model.name=test_efficientnet", "--img-size", "64",
                 "--batch-size", "4", "--epochs", "6", "--fine-tune-epochs", "0", "--set", "solver.base_lr=0.01", *COMMON]) == 0
    return out


def predict_without_torch(*args, torch_allowed: bool = False) -> list:
    """`graft predict` in a fresh interpreter in which `import torch` fails (or, with
    ``torch_allowed``, in which nothing but graft's CLI was imported)."""
    block = "" if torch_allowed else "sys.modules['torch'] = None; "
    code = f"import sys; {block}from graft.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "predict", *map(str, args), "--format", "json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_classifier_exports_to_onnx_with_its_sidecar_and_predicts_as_the_run(runs, capsys) -> None:
    run = runs["classifier"]
    code, out, err = run_cli(capsys, "export", run)
    assert code == 0, err
    model, sidecar = run / "export" / "model.onnx", run / "export" / "model.onnx.json"
    assert json.loads(out)["model"] == str(model) and model.is_file() and "parity: 6 images" in err
    meta = json.loads(sidecar.read_text())
    info = json.loads((run / "model.json").read_text())
    assert meta["classes"] == info["classes"] == ["blue", "green", "red"] and meta["task"] == "classify" and meta["graft_version"]
    pre = meta["preprocessing"]
    assert {k: pre[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")} == {k: info["preprocessing"][k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")}
    assert meta["input"]["shape"] == ["batch", 3, 32, 32] and meta["outputs"][0]["name"] == "logits" and meta["opset"] == 17
    parity = meta["parity"]
    assert parity["passed"] and parity["images"] == 6 and parity["top1_agree"] == 6 and parity["max_abs_logit_diff"] < 1e-4
    assert all("/val/" in p or Path(p).exists() for p in parity["image_paths"])
    # the export, run with onnxruntime alone, gives the run's answers
    ours = {p["path"]: p for p in json.loads(run_cli(capsys, "predict", run, runs["images"], "--top-k", "3", "--format", "json")[1])}
    theirs = predict_without_torch(model, runs["images"], "--top-k", "3")
    assert len(theirs) == len(ours) == 12
    for p in theirs:
        mine = ours[p["path"]]["predictions"]
        assert [x["class"] for x in p["predictions"]] == [x["class"] for x in mine]
        assert np.allclose([x["probability"] for x in p["predictions"]], [x["probability"] for x in mine], atol=1e-5)


def test_out_may_be_a_folder(runs, tmp_path, capsys) -> None:
    """`--out DIR/` (or an existing folder) puts the export in it under its default name, instead
    of a file named like the folder (or a failed rename onto the folder)."""
    (tmp_path / "there").mkdir()
    for out, where in ((tmp_path / "there", tmp_path / "there"), (f"{tmp_path / 'new'}/", tmp_path / "new")):
        code, _, err = run_cli(capsys, "export", runs["classifier"], "--out", out)
        assert code == 0, err
        assert sorted(p.name for p in where.iterdir()) == ["model.onnx", "model.onnx.json"]


def test_classifier_torchscript_and_float16(runs, capsys) -> None:
    run = runs["classifier"]
    for args, name in ((["--format", "torchscript"], "model.pt"), (["--half"], "model-fp16.onnx")):
        code, out, err = run_cli(capsys, "export", run, *args)
        assert code == 0, err
        meta = json.loads((run / "export" / f"{name}.json").read_text())
        assert meta["parity"]["passed"] and meta["parity"]["top1_agree"] == 6
    assert meta["half"] and meta["input"]["dtype"] == "float16" and meta["parity"]["tolerance"] > 1e-3  # float16 is judged by a float16 tolerance
    theirs = predict_without_torch(run / "export" / "model-fp16.onnx", runs["images"])
    assert all(p["predictions"] and p["error"] is None for p in theirs)


def test_a_detector_exports_and_its_boxes_match_the_run(runs, capsys) -> None:
    run = runs["detector"]
    code, out, err = run_cli(capsys, "export", run)
    assert code == 0, err
    meta = json.loads((run / "export" / "model.onnx.json").read_text())
    assert meta["task"] == "detect" and [o["name"] for o in meta["outputs"]] == ["boxes", "scores", "labels"] and meta["detector"]["box_format"] == "xyxy"
    assert meta["preprocessing"]["input_size"] == 64 and meta["preprocessing"]["pad_value"] == 114
    parity = meta["parity"]
    assert parity["passed"] and parity["detections_compared"] > 10 and parity["unmatched"] == 0 and parity["min_iou"] >= 0.99
    # predictions of the export (no torch) against the run's own, box for box
    ours = json.loads(run_cli(capsys, "predict", run, runs["boxes"], "--conf", "0.05", "--format", "json")[1])
    theirs = predict_without_torch(run / "export" / "model.onnx", runs["boxes"], "--conf", "0.06")
    ours_by_path = {p["path"]: [b for b in p["boxes"] if b["score"] >= 0.06] for p in ours}
    assert sum(len(p["boxes"]) for p in theirs) > 0
    for p in theirs:
        mine = ours_by_path[p["path"]]
        assert [b["label"] for b in p["boxes"]] == [b["label"] for b in mine]
        assert np.allclose([b["box"] for b in p["boxes"]], [b["box"] for b in mine], atol=0.02) and np.allclose([b["score"] for b in p["boxes"]], [b["score"] for b in mine], atol=1e-5)


def test_a_detector_exports_to_torchscript_in_half_precision(runs, capsys) -> None:
    """The issue's `graft export runs/det --format torchscript --half`: backbone and neck in float16,
    heads and NMS in float32 (torchvision's CPU NMS has no float16 kernel)."""
    code, out, err = run_cli(capsys, "export", runs["detector"], "--format", "torchscript", "--half")
    assert code == 0, err
    meta = json.loads((runs["detector"] / "export" / "model-fp16.pt.json").read_text())
    assert meta["parity"]["passed"] and meta["parity"]["detections_compared"] > 10 and meta["precision"].startswith("backbone and neck float16")
    code, out, err = run_cli(capsys, "predict", runs["detector"] / "export" / "model-fp16.pt", runs["boxes"], "--conf", "0.05", "--format", "json")
    assert code == 0, err
    # in a fresh process too: the TorchScript calls torchvision's NMS, which loading must register
    theirs = predict_without_torch(runs["detector"] / "export" / "model-fp16.pt", runs["boxes"], "--conf", "0.05", torch_allowed=True)
    assert [p["boxes"] for p in theirs] == [p["boxes"] for p in json.loads(out)] and sum(len(p["boxes"]) for p in theirs) > 0


def test_bad_requests_get_clear_errors_and_leave_nothing_behind(runs, tmp_path, capsys, monkeypatch) -> None:
    code, _, err = run_cli(capsys, "export", tmp_path)
    assert code == 2 and "is not a finished graft run" in err
    with pytest.raises(SystemExit) as stop:
        main(["export", str(runs["classifier"]), "--format", "tflite"])
    assert stop.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["export", str(runs["classifier"]), "--opset", "5"])
    assert stop.value.code == 2 and "graft exports to opsets 11 to 20, got 5" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "export", runs["classifier"], "--out", blocker / "model.onnx")
    assert code == 2 and "cannot write the export to" in err and str(blocker) in err
    code, _, err = run_cli(capsys, "export", runs["classifier"], "--images", tmp_path / "empty")
    assert code == 2 and f"--images {tmp_path / 'empty'} does not exist" in err
    (tmp_path / "empty" / "a").mkdir(parents=True)
    code, _, err = run_cli(capsys, "export", runs["classifier"], "--images", tmp_path / "empty")
    assert code == 2 and "holds no readable image" in err and "validation images are gone" not in err
    code, _, err = run_cli(capsys, "export", runs["classifier"], "--format", "torchscript", "--out", tmp_path / "model.onnx")
    assert code == 2 and "names a .onnx file, but the format is torchscript" in err
    code, _, err = run_cli(capsys, "predict", tmp_path / "nothing.onnx", runs["images"])
    assert code == 2 and "no such exported model" in err
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(b"an onnx file without its sidecar")
    code, _, err = run_cli(capsys, "predict", lone, runs["images"])
    assert code == 2 and "has no sidecar lone.onnx.json" in err


def test_an_export_that_disagrees_with_the_run_is_not_kept(runs, tmp_path, capsys, monkeypatch) -> None:
    """A mutation of the exported path (its preprocessing off by a little) must fail parity, and
    neither the model file nor its sidecar may be left, nor an earlier good export replaced."""
    import graft.tasks.classify.export as export

    target = tmp_path / "out" / "model.onnx"
    assert run_cli(capsys, "export", runs["classifier"], "--out", target)[0] == 0
    good = target.read_bytes()
    real = export.classifier_input
    monkeypatch.setattr(export, "classifier_input", lambda image, pre: real(image, pre) + 0.05)
    code, _, err = run_cli(capsys, "export", runs["classifier"], "--out", target)
    assert code == 2 and "disagrees with the run, so it was not kept" in err and "max |logit difference|" in err
    assert target.read_bytes() == good and sorted(p.name for p in target.parent.iterdir()) == ["model.onnx", "model.onnx.json"]
    code, _, err = run_cli(capsys, "export", runs["classifier"], "--out", tmp_path / "fresh" / "model.onnx")
    assert code == 2 and list((tmp_path / "fresh").iterdir()) == []


def test_a_detector_export_that_disagrees_is_not_kept(runs, tmp_path, capsys, monkeypatch) -> None:
    """Images fed to the export one pixel off (a wrong padding or resize in the sidecar would do
    this): its boxes move a little everywhere, which must fail, not pass as NMS edge cases."""
    import graft.tasks.detect.export as export

    real = export.detector_input
    monkeypatch.setattr(export, "detector_input", lambda image, pre: (lambda x, s: (np.roll(x, 1, axis=2), s))(*real(image, pre)))
    target = tmp_path / "det.onnx"
    code, _, err = run_cli(capsys, "export", runs["detector"], "--out", target)
    assert code == 2 and "disagrees with the run, so it was not kept" in err and "unmatched" in err
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_failed_onnx_export_is_one_message_not_the_exporters_graph_dump(runs, tmp_path, capfd, monkeypatch) -> None:
    """torch's ONNX exporter prints the whole IR graph to the process's stdout (from C++) when an
    op cannot be exported; the user gets graft's one-line error, and the dump only with --debug."""
    import graft.tasks.detect.export as export

    monkeypatch.setattr(export._Boxes, "forward", lambda self, image: (torch.argsort(image.flatten(), stable=True),) * 3)  # no ONNX symbolic
    code, out, err = run_cli(capfd, "export", runs["detector"], "--out", tmp_path / "det.onnx")
    assert code == 2 and "to onnx failed" in err and "Torch IR graph" not in out + err and len((out + err).splitlines()) <= 3
    assert list(tmp_path.iterdir()) == []
    from graft.errors import ExportError

    with pytest.raises(ExportError) as raised:  # --debug: the traceback, which shows the note
        run_cli(capfd, "export", runs["detector"], "--out", tmp_path / "det.onnx", "--debug")
    assert any("Torch IR graph" in note for note in getattr(raised.value.__cause__, "__notes__", []))
