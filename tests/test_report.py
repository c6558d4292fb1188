import math

import matplotlib.axes
import matplotlib.colors
import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from graft.report import figures as report
from graft.report.figures import (
    HISTORY_COLUMNS,
    phase_changes,
    plot_learning_curves,
    read_history_csv,
    write_history_csv,
)
from graft.tasks.classify import plots
from graft.tasks.classify.plots import plot_confusion_matrix, plot_predictions


def _rows(phases):
    rows = []
    for i, phase in enumerate(phases, start=1):
        rows.append(
            {
                "epoch": i,
                "phase": phase,
                "lr": 1e-3 / i,
                "train_loss": 1.0 / i,
                "train_accuracy": 1 - 1 / (i + 1),
                "val_loss": None if i == 2 else 1.1 / i,
                "val_accuracy": None if i == 2 else 1 - 1.2 / (i + 1),
                "seconds": 2.5 * i,
            }
        )
    return rows


@pytest.fixture
def spy(monkeypatch):
    """spy(cls, name) -> list of (args, kwargs) of every call to cls.name (still delegated)."""

    def install(cls, name):
        calls = []
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            calls.append((args, kwargs))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)
        return calls

    return install


def _png(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.size


def _no_temp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []


# ----------------------------------------------------------------------------- history CSV


def test_history_csv_round_trip(tmp_path):
    rows = _rows(["feature-extract", "feature-extract", "fine-tune"])
    rows[0]["grad_norm"] = np.float32(0.5)  # extra column, numpy scalar
    rows[2]["note"] = "resumed"  # extra column seen later
    rows[1]["lr"] = 0.1 + 0.2  # float that needs full precision
    path = write_history_csv(rows, tmp_path / "sub" / "history.csv")
    assert path == tmp_path / "sub" / "history.csv"
    header = path.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header == HISTORY_COLUMNS + ["grad_norm", "note"]

    back = read_history_csv(path)
    assert len(back) == 3
    assert back[0]["epoch"] == 1 and type(back[0]["epoch"]) is int
    assert back[0]["phase"] == "feature-extract"
    assert back[1]["lr"] == 0.1 + 0.2  # bit-exact
    assert type(back[0]["train_loss"]) is float and back[0]["train_loss"] == 1.0  # 1.0 stays float
    assert back[1]["val_loss"] is None and back[1]["val_accuracy"] is None
    assert back[0]["grad_norm"] == 0.5 and back[1]["grad_norm"] is None
    assert back[2]["note"] == "resumed" and back[0]["note"] is None
    for original, parsed in zip(_rows(["a", "a", "b"]), back):
        for key in ("train_loss", "train_accuracy", "seconds"):
            assert parsed[key] == original[key]
    assert _no_temp_files(path.parent)


def test_history_csv_empty(tmp_path):
    path = write_history_csv([], tmp_path / "h.csv")
    assert path.read_text(encoding="utf-8").strip() == ",".join(HISTORY_COLUMNS)
    assert read_history_csv(path) == []


# ----------------------------------------------------------------------------- learning curves


def test_phase_changes():
    assert phase_changes(_rows(["feature-extract"] * 3 + ["fine-tune"] * 2)) == [4]
    assert phase_changes(_rows(["fine-tune"] * 4)) == []
    assert phase_changes(_rows(["fine-tune"])) == []
    assert phase_changes([]) == []
    assert phase_changes(_rows(["a", "b", "b", "c"])) == [2, 4]
    assert phase_changes(_rows(["a", None, "a", "b"])) == [4]  # missing phase is not a change


def test_learning_curves_marker_only_on_phase_change(tmp_path, spy):
    vlines = spy(matplotlib.axes.Axes, "axvline")
    texts = spy(matplotlib.axes.Axes, "text")

    path = plot_learning_curves(_rows(["feature-extract"] * 3 + ["fine-tune"] * 3), tmp_path / "lc.png",
                                title="run")
    width, height = _png(path)
    assert 700 < width < 2000 and 250 < height < 1000
    assert len(vlines) == 2  # one per panel
    assert all(args[0] == pytest.approx(3.5) for args, _ in vlines)  # between epoch 3 and 4
    assert sum("fine-tuning starts" in str(args) for args, _ in texts) == 2

    vlines.clear()
    plot_learning_curves(_rows(["fine-tune"] * 4), tmp_path / "one_phase.png")
    assert vlines == []

    plot_learning_curves(_rows(["fine-tune"]), tmp_path / "one_epoch.png")  # single epoch
    assert vlines == []
    rows = _rows(["feature-extract", "fine-tune"])
    for r in rows:
        r["val_loss"] = r["val_accuracy"] = None  # no validation at all
    plot_learning_curves(rows, tmp_path / "no_val.png")
    assert len(vlines) == 2
    for name in ("one_phase.png", "one_epoch.png", "no_val.png"):
        _png(tmp_path / name)
    assert plt.get_fignums() == []


# ----------------------------------------------------------------------------- confusion matrix


def test_confusion_matrix_with_blocks(tmp_path, spy):
    patches = spy(matplotlib.axes.Axes, "add_patch")
    texts = spy(matplotlib.axes.Axes, "text")
    classes = ["cat", "dog", "bird", "fish", "horse", "a_rather_long_class_name", "owl"]
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 4, (7, 7)) + np.eye(7, dtype=int) * 20
    cm[6] = 0  # a class with no samples must not break normalisation
    path = plot_confusion_matrix(cm.tolist(), classes, tmp_path / "cm.png",
                                 blocks=[("old", 0, 5), ("new", 5, 7)], title="after expansion")
    w, h = _png(path)
    assert 400 < w < 2500 and 400 < h < 2500
    rects = [args[0] for args, _ in patches if type(args[0]).__name__ == "Rectangle"]
    assert [(r.get_xy(), r.get_width()) for r in rects] == [((-0.5, -0.5), 5), ((4.5, 4.5), 2)]
    labels = [args[2] for args, _ in texts]
    assert "old" in " ".join(labels) and "new" in " ".join(labels)
    cell_texts = [t for t in labels if t.strip() not in ("old", "new")]
    assert len(cell_texts) == 49
    assert "20\n" in " ".join(cell_texts) and "%" in " ".join(cell_texts)  # counts and percentages

    with pytest.raises(ValueError):
        plot_confusion_matrix(cm, classes, tmp_path / "bad.png", blocks=[("x", 5, 9)])
    with pytest.raises(ValueError):
        plot_confusion_matrix(cm, classes[:3], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    assert plt.get_fignums() == []


def test_confusion_matrix_grows_and_drops_cell_text(tmp_path, spy):
    texts = spy(matplotlib.axes.Axes, "text")
    small = plot_confusion_matrix(np.eye(3, dtype=int) * 5, ["a", "b", "c"], tmp_path / "s.png",
                                  normalize=False)
    assert len(texts) == 9
    assert [args[2] for args, _ in texts][0] == "5"  # counts only when not normalised
    texts.clear()
    k = 40
    big = plot_confusion_matrix(np.eye(k, dtype=int) * 3, [f"class_{i}" for i in range(k)],
                                tmp_path / "b.png")
    assert texts == []  # no cell text above ~30 classes
    (sw, sh), (bw, bh) = _png(small), _png(big)
    assert bw > sw and bh > sh
    assert bw < 2500 and bh < 2500  # modest even for many classes


# ----------------------------------------------------------------------------- predictions


def test_predictions_grid(tmp_path, spy):
    titles = spy(matplotlib.axes.Axes, "set_title")
    on_disk = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(on_disk)
    items = [
        {"image": Image.new("RGB", (80, 60), (10, 120, 10)), "true": "cat", "pred": "cat", "prob": 0.87},
        {"image": Image.new("L", (50, 50), 128), "true": "dog", "pred": "cat", "prob": np.float32(0.55)},
        {"image": str(on_disk), "true": None, "pred": "bird", "prob": 0.999},
        {"image": on_disk, "true": "bird", "pred": "bird", "prob": 0.5},
        {"image": tmp_path / "missing.jpg", "true": "owl", "pred": "dog", "prob": 0.3},  # unreadable
    ]
    path = plot_predictions(items, tmp_path / "pred.png", columns=3, title="validation")
    w, h = _png(path)
    assert 500 < w < 1500 and 400 < h < 1500  # 3 columns x 2 rows

    captions = [(args[0], kwargs.get("color")) for args, kwargs in titles]
    assert len(captions) == 5
    green, red = (matplotlib.colors.to_rgb(c) for c in ("#1b7a2f", "#c62828"))
    assert captions[0][0] == "cat (87%)\ntrue: cat" and matplotlib.colors.to_rgb(captions[0][1]) == green
    assert captions[1][0] == "cat (55%)\ntrue: dog" and matplotlib.colors.to_rgb(captions[1][1]) == red
    assert captions[2][0] == "bird (100%)" and matplotlib.colors.to_rgb(captions[2][1]) == (0, 0, 0)
    assert matplotlib.colors.to_rgb(captions[3][1]) == green
    assert matplotlib.colors.to_rgb(captions[4][1]) == red
    assert plt.get_fignums() == []


def test_predictions_caps_items(tmp_path, spy, monkeypatch):
    monkeypatch.setattr(plots, "MAX_PREDICTIONS", 3)
    titles = spy(matplotlib.axes.Axes, "set_title")
    suptitles = spy(matplotlib.figure.Figure, "suptitle")
    items = [{"image": Image.new("RGB", (16, 16)), "true": "a", "pred": "a", "prob": 1.0}] * 5
    _png(plot_predictions(items, tmp_path / "many.png", columns=8))
    assert len(titles) == 3
    assert "first 3 of 5" in suptitles[0][0][0]
    _png(plot_predictions([], tmp_path / "none.png"))


# ----------------------------------------------------------------------------- atomicity


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        with open(args[0], "wb") as f:  # write half a file first, as a crash mid-save would
            f.write(b"\x89PNG partial")
        raise RuntimeError("disk full")

    target = tmp_path / "cm.png"
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b"], target)
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(RuntimeError):
        plot_learning_curves(_rows(["a", "b"]), tmp_path / "lc.png")
    with pytest.raises(RuntimeError):
        plot_predictions([{"image": Image.new("RGB", (8, 8)), "true": None, "pred": "a", "prob": 0.5}],
                         tmp_path / "p.png")
    assert list(tmp_path.iterdir()) == []
    assert plt.get_fignums() == []  # figures closed even when saving fails

    # An existing good file survives a failed rewrite untouched.
    monkeypatch.undo()
    plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b"], target)
    before = target.read_bytes()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", boom)
    with pytest.raises(RuntimeError):
        plot_confusion_matrix([[5, 0], [0, 5]], ["a", "b"], target)
    assert target.read_bytes() == before
    assert _no_temp_files(tmp_path)


def test_nan_and_none_values_are_gaps():
    assert math.isnan(report._num(None)) and math.isnan(report._num(""))
    assert report._num(np.float32(0.25)) == 0.25
