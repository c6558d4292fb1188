"""Scanning a user's data folder: layouts, classes, deterministic splits, bad inputs reported."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graft.data.folder import (
    DatasetSplits,
    Sample,
    Skipped,
    scan_class_folders,
    scan_folder,
)
from graft.errors import DataError


def image(path: Path, value: int = 0, size: int = 8) -> Path:
    """A tiny valid image; ``value`` makes files distinguishable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value % 256, dtype=np.uint8)).save(path)
    return path


def make_classes(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image(root / name / f"{i:03d}{ext}", i)
    return root


def names(samples: list[Sample]) -> list[str]:
    return sorted(f"{s.path.parent.name}/{s.path.name}" for s in samples)


def reasons(skipped: list[Skipped]) -> dict[str, str]:
    return {s.path.name: s.reason for s in skipped}


# --- class-folders layout ------------------------------------------------------------------------


def test_class_folders_classes_labels_and_paths(tmp_path: Path) -> None:
    make_classes(tmp_path, {"dog": 5, "cat": 5, "Bird": 5})
    ds = scan_folder(tmp_path, val_fraction=0.2, workers=2)
    assert ds.layout == "class-folders"
    assert ds.classes == ["Bird", "cat", "dog"]  # plain sorted()
    assert ds.root == tmp_path
    for s in ds.train + ds.val + ds.test:
        assert s.path.is_absolute()
        assert ds.classes[s.label] == s.path.parent.name
    assert ds.counts() == {
        "train": {"Bird": 4, "cat": 4, "dog": 4},
        "val": {"Bird": 1, "cat": 1, "dog": 1},
        "test": {"Bird": 0, "cat": 0, "dog": 0},
    }
    assert ds.skipped == [] and ds.warnings == []


def test_stratified_split_is_disjoint_and_complete(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 10, "b": 20})
    ds = scan_folder(tmp_path, val_fraction=0.2, test_fraction=0.1)
    counts = ds.counts()
    assert counts["val"] == {"a": 2, "b": 4}
    assert counts["test"] == {"a": 1, "b": 2}
    assert counts["train"] == {"a": 7, "b": 14}
    paths = [s.path for s in ds.train + ds.val + ds.test]
    assert len(set(paths)) == len(paths) == 30


def test_same_seed_same_split_other_seed_other_split(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 20, "b": 20})
    first = scan_folder(tmp_path, seed=0, workers=1)
    again = scan_folder(tmp_path, seed=0, workers=2)
    other = scan_folder(tmp_path, seed=1)
    assert first.to_json() == again.to_json()
    assert names(first.val) != names(other.val)
    assert first.counts() == other.counts()


def test_a_class_split_does_not_depend_on_other_classes(tmp_path: Path) -> None:
    make_classes(tmp_path / "two", {"a": 20, "b": 20})
    make_classes(tmp_path / "three", {"A": 7, "a": 20, "b": 20})  # shifts a's label
    two, three = scan_folder(tmp_path / "two"), scan_folder(tmp_path / "three")
    assert two.classes.index("a") != three.classes.index("a")
    assert [n for n in names(two.val) if n.startswith("a/")] == [
        n for n in names(three.val) if n.startswith("a/")
    ]


def test_splits_list_samples_sorted_by_class_then_path(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 12, "b": 12})
    ds = scan_folder(tmp_path)
    for split in (ds.train, ds.val):
        assert split == sorted(split, key=lambda s: (s.label, str(s.path)))


def test_small_classes_keep_one_for_training_and_get_a_warning(tmp_path: Path) -> None:
    make_classes(tmp_path, {"one": 1, "two": 2, "three": 3, "many": 30})
    ds = scan_folder(tmp_path, val_fraction=0.1, test_fraction=0.05)
    counts = ds.counts()
    assert counts["train"]["one"] == 1 and counts["val"]["one"] == 0
    assert counts["train"]["two"] == 2
    # n >= 3 with a fraction > 0 gets at least one of each, and train keeps one.
    assert (counts["train"]["three"], counts["val"]["three"], counts["test"]["three"]) == (1, 1, 1)
    assert (counts["val"]["many"], counts["test"]["many"]) == (3, 2)
    short = [w for w in ds.warnings if "too few to split" in w]
    assert len(short) == 2
    assert any(str(tmp_path / "one") in w for w in short)
    assert any(str(tmp_path / "two") in w for w in short)


def test_two_images_with_large_fractions_still_train_on_one(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 2, "b": 4})
    ds = scan_folder(tmp_path, val_fraction=0.5, test_fraction=0.4)
    assert ds.counts()["train"]["a"] == 1
    assert ds.counts()["train"]["b"] >= 1


def test_zero_val_fraction_puts_everything_in_train(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 5, "b": 5})
    ds = scan_folder(tmp_path, val_fraction=0.0)
    assert len(ds.train) == 10 and ds.val == [] and ds.warnings == []


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.0), (1.0, 0.0), (0.6, 0.4), (0.2, 1.5)])
def test_bad_fractions_are_refused(tmp_path: Path, val: float, test: float) -> None:
    make_classes(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DataError, match="fraction"):
        scan_folder(tmp_path, val_fraction=val, test_fraction=test)


def test_nested_folders_are_found_and_sorted_by_relative_path(tmp_path: Path) -> None:
    make_classes(tmp_path, {"b": 3})
    for rel in ["z.png", "sub/a.png", "sub/deeper/x.png", "a.png"]:
        image(tmp_path / "a" / rel)
    classes, samples, _, _ = scan_class_folders(tmp_path)
    got = [s.path.relative_to(tmp_path / "a").as_posix() for s in samples if s.label == 0]
    assert got == ["a.png", "sub/a.png", "sub/deeper/x.png", "z.png"]


# --- files that are left out ---------------------------------------------------------------------


def test_hidden_files_and_folders_are_ignored_silently(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\x00\x01junk")
    image(tmp_path / "a" / ".hidden.png")
    image(tmp_path / "a" / ".ipynb_checkpoints" / "x.png")
    (tmp_path / "a" / ".ipynb_checkpoints" / "broken.jpg").write_text("x")
    image(tmp_path / ".cache" / "x.png")  # a hidden folder is not a class
    image(tmp_path / "__MACOSX" / "a" / "._x.png")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    ds = scan_folder(tmp_path)
    assert ds.classes == ["a", "b"]
    assert len(ds.train + ds.val) == 6
    assert ds.skipped == [] and ds.warnings == []


def test_bad_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 4, "b": 4}, ext=".jpg")
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "a" / "README").write_text("hello")
    (tmp_path / "a" / "empty.jpg").touch()
    (tmp_path / "b" / "text.jpg").write_text("not really a jpeg")
    whole = (tmp_path / "b" / "000.jpg").read_bytes()
    (tmp_path / "b" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    ds = scan_folder(tmp_path, workers=2)
    got = reasons(ds.skipped)
    assert got["notes.txt"] == "not an image file (extension .txt)"
    assert got["README"] == "not an image file (no extension)"
    assert got["empty.jpg"] == "zero-byte file"
    assert got["text.jpg"] == "not an image: cannot identify image file"
    assert got["cut.jpg"].startswith("truncated or corrupt image data")
    assert len(ds.skipped) == 5
    assert all(s.path.is_absolute() for s in ds.skipped)
    kept = {s.path for s in ds.train + ds.val}
    assert kept.isdisjoint(s.path for s in ds.skipped) and len(kept) == 8


def test_upper_case_extensions_are_images(tmp_path: Path) -> None:
    image(tmp_path / "a" / "x.PNG")
    image(tmp_path / "b" / "y.Png")
    ds = scan_folder(tmp_path, val_fraction=0.0)
    assert len(ds.train) == 2 and ds.skipped == []


def test_too_many_pixels_are_skipped(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 2, "b": 2})
    image(tmp_path / "a" / "big.png", size=20)
    ds = scan_folder(tmp_path, max_pixels=100)
    assert reasons(ds.skipped) == {
        "big.png": "image has 400 pixels, over the limit of 100 "
        "(decompression-bomb guard; raise data.max_pixels to allow it)"
    }
    assert len(scan_folder(tmp_path, max_pixels=None).skipped) == 0


def test_files_directly_in_root_are_warned_about(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 2, "b": 2})
    image(tmp_path / "stray.png")
    ds = scan_folder(tmp_path)
    assert len(ds.train + ds.val) == 4
    assert any(str(tmp_path / "stray.png") in w for w in ds.warnings)
    assert ds.skipped == []


def test_symlinks(tmp_path: Path) -> None:
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    make_classes(data, {"a": 2, "b": 2})
    image(elsewhere / "real.png")
    image(elsewhere / "dir" / "inner.png")
    os.symlink(elsewhere / "real.png", data / "a" / "link.png")
    os.symlink(elsewhere / "dir", data / "b" / "linked_dir")
    os.symlink(tmp_path / "gone.png", data / "a" / "broken.png")
    os.symlink(data / "b", data / "b" / "loop")  # must not recurse forever
    ds = scan_folder(data, val_fraction=0.0)
    kept = {s.path.relative_to(data).as_posix() for s in ds.train}
    assert "a/link.png" in kept and "b/linked_dir/inner.png" in kept
    assert len(kept) == 6
    assert reasons(ds.skipped)["broken.png"].startswith("broken symlink")


def test_empty_class_folder_is_dropped_with_a_warning(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.jpg").write_text("nope")
    ds = scan_folder(tmp_path)
    assert ds.classes == ["a", "b"]
    for name in ("empty", "junk"):
        assert any(str(tmp_path / name) in w and "no usable images" in w for w in ds.warnings)


# --- folders that cannot be used -----------------------------------------------------------------


def test_single_class_is_refused(tmp_path: Path) -> None:
    make_classes(tmp_path, {"cat": 3})
    with pytest.raises(DataError, match=r"at least 2 classes; found only 'cat' in ") as info:
        scan_folder(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_single_usable_class_after_dropping_is_refused(tmp_path: Path) -> None:
    make_classes(tmp_path, {"cat": 3})
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "x.jpg").touch()
    with pytest.raises(DataError, match="found only 'cat'"):
        scan_folder(tmp_path)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        scan_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_root_that_is_a_file(tmp_path: Path) -> None:
    image(tmp_path / "x.png")
    with pytest.raises(DataError, match="not a folder"):
        scan_folder(tmp_path / "x.png")


def test_no_class_folders(tmp_path: Path) -> None:
    image(tmp_path / "x.png")
    with pytest.raises(DataError, match="no class folders in") as info:
        scan_folder(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_no_usable_images_at_all(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").touch()
    with pytest.raises(DataError, match="no usable images in .*2 files skipped"):
        scan_folder(tmp_path)


def test_strict_mode_refuses_any_skipped_file(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 3, "b": 3})
    for i in range(7):
        (tmp_path / "a" / f"bad{i}.jpg").touch()
    (tmp_path / "b" / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        scan_folder(tmp_path, strict=True)
    msg = str(info.value)
    assert msg.startswith("8 files cannot be used")
    assert f"{tmp_path / 'a' / 'bad0.jpg'}: zero-byte file" in msg
    assert "(and 3 more)" in msg and "without --strict" in msg
    assert len(scan_folder(tmp_path).skipped) == 8  # without strict: skipped, not raised


def test_strict_mode_passes_a_clean_folder(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 3, "b": 3})
    assert len(scan_folder(tmp_path, strict=True).train) == 4


# --- split-folders layout ------------------------------------------------------------------------


def test_split_folders_with_val_and_test(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 5, "b": 4})
    make_classes(tmp_path / "val", {"a": 2, "b": 1})
    make_classes(tmp_path / "test", {"a": 1, "b": 3})
    ds = scan_folder(tmp_path, val_fraction=0.5, test_fraction=0.3)  # fractions unused here
    assert ds.layout == "split-folders"
    assert ds.classes == ["a", "b"]
    assert ds.counts() == {
        "train": {"a": 5, "b": 4},
        "val": {"a": 2, "b": 1},
        "test": {"a": 1, "b": 3},
    }
    assert all(s.path.parts[-3] == "train" for s in ds.train)
    assert all(s.path.parts[-3] == "val" for s in ds.val)
    assert all(ds.classes[s.label] == s.path.parent.name for s in ds.train + ds.val + ds.test)


@pytest.mark.parametrize("alias", ["valid", "validation"])
def test_split_folders_val_aliases(tmp_path: Path, alias: str) -> None:
    make_classes(tmp_path / "train", {"a": 3, "b": 3})
    make_classes(tmp_path / alias, {"a": 1, "b": 1})
    ds = scan_folder(tmp_path)
    assert ds.layout == "split-folders"
    assert all(s.path.parts[-3] == alias for s in ds.val) and len(ds.val) == 2


def test_split_folders_without_val_split_train(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 10, "b": 10})
    make_classes(tmp_path / "test", {"a": 2, "b": 2})
    ds = scan_folder(tmp_path, val_fraction=0.2, seed=3)
    assert ds.layout == "split-folders"
    assert ds.counts()["val"] == {"a": 2, "b": 2}
    assert ds.counts()["train"] == {"a": 8, "b": 8}
    assert all(s.path.parts[-3] == "train" for s in ds.val)  # carved out of train/
    assert all(s.path.parts[-3] == "test" for s in ds.test) and len(ds.test) == 4
    assert names(ds.val) == names(scan_folder(tmp_path, val_fraction=0.2, seed=3).val)


def test_split_folders_train_only_ignores_test_fraction_with_warning(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 10, "b": 10})
    ds = scan_folder(tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert ds.layout == "split-folders"
    assert ds.test == [] and len(ds.val) == 4
    assert any("test_fraction" in w for w in ds.warnings)


@pytest.mark.parametrize("split", ["val", "test"])
def test_class_missing_from_train_is_refused(tmp_path: Path, split: str) -> None:
    make_classes(tmp_path / "train", {"a": 3, "b": 3})
    make_classes(tmp_path / split, {"a": 1, "b": 1, "zebra": 1})
    with pytest.raises(DataError, match="'zebra'") as info:
        scan_folder(tmp_path)
    assert str(tmp_path / split / "zebra") in str(info.value)


def test_class_with_only_broken_training_images_is_refused_if_val_has_it(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 3, "b": 3})
    (tmp_path / "train" / "c").mkdir()
    (tmp_path / "train" / "c" / "x.jpg").touch()
    make_classes(tmp_path / "val", {"a": 1, "c": 1})
    with pytest.raises(DataError, match="'c' has images in"):
        scan_folder(tmp_path)


def test_split_folders_warn_about_classes_missing_from_val(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 3, "b": 3})
    make_classes(tmp_path / "val", {"a": 1})
    (tmp_path / "README.md").write_text("about my data")
    ds = scan_folder(tmp_path)
    assert ds.counts()["val"] == {"a": 1, "b": 0}
    assert any(str(tmp_path / "val") in w and "b" in w for w in ds.warnings)
    assert any(str(tmp_path / "README.md") in w for w in ds.warnings)


def test_split_folders_with_two_val_folders_is_refused(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 3, "b": 3})
    make_classes(tmp_path / "val", {"a": 1})
    make_classes(tmp_path / "valid", {"a": 1})
    with pytest.raises(DataError, match="val/ and valid/"):
        scan_folder(tmp_path)


def test_split_folders_skipped_and_strict_cover_every_split(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 3, "b": 3})
    make_classes(tmp_path / "val", {"a": 1, "b": 1})
    (tmp_path / "val" / "a" / "bad.jpg").touch()
    assert reasons(scan_folder(tmp_path).skipped) == {"bad.jpg": "zero-byte file"}
    with pytest.raises(DataError, match="bad.jpg"):
        scan_folder(tmp_path, strict=True)


def test_a_train_class_among_other_classes_means_class_folders(tmp_path: Path) -> None:
    make_classes(tmp_path, {"train": 3, "cat": 3})
    ds = scan_folder(tmp_path)
    assert ds.layout == "class-folders" and ds.classes == ["cat", "train"]


# --- saving a scan -------------------------------------------------------------------------------


def test_json_round_trip_with_relative_paths(tmp_path: Path) -> None:
    data = make_classes(tmp_path / "data", {"a": 6, "b": 6})
    (data / "a" / "bad.jpg").touch()
    ds = scan_folder(data, val_fraction=0.2, test_fraction=0.2)
    record = json.loads(json.dumps(ds.to_json()))  # JSON-able
    assert record["classes"] == ["a", "b"] and record["layout"] == "class-folders"
    assert record["counts"] == ds.counts()
    assert record["skipped"] == [{"path": "a/bad.jpg", "reason": "zero-byte file"}]
    assert all(not p.startswith("/") and "\\" not in p for p, _ in record["train"])
    assert DatasetSplits.from_json(record) == ds

    moved = shutil.move(str(data), str(tmp_path / "moved"))
    again = DatasetSplits.from_json(record, root=Path(moved))
    assert again.root == Path(moved)
    assert again.counts() == ds.counts()
    assert all(s.path.is_file() for s in again.train + again.val + again.test)


@pytest.mark.parametrize(
    "record",
    [{}, {"root": "/x", "layout": "class-folders", "classes": ["a"], "train": [["x.png", 3]]}],
)
def test_malformed_json_is_a_data_error(record: dict) -> None:
    with pytest.raises(DataError, match="malformed dataset record"):
        DatasetSplits.from_json(record)


# --- scan_class_folders (evaluation) -------------------------------------------------------------


def test_scan_class_folders_with_the_models_classes(tmp_path: Path) -> None:
    make_classes(tmp_path, {"cat": 2, "dog": 3})
    model_classes = ["dog", "cat", "bird"]  # the model's order, not sorted
    classes, samples, skipped, warnings = scan_class_folders(tmp_path, classes=model_classes)
    assert classes == model_classes
    got = sorted((s.path.parent.name, s.label) for s in samples)
    assert got == [("cat", 1)] * 2 + [("dog", 0)] * 3
    assert skipped == []
    assert any("'bird'" in w for w in warnings)


def test_scan_class_folders_single_class_is_fine_with_the_models_classes(tmp_path: Path) -> None:
    make_classes(tmp_path, {"cat": 2})
    classes, samples, _, _ = scan_class_folders(tmp_path, classes=["cat", "dog"])
    assert [s.label for s in samples] == [0, 0]


def test_scan_class_folders_unknown_class_is_refused(tmp_path: Path) -> None:
    make_classes(tmp_path, {"cat": 2, "dog": 2, "zebra": 1})
    with pytest.raises(DataError) as info:
        scan_class_folders(tmp_path, classes=["cat", "dog"])
    msg = str(info.value)
    assert str(tmp_path / "zebra") in msg and "cat, dog" in msg


def test_scan_class_folders_ignores_an_empty_folder_as_training_does(tmp_path: Path) -> None:
    make_classes(tmp_path, {"cat": 2, "dog": 1})
    (tmp_path / "empty").mkdir()
    _, samples, _, warnings = scan_class_folders(tmp_path, classes=["cat", "dog"])
    assert len(samples) == 3 and any(f"ignoring empty folder {tmp_path / 'empty'}" in w for w in warnings)


def test_scan_class_folders_of_a_split_layout_evaluates_its_held_out_split(tmp_path: Path) -> None:
    """train/ val/ test/, the layout graft train takes: test, else val, is what eval measures."""
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        make_classes(tmp_path / split, {"cat": n, "dog": n})
    _, samples, _, warnings = scan_class_folders(tmp_path, classes=["cat", "dog"])
    assert {s.path.parent.parent.name for s in samples} == {"test"} and len(samples) == 2
    assert warnings[0] == f"{tmp_path} holds splits: evaluating test/"
    shutil.rmtree(tmp_path / "test")
    _, samples, _, _ = scan_class_folders(tmp_path, classes=["cat", "dog"])
    assert {s.path.parent.parent.name for s in samples} == {"val"}


def test_scan_class_folders_without_classes_uses_the_folders(tmp_path: Path) -> None:
    make_classes(tmp_path, {"b": 2, "a": 1})
    (tmp_path / "a" / "x.txt").write_text("x")
    classes, samples, skipped, _ = scan_class_folders(tmp_path)
    assert classes == ["a", "b"]
    assert [s.label for s in samples] == [0, 1, 1]
    assert reasons(skipped) == {"x.txt": "not an image file (extension .txt)"}


def test_scan_class_folders_strict_and_no_usable_images(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "x.jpg").touch()
    with pytest.raises(DataError, match="without --strict"):
        scan_class_folders(tmp_path, classes=["cat", "dog"], strict=True)
    with pytest.raises(DataError, match="no usable images"):
        scan_class_folders(tmp_path, classes=["cat", "dog"])
