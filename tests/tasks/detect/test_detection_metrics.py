"""graft's detection metrics against pycocotools run directly on COCO JSON files."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from graft.tasks.detect.boxes import BoxSample
from graft.tasks.detect.metrics import Prediction, detection_metrics


def _sample(i: int, boxes, labels, crowd=None) -> BoxSample:
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    return BoxSample(Path(f"{i}.png"), str(i), 100, 80, boxes, np.array(labels, np.int64), np.array(crowd or [False] * n, bool), np.zeros(n, bool))


def _fixture():
    rng = np.random.default_rng(0)
    samples, preds = [], []
    for i in range(12):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 60, (n, 2))
        wh = rng.uniform(5, 35, (n, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, [100, 80])], 1)
        labels = rng.integers(0, 3, n)
        crowd = [bool(rng.random() < 0.1) for _ in range(n)]
        samples.append(_sample(i, boxes, labels, crowd))
        # predictions: jittered true boxes (some with wrong labels), plus false positives
        jitter = boxes + rng.normal(0, 3, boxes.shape)
        fp = np.concatenate([rng.uniform(0, 50, (2, 2)), rng.uniform(50, 100, (2, 2))], 1)
        p_boxes = np.concatenate([jitter, fp]) if n else fp
        p_labels = np.concatenate([np.where(rng.random(n) < 0.8, labels, (labels + 1) % 3), rng.integers(0, 3, 2)])
        preds.append(Prediction(p_boxes.astype(np.float32), rng.uniform(0.05, 1, len(p_boxes)).astype(np.float32), p_labels))
    return samples, preds


def test_map_equals_pycocotools_on_json_files(tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    samples, preds = _fixture()
    ours = detection_metrics(samples, preds, ["a", "b", "c"]).metrics
    gt = {
        "images": [{"id": i + 100, "width": 100, "height": 80, "file_name": f"{i}.png"} for i in range(len(samples))],
        "categories": [{"id": cid, "name": n} for cid, n in ((5, "a"), (9, "b"), (11, "c"))],
        "annotations": [],
    }
    ids = {0: 5, 1: 9, 2: 11}
    for i, s in enumerate(samples):
        for b, label, c in zip(s.boxes.tolist(), s.labels.tolist(), s.crowd.tolist()):
            gt["annotations"].append({"id": len(gt["annotations"]) + 7, "image_id": i + 100, "category_id": ids[label], "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": int(c)})
    dets = [{"image_id": i + 100, "category_id": ids[int(label)], "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "score": float(s)} for i, p in enumerate(preds) for b, s, label in zip(p.boxes, p.scores, p.labels)]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ours["map"] == pytest.approx(ev.stats[0], abs=1e-9)
    assert ours["map50"] == pytest.approx(ev.stats[1], abs=1e-9)
    assert ours["map75"] == pytest.approx(ev.stats[2], abs=1e-9)
    assert ours["ar100"] == pytest.approx(ev.stats[8], abs=1e-9)
    assert 0.05 < ours["map"] < 0.95  # the fixture is neither trivial nor hopeless
    for k, name in enumerate("abc"):
        p = ev.eval["precision"][:, :, k, 0, -1]
        assert ours["per_class"][name]["ap"] == pytest.approx(p[p > -1].mean(), abs=1e-9)


def test_perfect_and_empty_predictions() -> None:
    samples = [_sample(0, [[10, 10, 40, 40], [50, 20, 90, 70]], [0, 1]), _sample(1, [], [])]
    perfect = [Prediction(samples[0].boxes, np.array([0.9, 0.8], np.float32), samples[0].labels), Prediction(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))]
    m = detection_metrics(samples, perfect, ["a", "b"]).metrics
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)
    assert m["per_class"]["a"] == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0), "precision": 1.0, "recall": 1.0, "boxes": 1}
    none = [Prediction(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))] * 2
    m = detection_metrics(samples, none, ["a", "b"]).metrics
    assert m["map"] == 0.0 and m["per_class"]["a"]["recall"] == 0.0 and m["per_class"]["a"]["precision"] is None


def test_precision_and_recall_at_the_confidence_threshold() -> None:
    samples = [_sample(0, [[10, 10, 40, 40], [50, 20, 90, 70]], [0, 0])]
    # one hit at 0.9, one false positive at 0.6, the second box found only at 0.2
    pred = [Prediction(np.array([[10, 10, 40, 40], [0, 60, 20, 79], [50, 20, 90, 70]], np.float32), np.array([0.9, 0.6, 0.2], np.float32), np.array([0, 0, 0]))]
    m = detection_metrics(samples, pred, ["a"], conf=0.5).metrics
    assert m["per_class"]["a"]["precision"] == 0.5 and m["per_class"]["a"]["recall"] == 0.5
    m = detection_metrics(samples, pred, ["a"], conf=0.1).metrics
    assert m["per_class"]["a"]["recall"] == 1.0 and m["per_class"]["a"]["precision"] == pytest.approx(2 / 3)
