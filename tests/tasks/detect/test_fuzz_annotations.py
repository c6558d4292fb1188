"""Fuzzed annotations for the three box readers (COCO JSON, YOLO label lines, Pascal VOC XML), read
the way training reads them (``scan_detection``): every case ends in a result whose left-out
images and boxes are each named (a problem line or a skipped file), or in a DataError naming the
data; never in another exception. Valid data with odd ids, names and numbers reads back exactly.

The inputs these tests (and benchmarks/fuzz.py) found crashing a reader are kept at the end of this
file, each with what the user is now told."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
import yaml
from box_data import make_scene, make_scenes, write_coco, write_voc, write_yolo
from fuzzing import FUZZ, assert_named, attempt
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from graft.errors import GraftError
from graft.tasks.detect.data import DetectionSplits, scan_detection

QUOTED_LIMIT = 1000
"""Longest problem line: the file's path, and at most ~100 characters of each thing it quotes from
the file (a name of a megabyte is not echoed whole)."""

# NaN and infinite coordinates are the point here; numpy says so as it converts them.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` draws (Hypothesis draws the low end of an integer range far more
    often than the rest, so ``integers(0, n - 1) == 0`` would be much commoner)."""
    return st.sampled_from([False] * (n - 1) + [True])


def scan(root: Path) -> DetectionSplits | GraftError:
    return attempt(scan_detection, root, val_fraction=0, workers=1)


def check_scan(outcome: DetectionSplits | GraftError, root: Path, *names: str) -> None:
    """``check_outcome``, and the kind of outcome counted in Hypothesis's statistics."""
    event("named error" if isinstance(outcome, GraftError) else "read, with problems" if outcome.problems or outcome.skipped else "read, no problems")
    check_outcome(outcome, root, *names)


def check_outcome(outcome: DetectionSplits | GraftError, root: Path, *names: str) -> None:
    """An error names the data folder; otherwise every problem line names one of ``names`` (an
    annotation file, or what names an entry in it), every skipped image says why, and every kept
    box is finite, inside its image and of a known class."""
    assert_named(outcome, str(root))
    if isinstance(outcome, GraftError):
        return
    for problem in outcome.problems:
        assert any(n in problem for n in names), problem
        assert len(problem) <= QUOTED_LIMIT, f"a problem line of {len(problem)} characters"
    assert all(s.reason for s in outcome.skipped)
    for s in outcome.train + outcome.val + outcome.test:
        b = s.boxes
        assert b.dtype == np.float32 and np.isfinite(b).all()
        assert ((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= s.width) & (b[:, 3] <= s.height) & (b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3])).all(), b
        assert ((s.labels >= 0) & (s.labels < len(outcome.classes))).all()
        assert len(s.labels) == len(b) == len(s.crowd) == len(s.difficult)


def kept(outcome: DetectionSplits) -> int:
    return sum(len(s.boxes) for s in outcome.train + outcome.val + outcome.test)


def dropped(outcome: DetectionSplits) -> list[str]:
    return [p for p in outcome.problems if p.endswith("box dropped")]


@pytest.fixture(scope="module")
def scenes() -> list:
    return make_scenes(2, negatives=0)  # img_000 and img_001, 64 x 48


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    """A fresh copy of a dataset written once per module, for each example to change."""
    made: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("fuzz-annotations")

    def copy(kind: str, writer, scenes) -> Path:
        if kind not in made:
            made[kind] = writer(base / f"{kind}-original", {"train": scenes})
        target = base / kind
        shutil.rmtree(target, ignore_errors=True)
        return Path(shutil.copytree(made[kind], target))

    return copy


# ==================================================================================================== COCO

ids = st.one_of(
    st.integers(-(10**30), 10**30), st.text(max_size=6), st.floats(), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
coco_numbers = st.one_of(  # floats of any size, and ints beyond them (float(10**400) raises)
    st.floats(), st.integers(-(10**400), 10**400), st.integers(-100, 100), st.sampled_from([0, -0.0, 1e-320, 5e-324, 1.7976931348623157e308, 10**309])
)
long_names = st.integers(250, 5000).map(lambda n: "x" * n + ".png")  # longer than a file system allows a name (255 bytes) or a path (4096)
coco_file_names = st.one_of(
    long_names,
    st.sampled_from(["img_000.png", "img_001.png", "img_001.png", "train/img_000.png", "missing.png", "../img_000.png", "../../etc/passwd",
                     "/etc/passwd", "C:\\data\\x.png", "\\\\server\\share\\x.png", "", ".", "train", "annotations", "img_000.png/", "a\x00b.png",
                     "\ud800.png", "img_000.png\n", " img_000.png", "ⓘmg_000.png", "img_000.PNG", "~/img_000.png", "$HOME/x.png"]),
    st.text(max_size=40),
)
bboxes = st.one_of(
    st.lists(coco_numbers, min_size=4, max_size=4),
    st.lists(st.integers(0, 64) | st.floats(0, 64), min_size=4, max_size=4),
    st.lists(st.one_of(coco_numbers, st.none(), st.text(max_size=3), st.booleans(), st.lists(st.integers(), max_size=2)), max_size=6),
    st.one_of(st.none(), st.text(max_size=5), coco_numbers, st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)),
)


@st.composite
def coco_images(draw):
    if draw(one_in(10)):  # not an image entry at all
        return draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2), st.just({}), st.fixed_dictionaries({"file_name": st.integers()})))
    known = not draw(one_in(4))  # mostly the dataset's own files and ids
    image = {"id": draw(st.sampled_from([1, 2]) if known else ids), "file_name": draw(st.sampled_from(["img_000.png", "img_001.png"]) if known else coco_file_names)}
    if draw(st.booleans()):
        image["width"], image["height"] = draw(st.sampled_from([(64, 48), (48, 64), (0, 0), (-1, 5), (10**30, 1), (True, True), ("64", "48"), (64.0, 48.0)]))
    if draw(one_in(6)):
        del image[draw(st.sampled_from(["id", "file_name"]))]
    return image


@st.composite
def coco_annotations(draw):
    if draw(one_in(10)):
        return draw(st.one_of(st.none(), st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2)))
    known = not draw(one_in(4))  # mostly plausible: known images and categories, boxes near the image
    ann = {
        "id": draw(st.integers(1, 10**6) | ids),
        "image_id": draw(st.sampled_from([1, 2]) if known else ids),
        "category_id": draw(st.sampled_from([1, 2]) if known else ids),
        "bbox": draw(st.tuples(st.integers(0, 40) | st.floats(0, 40), st.integers(0, 30), st.integers(1, 24) | st.floats(0, 24), st.integers(1, 18)).map(list) if known else bboxes),
    }
    if draw(st.booleans()):
        ann["iscrowd"] = draw(st.sampled_from([0, 1, True, None, "1", math.nan, [1]]))
    for key in draw(st.lists(st.sampled_from(["id", "image_id", "category_id", "bbox"]), max_size=2)):
        ann.pop(key, None)
    return ann


CATEGORIES = [{"id": 1, "name": "disc"}, {"id": 2, "name": "square"}]


@st.composite
def coco_documents(draw):
    doc: dict = {
        "images": draw(st.lists(coco_images(), min_size=1, max_size=5)),
        "annotations": draw(st.lists(coco_annotations(), min_size=1, max_size=8)),
        "categories": CATEGORIES if not draw(one_in(8)) else draw(st.lists(
            st.one_of(st.fixed_dictionaries({"id": st.integers(-3, 3) | ids, "name": st.text(max_size=6) | st.integers()}), st.integers(), st.just({})), max_size=4)),
    }
    change = draw(st.sampled_from(["none"] * 21 + ["a key left out", "a wrong type", "not an object"]))
    if change == "a key left out":
        doc.pop(draw(st.sampled_from(["images", "annotations", "categories"])))
    elif change == "a wrong type":
        key = draw(st.sampled_from(["images", "annotations", "categories"]))
        doc[key] = draw(st.sampled_from([{}, {"a": 1}, "abc", "", None, 3, 1.5]))
    elif change == "not an object":
        return draw(st.sampled_from([[], None, "images", 3, [doc]]))
    return doc


coco_texts = st.one_of(  # integers past Python's 4300 digits, nesting past its recursion limit
    st.integers(1, 6000).map(lambda n: '{"images": [], "annotations": [], "categories": [{"id": ' + "7" * n + ', "name": "x"}]}'),
    (st.integers(1, 2000) | st.sampled_from([100_000])).map(lambda n: '{"images": [], "annotations": ' + "[" * n + "]" * n + ', "categories": []}'),
    st.binary(max_size=40).map(lambda b: b'{"images": [], "categories": [], "x": "' + b + b'"}'),
    st.text(max_size=60).map(lambda t: '{"images": ' + t),
)


def _write_coco_text(root: Path, text: str | bytes) -> Path:
    path = root / "annotations" / "instances_train.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return path


@settings(FUZZ, max_examples=120)
@given(doc=coco_documents())
@example(doc={"images": [{"id": 1, "file_name": "a\x00b.png"}], "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}], "categories": CATEGORIES})  # ValueError from load_image before the fix
@example(doc={"images": [{"id": 1, "file_name": "\ud800.png"}], "annotations": [], "categories": CATEGORIES})  # UnicodeEncodeError from load_image before the fix
@example(doc={"images": [{"id": 1, "file_name": "img_000.png"}, {"id": 1.0, "file_name": "img_001.png"}], "annotations": [{"id": "x", "image_id": True, "category_id": 1.0, "bbox": [math.nan, 1, math.inf, -math.inf]}], "categories": CATEGORIES})
def test_any_coco_json_reads_with_every_left_out_box_named(folder, scenes, doc) -> None:
    root = folder("coco", write_coco, scenes)
    ann = _write_coco_text(root, json.dumps(doc))
    outcome = scan(root)
    check_scan(outcome, root, str(ann), "annotation id")
    if isinstance(outcome, GraftError):
        return
    entries = doc.get("annotations", []) if isinstance(doc, dict) else []
    left_out = [p for p in outcome.problems if p.startswith(f"{ann}: annotation id")] + dropped(outcome)
    # Each annotation is a box or one line saying why not; an image that cannot be read takes its boxes with it.
    assert kept(outcome) + len(left_out) == len(entries) or outcome.skipped


@settings(FUZZ, max_examples=40)
@given(text=coco_texts)
def test_any_coco_text_reads_or_fails_naming_the_file(folder, scenes, text: str | bytes) -> None:
    root = folder("coco", write_coco, scenes)
    ann = _write_coco_text(root, text)
    check_scan(scan(root), root, str(ann), "annotation id")


@st.composite
def valid_coco(draw):
    """Categories with any distinct ids and names, images with distinct int or str ids, boxes
    inside their images (in eighths of a pixel, so that x + w is exact)."""
    cat_ids = draw(st.lists(st.integers(-(10**18), 10**18), min_size=1, max_size=5, unique=True))
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=len(cat_ids), max_size=len(cat_ids), unique=True))
    image_keys = draw(st.lists(st.integers(-(10**12), 10**12) | st.text(min_size=1, max_size=6), min_size=2, max_size=2, unique_by=str))
    anns = []
    for image_id in image_keys:
        for _ in range(draw(st.integers(0, 4))):
            x, y = draw(st.integers(0, 63 * 8)) / 8, draw(st.integers(0, 47 * 8)) / 8
            w, h = draw(st.integers(1, int((64 - x) * 8))) / 8, draw(st.integers(1, int((48 - y) * 8))) / 8
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": draw(st.sampled_from(cat_ids)), "bbox": [x, y, w, h], "iscrowd": draw(st.sampled_from([0, 1]))})
    if not anns:
        anns.append({"id": 1, "image_id": image_keys[0], "category_id": cat_ids[0], "bbox": [0, 0, 64, 48], "iscrowd": 0})
    cats = draw(st.permutations([{"id": i, "name": n} for i, n in zip(cat_ids, names)]))
    images = [{"id": i, "file_name": f"img_00{n}.png", "width": 64, "height": 48} for n, i in enumerate(image_keys)]
    return {"images": images, "annotations": anns, "categories": cats}


@settings(FUZZ, max_examples=50)
@given(doc=valid_coco())
def test_valid_coco_reads_back_exactly(folder, scenes, doc) -> None:
    root = folder("coco", write_coco, scenes)
    _write_coco_text(root, json.dumps(doc, ensure_ascii=False))
    found = scan_detection(root, val_fraction=0, workers=1)
    by_id = sorted((c["id"], c["name"]) for c in doc["categories"])
    assert found.classes == [name for _, name in by_id]
    label = {cid: i for i, (cid, _) in enumerate(by_id)}
    assert not found.problems and not found.skipped and not found.val and not found.test
    samples = {s.image_id: s for s in found.train}
    assert sorted(samples) == sorted(str(i["id"]) for i in doc["images"])
    for image in doc["images"]:
        anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
        s = samples[str(image["id"])]
        expected = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float64).reshape(-1, 4).astype(np.float32)
        assert np.array_equal(s.boxes, expected)
        assert s.labels.tolist() == [label[a["category_id"]] for a in anns]
        assert s.crowd.tolist() == [bool(a["iscrowd"]) for a in anns]
        assert (s.width, s.height) == (64, 48)


# ==================================================================================================== YOLO

class_fields = st.one_of(  # never empty (the next field would move into its place)
    st.sampled_from(["0", "1", "2", "-1", "0.0", "1.0", "0.5", "1e0", "-0", "+1", "00", "0x1", "٠", "१", "1_0", "a", "0,", "２",
                     "nan", "-nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400", "1" * 400]),
    st.integers(-5, 10**15).map(str),
    st.floats().map(repr),
)
coordinate_fields = st.one_of(
    st.floats().map(repr),
    st.floats(0, 1).map(lambda v: f"{v:.6f}"),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e400", "1" * 400, "0.5", "1.5", "-0.5", "0", "1", "1e-400", "abc", "0x10", "1,5", "½", "٣", "1_0", "NaN"]),
)


@st.composite
def label_files(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):  # a plausible line: a known class, a box around the middle
            fields = [draw(st.sampled_from(["0", "1"]))] + [f"{draw(st.floats(0.2, 0.8)):.6f}" for _ in range(2)] + [f"{draw(st.floats(0.01, 0.4)):.6f}" for _ in range(2)]
        else:
            fields = [draw(class_fields)] + [draw(coordinate_fields) for _ in range(draw(st.sampled_from([4, 4, 4, 0, 1, 3, 5, 6, 7, 8, 9, 11])))]
        sep = draw(st.sampled_from([" ", "  ", "\t", " \u3000 "]))
        lines.append(sep.join(fields) + draw(st.sampled_from(["", " ", " # note", "\r"])))
    text = "\n".join(lines).encode("utf-8")
    if draw(one_in(10)):  # not UTF-8
        text = draw(st.binary(min_size=1, max_size=30)) + text
    return text


@settings(FUZZ, max_examples=120)
@given(first=label_files(), second=label_files() | st.none())
@example(first=b"0 0.5 0.5 0.1 0.1 0.2 0.3 nan nan\n0 nan 0.5 0.1 0.1\n0 1e400 0.5 0.1 0.1\n5 0.5 0.5 0.1 0.1\n0 0.5\n", second=b"\xff\xfe\x00")
def test_any_yolo_labels_read_with_every_left_out_line_named(folder, scenes, first: bytes, second: bytes | None) -> None:
    root = folder("yolo", write_yolo, scenes)
    files = [root / "labels" / "train" / "img_000.txt", root / "labels" / "train" / "img_001.txt"]
    files[0].write_bytes(first)
    if second is None:
        files[1].unlink()  # an image without a label file: a negative
    else:
        files[1].write_bytes(second)
    outcome = scan(root)
    check_scan(outcome, root, str(root / "labels" / "train"), "img_000.txt", "img_001.txt")
    if isinstance(outcome, GraftError):
        return
    lines = 0
    for f, data in zip(files, (first, second or b"")):
        try:
            lines += sum(1 for line in data.decode("utf-8").splitlines() if line.split())
        except UnicodeDecodeError:  # the whole file is left out, by name
            assert any(p.startswith(f"{f}: cannot read") for p in outcome.problems)
            assert not any(len(s.boxes) for s in outcome.train if s.image_id == f.stem)
    # Each label line is a box or one line saying why not.
    left_out = [p for p in outcome.problems if p.startswith(str(root / "labels")) and ": line " in p] + [p for p in dropped(outcome) if ".txt line " in p]
    assert kept(outcome) + len(left_out) == lines


def whole_pixel_box(draw, low: int, width: int, height: int) -> list[int]:
    """[x1, y1, x2, y2] on whole pixels from ``low`` to the image's size, never empty."""
    x1, x2 = sorted(draw(st.lists(st.integers(low, width), min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(st.integers(low, height), min_size=2, max_size=2, unique=True)))
    return [x1, y1, x2, y2]


@st.composite
def valid_yolo(draw):
    """Class names of any text, boxes on whole pixels of 64 x 32 images: every number the label
    file holds is a multiple of 1/128, exact in 8 decimals and in binary."""
    names = draw(st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=8), min_size=1, max_size=4, unique=True))
    scenes = []
    for n in range(2):
        boxes = []
        for _ in range(draw(st.integers(0 if n else 1, 4))):
            boxes.append(([float(v) for v in whole_pixel_box(draw, 0, 64, 32)], draw(st.integers(0, len(names) - 1))))
        scenes.append((f"img_{n:03d}", boxes))
    return names, scenes


@settings(FUZZ, max_examples=40)
@given(data=valid_yolo())
def test_valid_yolo_reads_back_exactly(data) -> None:
    names, boxed = data
    pixels, _ = make_scene(np.random.default_rng(0), size=(64, 32), objects=0)
    with tempfile.TemporaryDirectory(prefix="graft-fuzz-") as d:
        root = write_yolo(Path(d), {"train": [(name, pixels, boxes) for name, boxes in boxed]}, names=names)
        (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "names": names}, allow_unicode=True), encoding="utf-8")
        found = scan_detection(root, val_fraction=0, workers=1)
    assert found.classes == names and not found.problems and not found.skipped
    samples = {s.image_id: s for s in found.train}
    for name, boxes in boxed:
        assert samples[name].boxes.tolist() == [b for b, _ in boxes]
        assert samples[name].labels.tolist() == [label for _, label in boxes]


ALIAS_BOMB = "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i else "x"] * 9) + "]\n" for i in range(6))  # 9**6 values
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3) | st.integers(-2, 3), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def data_yamls(draw) -> bytes:
    """A data.yaml: the dataset's keys with odd values (names with mixed keys, a path with NUL,
    entries too long or not text), or text that YAML cannot (or graft should not) read whole."""
    if draw(one_in(4)):
        return draw(st.sampled_from([
            ALIAS_BOMB + "train: [*a5]\nnames: [disc, square]\n", ALIAS_BOMB + "path: *a5\ntrain: images/train\nnames: *a5\n",
            "names: " + "[" * 3000 + "\n", "train: images/train\nnames: [disc, square]\nx: " + "1" * 5000 + "\n",
            "train: images/train\nnames: [disc, square]\nx: 2001-13-45\n", "a: &a [*a]\n", "",
        ]) | st.text(max_size=40)).encode("utf-8", "surrogatepass")
    doc = {
        "path": draw(st.sampled_from([".", "", None, "a\0", "x" * 300, "../..", "images"]) | yaml_values),
        "train": draw(st.sampled_from(["images/train", "list.txt", ["images/train", "list.txt"], "missing", "x" * 300, "a\0b", "x" * 5000 + "/y"]) | yaml_values),
        "names": draw(st.sampled_from([["disc", "square"], {0: "disc", 1: "square"}, {0: "disc", "x": "square"}, {1: "disc", 0: "square"}, ["disc", "disc"], []]) | yaml_values),
    }
    for key in draw(st.lists(st.sampled_from(list(doc)), max_size=2)):
        doc.pop(key, None)
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).encode("utf-8")


image_lists = st.one_of(  # a train: list.txt of image paths
    st.sampled_from([b"images/train/img_000.png\nimages/train/img_001.png\n", b"x" * 300 + b".png\nimages/train/img_001.png\n", b"\xff\xfe\n",
                     b"images/train/" + b"x/" * 2100 + b"img_000.png\nimages/train/img_001.png\n", b"a\x00b.png\nimages/train/img_001.png\n"]),
    st.binary(max_size=30),
)


@settings(FUZZ, max_examples=60)
@given(text=data_yamls(), listing=image_lists)
@example(text=b"path: .\ntrain: list.txt\nnames: [disc, square]\n", listing=b"x" * 300 + b".png\n")
def test_any_yolo_data_yaml_and_image_list_read_or_fail_naming_the_file(folder, scenes, text: bytes, listing: bytes) -> None:
    root = folder("yolo", write_yolo, scenes)
    (root / "data.yaml").write_bytes(text)
    (root / "list.txt").write_bytes(listing)
    check_scan(scan(root), root, str(root), ".txt line ")


# ==================================================================================================== VOC

voc_sizes = st.one_of(
    st.integers(-5, 10**9).map(str), st.floats().map(repr),
    st.sampled_from(["64", "48", "0", "-1", "nan", "abc", "", " 64 ", "6.4e1", "１２", "inf", "-inf", "Infinity", "1e400", "1" * 400]),
)
voc_file_names = st.one_of(
    long_names,
    st.sampled_from(["img_000.png", "img_001.png", "missing.png", "../img_000.png", "../../etc/passwd", "/etc/passwd", "C:\\x.png", "", " ", "."]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=40),
)
voc_numbers = st.one_of(st.integers(-10, 80).map(str), st.floats().map(repr), st.sampled_from(["nan", "inf", "-inf", "1e400", "1" * 400, "", "x", " 5 ", "5,0"]))
BOMB_DTD = ('<!DOCTYPE annotation [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
            '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>')
DTDS = ["", "", "", BOMB_DTD, '<!DOCTYPE annotation [<!ENTITY x SYSTEM "file:///etc/passwd">]>', '<!DOCTYPE annotation SYSTEM "http://example.com/voc.dtd">',
        '<!DOCTYPE annotation [<!ELEMENT annotation ANY>]>', '<!DOCTYPE annotation [<!ENTITY % p SYSTEM "http://example.com/p.dtd"> %p;]>']


@st.composite
def voc_documents(draw) -> tuple[bytes, int | None]:
    """An annotation file, and its number of <object> elements when it is well-formed."""
    dtd = draw(st.sampled_from(DTDS))
    parts = []
    if not draw(one_in(5)):
        filename = draw(voc_file_names)
        parts.append(f"<filename>{'&lol3;' if dtd == BOMB_DTD and draw(st.booleans()) else escape(filename)}</filename>")
    if draw(st.booleans()):
        parts.append(f"<size><width>{escape(draw(voc_sizes))}</width><height>{escape(draw(voc_sizes))}</height><depth>3</depth></size>")
    objects = draw(st.integers(0, 4))
    for _ in range(objects):
        inner = []
        if not draw(one_in(6)):
            inner.append(f"<name>{escape(draw(st.sampled_from(['disc', 'square', ' disc ', '', 'Disc', 'ring']) | st.text(st.characters(codec='utf-8', exclude_categories=('Cc', 'Cs')), max_size=6)))}</name>")
        if draw(st.booleans()):
            inner.append(f"<difficult>{draw(st.sampled_from(['0', '1', 'true', 'x', '']))}</difficult>")
        if not draw(one_in(6)):
            coords = [draw(st.integers(1, 64).map(str) | voc_numbers) for _ in range(4)]
            tags = draw(st.sampled_from([("xmin", "ymin", "xmax", "ymax"), ("xmin", "ymin", "xmax"), ("x1", "y1", "x2", "y2")]))
            inner.append("<bndbox>" + "".join(f"<{t}>{escape(c)}</{t}>" for t, c in zip(tags, coords)) + "</bndbox>")
        parts.append("<object>" + "".join(inner) + "</object>")
    root = draw(st.sampled_from(["annotation", "annotation", "annotation", "voc", "a:b"]))
    declaration = draw(st.sampled_from(["", '<?xml version="1.0"?>', '<?xml version="1.0" encoding="utf-8"?>', '<?xml version="1.0" encoding="latin-1"?>']))
    text = f"{declaration}{dtd}<{root}>{''.join(parts)}</{root}>"
    data = text.encode("latin-1" if "latin-1" in declaration and text.isascii() else "utf-8")
    mangle = draw(st.sampled_from(["none"] * 4 + ["cut short", "bytes changed"]))
    if mangle == "cut short":
        return data[: draw(st.integers(0, len(data)))], None
    if mangle == "bytes changed":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data), None
    return data, objects if ":" not in root else None


@settings(FUZZ, max_examples=120)
@given(case=voc_documents(), listed=st.sampled_from([b"img_000\nimg_001\n", b"img_000 1\nimg_001 -1\n", b"img_001\n", b"\n", b"missing\nimg_000\nimg_001\n",
                                                   b"../img_000\nimg_001\n", b"x" * 5000 + b"\nimg_000\nimg_001\n", b"\xff\xfeimg_000\nimg_001\n"]))
def test_any_voc_xml_reads_with_every_left_out_object_named(folder, scenes, case: tuple[bytes, int | None], listed: bytes) -> None:
    root = folder("voc", write_voc, scenes)
    xml, objects = case
    path = root / "Annotations" / "img_000.xml"
    path.write_bytes(xml)
    (root / "ImageSets" / "Main" / "train.txt").write_bytes(listed)
    outcome = scan(root)
    check_scan(outcome, root, str(root / "Annotations"), "Annotations/", str(root / "ImageSets"))
    if isinstance(outcome, GraftError):
        return
    first = [s for s in outcome.train if s.image_id == "img_000"]
    if b"<!ENTITY" in xml:  # entity definitions are refused, never expanded: the file is left out by name
        assert any(p.startswith((f"{path}: XML with", f"{path}: not readable XML")) for p in outcome.problems)
        assert not first
    elif objects is not None and first and not outcome.skipped:
        # A well-formed file that was read: each of its objects is a box or one line saying why not.
        left_out = [p for p in outcome.problems if p.startswith(f"{path}: object ")] + [p for p in dropped(outcome) if p.startswith("Annotations/img_000.xml ")]
        assert len(first[0].boxes) + len(left_out) == objects


@settings(FUZZ, max_examples=40)
@given(width=st.integers(1, 12), depth=st.integers(1, 9), where=st.sampled_from(["filename", "name", "attribute", "unused"]))
@example(width=10, depth=9, where="name")  # a billion laughs
def test_voc_entity_bombs_are_left_out_by_name_before_expanding(folder, scenes, width: int, depth: int, where: str) -> None:
    root = folder("voc", write_voc, scenes)
    entities = '<!ENTITY e0 "lol">' + "".join(f'<!ENTITY e{i} "{f"&e{i - 1};" * width}">' for i in range(1, depth + 1))
    use = f"&e{depth};"
    body = {
        "filename": f"<filename>{use}</filename>",
        "name": f"<object><name>{use}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>",
        "attribute": f'<object extra="{use}"><name>disc</name></object>',
        "unused": "<filename>img_000.png</filename>",
    }[where]
    path = root / "Annotations" / "img_000.xml"
    path.write_text(f'<?xml version="1.0"?><!DOCTYPE annotation [{entities}]><annotation>{body}</annotation>')
    found = scan_detection(root, val_fraction=0, workers=1)
    assert [p for p in found.problems if p.startswith(f"{path}: ")] == [f"{path}: XML with EntitiesForbidden (EntitiesForbidden(name='e0', system_id=None, public_id=None)), which graft does not expand; left out"]
    assert [s.image_id for s in found.train] == ["img_001"]


@st.composite
def valid_voc(draw):
    """Object names of any XML text without surrounding spaces, boxes on whole pixels."""
    name_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Cn", "Zs", "Zl", "Zp")), min_size=1, max_size=8)
    images = []
    for n in range(2):
        objects = []
        for _ in range(draw(st.integers(0 if n else 1, 4))):
            objects.append((draw(name_text).strip() or "x", whole_pixel_box(draw, 1, 64, 48), draw(st.booleans())))
        images.append((f"img_{n:03d}", objects))
    return images


@settings(FUZZ, max_examples=40)
@given(images=valid_voc())
def test_valid_voc_reads_back_exactly(folder, scenes, images) -> None:
    root = folder("voc", write_voc, scenes)
    for image_id, objects in images:
        body = "".join(
            f"<object><name>{escape(name)}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for name, (x1, y1, x2, y2), difficult in objects
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation><filename>{image_id}.png</filename><size><width>64</width><height>48</height></size>{body}</annotation>", encoding="utf-8")
    found = scan_detection(root, val_fraction=0, workers=1)
    classes = sorted({name for _, objects in images for name, _, _ in objects})
    assert found.classes == classes and not found.problems and not found.skipped
    samples = {s.image_id: s for s in found.train}
    for image_id, objects in images:
        s = samples[image_id]
        assert s.boxes.tolist() == [[x1 - 1, y1 - 1, x2, y2] for _, (x1, y1, x2, y2), _ in objects]  # VOC counts pixels from 1
        assert s.labels.tolist() == [classes.index(name) for name, _, _ in objects]
        assert s.difficult.tolist() == [d for _, _, d in objects]


# ==================================================================================================== inputs that crashed a reader


def _coco_case(tmp_path: Path, scenes, change) -> Path:
    root = write_coco(tmp_path / "coco", {"train": scenes})
    path = root / "annotations" / "instances_train.json"
    doc = json.loads(path.read_text())
    text = change(doc)
    path.write_text(text if isinstance(text, str) else json.dumps(doc))
    return root


def _yolo_case(tmp_path: Path, scenes, label: str | None = None, yaml_text: str | None = None, listing: bytes | None = None) -> Path:
    root = write_yolo(tmp_path / "yolo", {"train": scenes})
    if label is not None:
        (root / "labels" / "train" / "img_000.txt").write_text(label)
    if listing is not None:
        (root / "list.txt").write_bytes(listing)
        yaml_text = "path: .\ntrain: list.txt\nnames: [disc, square]\n"
    if yaml_text is not None:
        (root / "data.yaml").write_text(yaml_text)
    return root


def _voc_case(tmp_path: Path, scenes, xml: str | None = None, listing: bytes | None = None) -> Path:
    root = write_voc(tmp_path / "voc", {"train": scenes})
    if xml is not None:
        (root / "Annotations" / "img_000.xml").write_text(xml)
    if listing is not None:
        (root / "ImageSets" / "Main" / "train.txt").write_bytes(listing)
    return root


BOX = '<object><name>disc</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>'
MB = 1_000_000


@pytest.mark.parametrize(("make", "told"), [
    # Each crashed with a raw exception (named after the id) before: now a named error, a problem line or a skipped
    # image that says ``told`` (None: read as if the odd value were absent, with nothing left out).
    pytest.param(lambda t, s: _coco_case(t, s, lambda d: d["images"][0].update(id=[1])), "'id': [1], 'width': 64} needs an 'id' (a number or a string) and a 'file_name'; left out", id="coco-image-id-list-TypeError"),
    pytest.param(lambda t, s: _coco_case(t, s, lambda d: d["annotations"][0].update(image_id=[1])), "annotation id 1: image id [1] is not among the images; left out", id="coco-image_id-list-TypeError"),
    pytest.param(lambda t, s: _coco_case(t, s, lambda d: d["annotations"][0].update(category_id={})), "annotation id 1: unknown category id {}; left out", id="coco-category_id-object-TypeError"),
    pytest.param(lambda t, s: _coco_case(t, s, lambda d: d.update(annotations=None)), "instances_train.json: not a COCO annotation file (it needs 'images', 'annotations' and 'categories' lists)", id="coco-annotations-null-TypeError"),
    pytest.param(lambda t, s: _coco_case(t, s, lambda d: (d["images"][0].update(id=None), d["annotations"][0].pop("image_id"))), "annotation id 1: image id None is not among the images; left out", id="coco-image-id-null-KeyError"),
    pytest.param(lambda t, s: _coco_case(t, s, lambda d: d["annotations"][0].update(bbox=[10**400, 1, 5, 5])), "annotation id 1 (img_000.png): non-finite coordinates [nan, 1.0, nan, 6.0]; box dropped", id="coco-bbox-10**400-OverflowError"),
    pytest.param(lambda t, s: _coco_case(t, s, lambda d: d["images"][0].update(file_name="x" * 300)), "cannot read file: File name too long", id="coco-file_name-too-long-OSError"),
    pytest.param(lambda t, s: _coco_case(t, s, lambda d: json.dumps(d)[:-1] + ', "x": ' + "1" * 5000 + "}"), "instances_train.json: holds a number too long to read (Exceeds the limit (4300 digits)", id="coco-5000-digits-ValueError"),
    pytest.param(lambda t, s: _coco_case(t, s, lambda d: json.dumps(d)[:-1] + ', "x": ' + "[" * 100_000 + "}"), "instances_train.json: JSON nested too deeply to read", id="coco-nested-100000-RecursionError"),
    pytest.param(lambda t, s: _yolo_case(t, s, label="nan 0.5 0.5 0.1 0.1\n"), "img_000.txt: line 1: class index nan is beyond the 2 names of data.yaml (0..1); left out", id="yolo-class-nan-ValueError"),
    pytest.param(lambda t, s: _yolo_case(t, s, label="1e400 0.5 0.5 0.1 0.1\n"), "img_000.txt: line 1: class index 1e400 is beyond the 2 names", id="yolo-class-1e400-OverflowError"),
    pytest.param(lambda t, s: _yolo_case(t, s, label="inf 0.5 0.5 0.1 0.1\n"), "img_000.txt: line 1: class index inf is beyond the 2 names", id="yolo-class-inf-OverflowError"),
    pytest.param(lambda t, s: _yolo_case(t, s, yaml_text="train: images/train\nnames: {0: disc, x: square}\n"), "data.yaml: 'names' must map 0, 1, 2, ... to class names, not [0, 'x']", id="yolo-names-mixed-keys-TypeError"),
    pytest.param(lambda t, s: _yolo_case(t, s, yaml_text='path: "a\\0"\ntrain: images/train\nnames: [disc, square]\n'), "data.yaml: 'path' must be the dataset's folder, not 'a\\x00'", id="yolo-path-nul-ValueError"),
    pytest.param(lambda t, s: _yolo_case(t, s, yaml_text="train: " + "x" * 300 + "\nnames: [disc, square]\n"), "xxx' is neither an image folder nor a .txt list", id="yolo-train-too-long-OSError"),
    pytest.param(lambda t, s: _yolo_case(t, s, yaml_text="names: " + "[" * 3000 + "\n"), "data.yaml: cannot read it as YAML: nested too deeply", id="yolo-yaml-nested-3000-RecursionError"),
    pytest.param(lambda t, s: _yolo_case(t, s, yaml_text=ALIAS_BOMB + "train: [*a5]\nnames: [disc, square]\n"), "data.yaml: its anchors and aliases expand to more than 10000 values", id="yolo-train-alias-bomb-OSError"),
    pytest.param(lambda t, s: _yolo_case(t, s, yaml_text=ALIAS_BOMB + "path: *a5\ntrain: images/train\nnames: [disc, square]\n"), "data.yaml: its anchors and aliases expand to more than 10000 values", id="yolo-path-alias-bomb"),
    pytest.param(lambda t, s: _yolo_case(t, s, listing=b"\xff\xfe\n"), "list.txt: cannot read this train image list (from data.yaml): 'utf-8' codec can't decode", id="yolo-list-not-utf8-UnicodeDecodeError"),
    pytest.param(lambda t, s: _yolo_case(t, s, listing=b"x" * 300 + b".png\n"), "cannot read file: File name too long", id="yolo-list-name-too-long-OSError"),
    pytest.param(lambda t, s: _voc_case(t, s, xml=f"<annotation><filename>img_000.png</filename><size><width>inf</width><height>48</height></size>{BOX}</annotation>"), None, id="voc-size-inf-OverflowError"),
    pytest.param(lambda t, s: _voc_case(t, s, xml=f"<annotation><filename>{'x' * 300}</filename>{BOX}</annotation>"), None, id="voc-filename-too-long-OSError"),  # found by its stem
    pytest.param(lambda t, s: _voc_case(t, s, listing=b"\xff\xfe\n"), "train.txt: cannot read this image set: 'utf-8' codec can't decode", id="voc-imagesets-not-utf8-UnicodeDecodeError"),
    # Read, but not as they should be: a polygon's NaN vertex was passed over; a megabyte of input made a megabyte of message.
    pytest.param(lambda t, s: _yolo_case(t, s, label="0 0.2 0.2 nan 0.3 0.4 0.6\n"), "img_000.txt line 1 (img_000.png): non-finite coordinates [nan, nan, nan, nan]; box dropped", id="yolo-polygon-nan"),
    pytest.param(lambda t, s: _coco_case(t, s, lambda d: d.update(categories=[{"id": 1, "name": "x" * MB}, {"id": 2, "name": "x" * MB}])), "category name 'xxx", id="coco-1MB-category-names"),
    pytest.param(lambda t, s: _coco_case(t, s, lambda d: d["annotations"][0].update(id="x" * MB, image_id="y" * MB)), "' is not among the images; left out", id="coco-1MB-ids"),
    pytest.param(lambda t, s: _coco_case(t, s, lambda d: d["images"][0].update(file_name="../" + "x" * MB)), "leaves the data folder", id="coco-1MB-file_name"),
    pytest.param(lambda t, s: _yolo_case(t, s, label="0 " + "x" * MB + "\n"), "xxx' is not numbers; left out", id="yolo-1MB-line"),
    pytest.param(lambda t, s: _voc_case(t, s, xml=f"<annotation><object><name>{'x' * MB}</name><bndbox><xmin>a</xmin></bndbox></object>{BOX}</annotation>"), "...): bndbox needs numeric", id="voc-1MB-name"),
])
def test_inputs_that_crashed_a_reader_are_named(tmp_path: Path, scenes, make, told: str | None) -> None:
    root = make(tmp_path, scenes)
    outcome = scan(root)
    check_outcome(outcome, root, str(root), "annotation id ", ".txt line ", "Annotations/")
    said = [str(outcome)] if isinstance(outcome, GraftError) else outcome.problems + [f"{s.path}: {s.reason}" for s in outcome.skipped]
    if told is None:
        assert said == [] and len(outcome.train) == 2
    else:
        assert any(told in line for line in said), said
    assert all(len(line) <= QUOTED_LIMIT for line in said), [len(line) for line in said]
