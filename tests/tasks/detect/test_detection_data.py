"""Reading COCO, YOLO and Pascal VOC boxes: one set of targets whatever the format, and a clear
message for every kind of bad annotation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from box_data import CLASSES, make_scenes, three_splits, voc_xml, write_coco, write_voc, write_yolo
from graft.tasks.detect.data import scan_detection
from graft.errors import DataError


def _targets(splits):
    return {
        split: sorted((Path(s.path).stem, s.width, s.height, s.boxes.round(3).tolist(), s.labels.tolist()) for s in getattr(splits, split))
        for split in ("train", "val", "test")
    }


def test_the_same_boxes_in_three_formats_give_identical_targets(tmp_path: Path) -> None:
    data = three_splits()
    coco = scan_detection(write_coco(tmp_path / "coco", data))
    yolo = scan_detection(write_yolo(tmp_path / "yolo", data))
    voc = scan_detection(write_voc(tmp_path / "voc", data))
    assert (coco.format, yolo.format, voc.format) == ("coco", "yolo", "voc")
    assert coco.classes == yolo.classes == voc.classes == CLASSES
    expected = {split: sorted((name, px.shape[1], px.shape[0], [[float(v) for v in b] for b, _ in boxes], [lab for _, lab in boxes]) for name, px, boxes in scenes) for split, scenes in data.items()}
    assert _targets(coco) == expected
    assert _targets(yolo) == expected
    assert _targets(voc) == expected
    for found in (coco, yolo, voc):
        assert not found.problems and not found.skipped
        assert all(s.boxes.dtype == np.float32 for s in found.train)
        negatives = [s for s in found.train if len(s.boxes) == 0]
        assert [Path(s.path).stem for s in negatives] == ["img_011"]  # images without boxes are kept as negatives


def test_coco_category_ids_map_to_contiguous_labels_sorted_by_id(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "coco", three_splits(), category_ids=(90, 1))  # "disc" has id 90, "square" id 1
    found = scan_detection(root)
    assert found.classes == ["square", "disc"]
    assert "COCO JSON" in found.description and "instances_train.json" in found.description


def test_a_yolo_yaml_given_by_a_relative_path_finds_its_splits(tmp_path: Path, monkeypatch) -> None:
    """Split entries are relative to the YAML's folder (or to its 'path', itself relative to that
    folder), wherever the user runs graft from: most Ultralytics data.yaml files have no 'path'."""
    data = three_splits()
    root = write_yolo(tmp_path / "sets" / "yolo", data)
    expected = _targets(scan_detection(root))
    monkeypatch.chdir(tmp_path)
    yaml_text = (root / "data.yaml").read_text()
    (root / "data.yaml").write_text(yaml_text.replace("path: .\n", ""))
    assert _targets(scan_detection(Path("sets/yolo/data.yaml"))) == expected
    assert _targets(scan_detection(Path("sets/yolo"))) == expected
    (root / "nested.yaml").write_text(yaml_text.replace("path: .", "path: ../yolo"))
    assert _targets(scan_detection(Path("sets/yolo/nested.yaml"))) == expected


def test_missing_val_split_is_split_from_train_seeded(tmp_path: Path) -> None:
    data = three_splits(n_train=20)
    del data["val"]
    root = write_yolo(tmp_path / "yolo", data)
    a, b = scan_detection(root, val_fraction=0.25, seed=3), scan_detection(root, val_fraction=0.25, seed=3)
    assert len(a.val) == 5 and len(a.train) == 15 and len(a.test) == 4
    assert [s.path for s in a.val] == [s.path for s in b.val]
    assert {s.path for s in scan_detection(root, val_fraction=0.25, seed=4).val} != {s.path for s in a.val}
    assert any("held out for validation" in w for w in a.warnings)


def test_unsplit_voc_without_image_sets_is_split(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "voc", {"all": make_scenes(10)})
    (root / "ImageSets" / "Main" / "all.txt").unlink()
    found = scan_detection(root, val_fraction=0.2, test_fraction=0.2)
    assert (len(found.train), len(found.val), len(found.test)) == (6, 2, 2)


def _one_coco(tmp_path: Path, anns: list[dict], images: list[dict] | None = None, size=(64, 48)) -> Path:
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = images or [{"id": i, "file_name": f"{i}.png", "width": size[0], "height": size[1]} for i in (1, 2)]
    for img in images:
        if not (root / "images" / img["file_name"]).exists():
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / img["file_name"])
    cats = [{"id": 1, "name": "disc"}, {"id": 2, "name": "square"}]
    (root / "data.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def test_boxes_partly_outside_are_clipped_and_empty_ones_dropped_with_the_annotation_named(tmp_path: Path) -> None:
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [50, 40, 30, 20]},  # reaches outside: clipped
        {"id": 12, "image_id": 1, "category_id": 2, "bbox": [70, 10, 5, 5]},  # wholly outside: dropped
        {"id": 13, "image_id": 2, "category_id": 2, "bbox": [10, 10, 0, 5]},  # zero width
        {"id": 14, "image_id": 2, "category_id": 2, "bbox": [10, 10, -4, 5]},  # negative width
        {"id": 15, "image_id": 2, "category_id": 1, "bbox": [None, 10, 4, 5]},  # NaN (null)
        {"id": 16, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10]},  # fine
    ]
    found = scan_detection(_one_coco(tmp_path, anns), val_fraction=0)
    by_id = {s.image_id: s for s in found.train}
    assert by_id["1"].boxes.tolist() == [[50, 40, 64, 48]]
    assert by_id["2"].boxes.tolist() == [[5, 5, 15, 15]]
    text = "\n".join(found.problems)
    assert "annotation id 11" in text and "clipped" in text
    assert "annotation id 12" in text and "outside" in text
    assert "annotation id 13" in text and "annotation id 14" in text and "zero or negative size" in text
    assert "annotation id 15" in text and "non-finite" in text
    with pytest.raises(DataError, match="annotation id 1[1-5].*--strict"):
        scan_detection(_one_coco(tmp_path / "again", anns), val_fraction=0, strict=True)


def test_unknown_category_missing_image_id_and_duplicate_image_ids_are_named(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "1.png", "width": 64, "height": 48}, {"id": 1, "file_name": "2.png", "width": 64, "height": 48}, {"id": 3, "file_name": "3.png", "width": 64, "height": 48}]
    anns = [
        {"id": 21, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]},
        {"id": 22, "image_id": 42, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 23, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5]},
    ]
    found = scan_detection(_one_coco(tmp_path, anns, images), val_fraction=0)
    text = "\n".join(found.problems)
    assert "annotation id 21: unknown category id 99" in text
    assert "annotation id 22: image id 42 is not among the images" in text
    assert "image id 1 appears twice" in text
    assert sorted(s.image_id for s in found.train) == ["1", "3"]


def test_annotations_of_missing_or_unreadable_images_skip_those_images(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}, {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]}, {"id": 3, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in (1, 2, 3)]
    root = _one_coco(tmp_path, anns, images)
    (root / "images" / "2.png").unlink()
    (root / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    found = scan_detection(root, val_fraction=0)
    assert [s.image_id for s in found.train] == ["1"]
    reasons = {Path(s.path).name: s.reason for s in found.skipped}
    assert reasons["2.png"] == "file not found"
    assert [Path(s.path).parent for s in found.skipped if Path(s.path).name == "2.png"] == [(root / "images").absolute()]  # where it belongs
    assert "3.png" in reasons
    with pytest.raises(DataError, match="2.png: file not found"):
        scan_detection(root, val_fraction=0, strict=True)


def test_crowd_annotations_are_kept_and_flagged(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20], "iscrowd": 1}, {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 5, 10, 10]}]
    found = scan_detection(_one_coco(tmp_path, anns), val_fraction=0)
    s = next(s for s in found.train if s.image_id == "1")
    assert s.crowd.tolist() == [True, False] and s.ignored.tolist() == [True, False]
    assert found.counts()["train"] == {"images": 2, "disc": 0, "square": 1}


def test_coco_boxes_written_as_xyxy_name_the_convention_that_fits(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    anns, n = [], 0
    for image_id in (1, 2):
        for _ in range(6):
            x1, y1 = int(rng.integers(20, 40)), int(rng.integers(15, 30))
            n += 1
            anns.append({"id": n, "image_id": image_id, "category_id": 1, "bbox": [x1, y1, x1 + 12, y1 + 10]})  # xyxy, not xywh
    with pytest.raises(DataError, match=r"data.json: \d+ of 12 boxes do not fit their images as xywh, but 12 fit as xyxy"):
        scan_detection(_one_coco(tmp_path, anns))


def test_yolo_coordinates_in_pixels_are_recognised_as_not_normalised(tmp_path: Path) -> None:
    root = write_yolo(tmp_path / "y", {"train": make_scenes(6, negatives=0)})
    for f in (root / "labels" / "train").glob("*.txt"):  # rewrite as pixels
        lines = []
        for line in f.read_text().splitlines():
            c, cx, cy, w, h = line.split()
            lines.append(f"{c} {float(cx) * 64:.2f} {float(cy) * 48:.2f} {float(w) * 64:.2f} {float(h) * 48:.2f}")
        f.write_text("\n".join(lines))
    with pytest.raises(DataError, match="do not fit their images as cxcywh normalised, but .* fit as cxcywh"):
        scan_detection(root)


def test_yolo_class_index_beyond_names_and_malformed_lines_are_named(tmp_path: Path) -> None:
    root = write_yolo(tmp_path / "y", {"train": make_scenes(4, negatives=0)})
    label = root / "labels" / "train" / "img_000.txt"
    label.write_text(label.read_text() + "5 0.5 0.5 0.1 0.1\n0 0.5 0.5\nx 0.5 0.5 0.1 0.1\n")
    found = scan_detection(root, val_fraction=0)
    text = "\n".join(found.problems)
    assert "img_000.txt: line" in text and "class index 5 is beyond the 2 names" in text
    assert "expected 'class cx cy w h', got 3 numbers" in text and "is not numbers" in text
    with pytest.raises(DataError, match="class index 5"):
        scan_detection(root, strict=True)


def test_exif_rotated_image_boxes_follow_the_upright_image(tmp_path: Path) -> None:
    """Boxes refer to the upright image (as labelling tools show it); when the annotation records
    the stored size of a sideways image, they were drawn on the stored pixels and turn with it."""
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    stored = np.zeros((40, 60, 3), np.uint8)  # 60 wide, 40 high as stored
    stored[5:15, 10:30] = 255  # a bright box at x 10..30, y 5..15 of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: upright is 40 wide, 60 high
    Image.fromarray(stored).save(root / "JPEGImages" / "a.jpg", exif=exif, quality=95)
    Image.fromarray(stored).save(root / "JPEGImages" / "b.jpg", exif=exif, quality=95)
    # a: annotated on the stored pixels (its size says 60x40); b: on the upright image (40x60).
    (root / "Annotations" / "a.xml").write_text(voc_xml("a", 60, 40, [([10, 5, 30, 15], 1)], filename="a.jpg"))
    (root / "Annotations" / "b.xml").write_text(voc_xml("b", 40, 60, [([25, 10, 35, 30], 1)], filename="b.jpg"))
    found = scan_detection(root, val_fraction=0)
    by_id = {s.image_id: s for s in found.train}
    from graft.data.images import load_image

    upright = np.asarray(load_image(root / "JPEGImages" / "a.jpg"))
    assert upright.shape[:2] == (60, 40)
    x1, y1, x2, y2 = by_id["a"].boxes[0].astype(int)
    assert (x1, y1, x2, y2) == (25, 10, 35, 30)
    assert upright[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].mean() > 200  # the box holds the bright patch
    assert by_id["b"].boxes[0].tolist() == [25, 10, 35, 30]
    assert (by_id["a"].width, by_id["a"].height) == (40, 60)


def test_not_detection_data_and_malformed_files_get_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "plain" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no detection annotations found"):
        scan_detection(tmp_path / "plain")
    bad = tmp_path / "badjson"
    (bad / "annotations").mkdir(parents=True)
    (bad / "annotations" / "instances_train.json").write_text('{"images": [1,')
    with pytest.raises(DataError, match="instances_train.json: not valid JSON"):
        scan_detection(bad)
    y = tmp_path / "y"
    y.mkdir()
    (y / "data.yaml").write_text("train: images/train\n")
    with pytest.raises(DataError, match="data.yaml: a YOLO data.yaml needs 'names'"):
        scan_detection(y)


BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<annotation><filename>&lol3;</filename></annotation>
"""


def test_voc_xml_with_entities_or_a_filename_outside_the_images_is_left_out_by_name(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "voc", {"all": make_scenes(6)})
    xmls = sorted((root / "Annotations").glob("*.xml"))
    xmls[0].write_text(BOMB)  # a billion laughs, in small
    xmls[1].write_text(xmls[1].read_text().replace(f"<filename>{xmls[1].stem}.png</filename>", "<filename>../../secret.png</filename>"))
    found = scan_detection(root, val_fraction=0)
    text = "\n".join(found.problems)
    assert f"{xmls[0]}: XML with EntitiesForbidden" in text
    assert f"{xmls[1]}: <filename> '../../secret.png' leaves the image folder" in text
    assert len(found.train) == 4


def test_coco_file_names_that_leave_the_data_folder_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "secret.png").write_bytes(b"not for graft")
    images = [{"id": 1, "file_name": "1.png", "width": 64, "height": 48}, {"id": 2, "file_name": "../../secret.png", "width": 64, "height": 48},
              {"id": 3, "file_name": str(tmp_path / "secret.png"), "width": 64, "height": 48}, {"id": 4, "file_name": "C:\\\\data\\\\x.png", "width": 64, "height": 48}]
    anns = [{"id": 30 + i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in (1, 2, 3, 4)]
    root = _one_coco(tmp_path, anns, images[:1])
    data = json.loads((root / "data.json").read_text())
    data["images"] = images
    (root / "data.json").write_text(json.dumps(data))
    found = scan_detection(root, val_fraction=0)
    text = "\n".join(found.problems)
    for i in (2, 3, 4):
        assert f"image id {i}: file_name" in text and "leaves the data folder" in text
    assert [s.image_id for s in found.train] == ["1"]
