"""Fuzzed image files for ``load_image``: mutated and truncated files, headers that declare huge
sizes, decompression bombs, and the images installed packages ship, replayed. Every case is an
8-bit RGB picture or an ImageError naming the file; nothing over the pixel limit is decoded."""

from __future__ import annotations

import io
import os
import struct
import sysconfig
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from fuzzing import FUZZ, MESSAGE_LIMIT
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps, TiffImagePlugin

from data.test_images import noise, png_bytes
from graft.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image


def _saved(im: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


def _generated_seeds() -> list[tuple[str, bytes]]:
    """One small file per format and mode graft reads, as Pillow writes them."""
    im = noise(12, 16)
    return [
        (".png", _saved(im, "PNG")), (".png", _saved(im.convert("P"), "PNG")), (".png", _saved(im.convert("LA"), "PNG")),
        (".jpg", _saved(im, "JPEG", quality=90)), (".jpg", _saved(im, "JPEG", progressive=True)), (".jpg", _saved(im.convert("CMYK"), "JPEG")),
        (".gif", _saved(im.convert("P"), "GIF")), (".bmp", _saved(im, "BMP")), (".bmp", _saved(im.convert("1"), "BMP")),
        (".tif", _saved(im, "TIFF")), (".tif", _saved(im, "TIFF", compression="tiff_lzw")), (".tif", _saved(im.convert("I;16"), "TIFF")),
        (".webp", _saved(im, "WEBP")), (".webp", _saved(im, "WEBP", lossless=True)), (".ppm", _saved(im, "PPM")), (".pgm", _saved(im.convert("L"), "PPM")),
    ]


def _shipped_images() -> list[Path]:
    """Image files that installed packages ship (scikit-image's data, matplotlib's sample data and
    icons, test baselines). Pillow's own test images are not among them: its wheel has none."""
    root = Path(sysconfig.get_paths()["purelib"])
    found = []
    for ext in (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"):
        found += root.glob(f"*/**/*{ext}")
    return sorted(p for p in found if p.is_file())


SEEDS = _generated_seeds()
SHIPPED = _shipped_images()
SMALL_SHIPPED = [(p.suffix.lower(), p.read_bytes()) for p in SHIPPED if p.stat().st_size <= 24_000]


def _load(path: Path, **kwargs) -> Image.Image | ImageError:
    try:
        return load_image(path, **kwargs)
    except ImageError as e:
        return e


def _assert_rgb_or_named(outcome: Image.Image | ImageError, path: Path, max_pixels: int | None) -> None:
    if isinstance(outcome, ImageError):
        assert str(outcome).startswith(f"{path}: ") and outcome.path == str(path)
        assert len(str(outcome)) <= MESSAGE_LIMIT
        return
    assert outcome.mode == "RGB"
    w, h = outcome.size
    assert w >= 1 and h >= 1 and (max_pixels is None or w * h <= max_pixels)
    assert np.asarray(outcome).shape == (h, w, 3)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-images")


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    """A seed file, cut short and/or with bytes changed (mostly in its header) or inserted."""
    ext, data = draw(st.sampled_from(SEEDS + SMALL_SHIPPED))
    data = bytearray(data)
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, min(len(data), 96) - 1) if draw(st.booleans()) else st.integers(0, len(data) - 1))
        data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]) | st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return ext, bytes(data)


@settings(FUZZ, max_examples=300)
@given(case=mutated(), max_pixels=st.sampled_from([DEFAULT_MAX_PIXELS, 100]), draft=st.sampled_from([None, 8]))
def test_mutated_and_truncated_files_load_as_rgb_or_fail_naming_the_file(workdir: Path, case: tuple[str, bytes], max_pixels: int, draft: int | None) -> None:
    ext, data = case
    path = workdir / f"mutated{ext}"
    path.write_bytes(data)
    _assert_rgb_or_named(_load(path, max_pixels=max_pixels, draft_size=draft), path, max_pixels)


# --- huge declared sizes and decompression bombs ------------------------------------------------------


def _bmp(w: int, h: int) -> bytes:
    data = bytearray(_saved(noise(3, 5), "BMP"))
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def _gif(w: int, h: int) -> bytes:
    data = bytearray(_saved(noise(3, 5).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", w, h)  # the logical screen
    at = data.index(b"\x2c", 13)  # the image descriptor
    data[at + 5 : at + 9] = struct.pack("<HH", w, h)
    return bytes(data)


def _jpeg(w: int, h: int) -> bytes:
    data = bytearray(_saved(noise(3, 5), "JPEG"))
    at = data.index(b"\xff\xc0")  # start of frame: precision, height, width
    data[at + 5 : at + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _tiff(w: int, h: int) -> bytes:
    """A grayscale TIFF written by hand: one strip of 16 bytes, whatever size its tags declare."""
    tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 12 * 9 + 4), (277, 3, 1), (278, 4, h), (279, 4, 16)]
    entries = b"".join(struct.pack("<HHII", tag, 4, 1, v) if kind == 4 else struct.pack("<HHIHH", tag, 3, 1, v, 0) for tag, kind, v in tags)
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + entries + struct.pack("<I", 0) + bytes(16)


HEADERS = {
    ".png": (lambda w, h: png_bytes(w, h, 8, 2, b""), 2**31 - 1),
    ".bmp": (_bmp, 2**31 - 1),
    ".gif": (_gif, 2**16 - 1),
    ".jpg": (_jpeg, 2**16 - 1),
    ".ppm": (lambda w, h: f"P6\n{w} {h}\n255\n".encode() + bytes(45), 2**31 - 1),
    ".tif": (_tiff, 2**31 - 1),
}


@st.composite
def declared(draw) -> tuple[str, int, int]:
    ext = draw(st.sampled_from(sorted(HEADERS)))
    most = HEADERS[ext][1]
    side = st.one_of(st.integers(1, most), st.sampled_from([1, most, 9_459, 9_460, 65_535]).filter(lambda v: v <= most))
    return ext, draw(side), draw(side)


@settings(FUZZ, max_examples=120)
@given(case=declared(), max_pixels=st.sampled_from([DEFAULT_MAX_PIXELS, 1_000, 1]))
@example(case=(".png", 9_460, 9_460), max_pixels=DEFAULT_MAX_PIXELS)  # just over Pillow's limit too
@example(case=(".png", 2**31 - 1, 2**31 - 1), max_pixels=DEFAULT_MAX_PIXELS)
def test_a_declared_size_over_the_limit_is_refused_by_name_before_decoding(workdir: Path, case: tuple[str, int, int], max_pixels: int) -> None:
    ext, w, h = case
    path = workdir / f"declared{ext}"
    path.write_bytes(HEADERS[ext][0](w, h))
    decoded = []

    def recorded(load):
        def recording(self, *args):
            decoded.append(self.size)
            return load(self, *args)

        return recording

    with mock.patch.object(ImageFile.ImageFile, "load", recorded(ImageFile.ImageFile.load)), \
            mock.patch.object(TiffImagePlugin.TiffImageFile, "load", recorded(TiffImagePlugin.TiffImageFile.load)):
        outcome = _load(path, max_pixels=max_pixels)
    _assert_rgb_or_named(outcome, path, max_pixels)
    if w * h > max_pixels:
        assert isinstance(outcome, ImageError)
        assert outcome.reason.startswith(f"image has {w * h} pixels, over the limit of {max_pixels} (decompression-bomb guard")
        assert decoded == []


@settings(FUZZ, max_examples=40)
@given(w=st.integers(1, 300), h=st.integers(1, 300), max_pixels=st.integers(1, 90_000), compressed=st.booleans())
def test_a_real_image_loads_exactly_when_its_pixels_are_within_the_limit(workdir: Path, w: int, h: int, max_pixels: int, compressed: bool) -> None:
    """A complete, valid file (zeros compress about 1000:1: a bomb in small) is refused by the
    guard exactly when it has more pixels than ``max_pixels``, and otherwise decodes whole."""
    path = workdir / "bomb.png"
    rows = bytes(w + 1) * h if compressed else (b"\x00" + bytes(i % 256 for i in range(w))) * h  # filter byte + w gray values
    path.write_bytes(png_bytes(w, h, 8, 0, rows))
    outcome = _load(path, max_pixels=max_pixels)
    if w * h > max_pixels:
        assert isinstance(outcome, ImageError) and outcome.reason.startswith(f"image has {w * h} pixels, over the limit of {max_pixels}")
    else:
        assert isinstance(outcome, Image.Image) and outcome.size == (w, h)
        expected = np.zeros((h, w), np.uint8) if compressed else np.tile(np.arange(w) % 256, (h, 1)).astype(np.uint8)
        assert (np.asarray(outcome) == expected[:, :, None]).all()


# --- round trip ------------------------------------------------------------------------------------------

LOSSLESS = [("PNG", ".png", {}), ("BMP", ".bmp", {}), ("TIFF", ".tif", {}), ("TIFF", ".tiff", {"compression": "tiff_lzw"}), ("PPM", ".ppm", {}), ("WEBP", ".webp", {"lossless": True, "exact": True})]


@settings(FUZZ, max_examples=40)
@given(
    fmt=st.sampled_from(LOSSLESS),
    mode=st.sampled_from(["RGB", "L", "RGBA"]),
    h=st.integers(1, 16),
    w=st.integers(1, 16),
    seed=st.integers(0, 2**32 - 1),
)
def test_lossless_files_read_back_exactly(workdir: Path, fmt: tuple, mode: str, h: int, w: int, seed: int) -> None:
    name, ext, options = fmt
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(pixels)
    if mode == "L":
        im, pixels = im.convert("L"), np.repeat(np.asarray(im.convert("L"))[:, :, None], 3, 2)
    elif mode == "RGBA":
        im = im.convert("RGBA")  # fully opaque: compositing onto white changes nothing
    if name == "PPM" and mode == "RGBA":
        im = im.convert("RGB")
    path = workdir / f"roundtrip{ext}"
    im.save(path, name, **options)
    got = load_image(path)
    assert got.mode == "RGB" and got.size == (w, h)
    assert np.array_equal(np.asarray(got), pixels)


# --- replayed files ------------------------------------------------------------------------------------------


def test_images_that_installed_packages_ship_load_as_pillow_sees_them(tmp_path: Path) -> None:
    """Every such file loads upright as RGB at Pillow's own size, or is refused by name; cut in
    half, each loads or is refused by name too (never an exception of another kind)."""
    if not SHIPPED:
        pytest.skip("no installed package ships image files")
    for path in SHIPPED:
        outcome = _load(path)
        _assert_rgb_or_named(outcome, path, DEFAULT_MAX_PIXELS)
        if isinstance(outcome, Image.Image):
            with Image.open(path) as raw:
                assert outcome.size == ImageOps.exif_transpose(raw).size
        half = tmp_path / f"half{path.suffix}"
        half.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        _assert_rgb_or_named(_load(half), half, DEFAULT_MAX_PIXELS)


@pytest.mark.parametrize("name", ["a\0b.png", "\ud800.png"])
def test_a_file_name_the_system_cannot_take_is_refused_by_name(tmp_path: Path, name: str) -> None:
    """A COCO ``file_name`` or a YOLO list line can hold any string; os.stat raised ValueError
    (UnicodeEncodeError for a lone surrogate) out of load_image before the fix."""
    path = os.path.join(tmp_path, name)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.path == path and info.value.reason.startswith("not a usable file name")
