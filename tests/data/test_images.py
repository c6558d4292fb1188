"""load_image: any file a user's folder may hold becomes 8-bit RGB or an ImageError naming it."""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from graft.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    check_image,
    load_image,
)
from graft.errors import DataError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def noise(h: int = 32, w: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, data: bytes) -> bytes:
    """A PNG written by hand, so its header can declare anything (16-bit RGB, a huge size)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(data))
        + chunk(b"IEND", b"")
    )


def pixels(im: Image.Image) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in px) for px in np.asarray(im).reshape(-1, 3)]


# --- good files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", sorted(IMAGE_EXTENSIONS))
def test_every_listed_extension_loads_as_rgb(tmp_path: Path, ext: str) -> None:
    im = noise()
    if ext == ".pgm":
        im = im.convert("L")
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".pgm": "PPM"}.get(ext)
    path = tmp_path / f"x{ext}"
    im.save(path, format=fmt)
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.size == (48, 32)


def test_rgb_pixels_are_unchanged(tmp_path: Path) -> None:
    im = noise()
    im.save(tmp_path / "x.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "x.png")), np.asarray(im))


def test_grayscale_and_bilevel_become_rgb_with_equal_channels(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8)).save(tmp_path / "l.png")
    assert pixels(load_image(tmp_path / "l.png")) == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    bilevel.save(tmp_path / "b.png")
    assert pixels(load_image(tmp_path / "b.png")) == [(0, 0, 0), (255, 255, 255)]


def test_rgba_is_composited_onto_white_not_stripped(tmp_path: Path) -> None:
    # Fully transparent red must show white; half-transparent black must show mid grey.
    a = np.array([[[255, 0, 0, 0], [0, 0, 0, 128], [0, 0, 255, 255]]], dtype=np.uint8)
    Image.fromarray(a, mode="RGBA").save(tmp_path / "x.png")
    out = pixels(load_image(tmp_path / "x.png"))
    assert out[0] == WHITE
    assert all(abs(v - 127) <= 1 for v in out[1])
    assert out[2] == BLUE


def test_la_is_composited_onto_white(tmp_path: Path) -> None:
    a = np.array([[[0, 0], [0, 255]]], dtype=np.uint8)
    Image.fromarray(a, mode="LA").save(tmp_path / "x.png")
    assert pixels(load_image(tmp_path / "x.png")) == [WHITE, (0, 0, 0)]


def _palette_image() -> Image.Image:
    im = Image.new("P", (3, 1))
    im.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 - 3) * 3)
    im.putdata([0, 1, 2])
    return im


def test_palette_becomes_rgb(tmp_path: Path) -> None:
    _palette_image().save(tmp_path / "x.png")
    assert pixels(load_image(tmp_path / "x.png")) == [RED, GREEN, BLUE]


@pytest.mark.parametrize("ext", [".png", ".gif"])
def test_palette_transparency_is_composited_onto_white(tmp_path: Path, ext: str) -> None:
    _palette_image().save(tmp_path / f"x{ext}", transparency=0)  # red entry is see-through
    with Image.open(tmp_path / f"x{ext}") as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    assert pixels(load_image(tmp_path / f"x{ext}")) == [WHITE, GREEN, BLUE]


def test_rgb_with_transparent_colour_key_is_composited(tmp_path: Path) -> None:
    im = Image.fromarray(np.array([[RED, GREEN]], dtype=np.uint8))
    im.save(tmp_path / "x.png", transparency=RED)
    assert pixels(load_image(tmp_path / "x.png")) == [WHITE, GREEN]


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    cmyk.save(tmp_path / "x.tif")
    cmyk.save(tmp_path / "x.jpg", quality=95)
    assert set(pixels(load_image(tmp_path / "x.tif"))) == {RED}
    r, g, b = np.asarray(load_image(tmp_path / "x.jpg")).reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15


SIXTEEN = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
EXPECTED_8 = [0, 100, 128, 255]  # not 255 for everything above 255, as Image.convert("L") gives


@pytest.mark.parametrize(
    ("dtype", "mode", "fmt"),
    [
        ("<u2", "I;16", "PNG"),
        ("<u2", "I;16", "TIFF"),
        (">u2", "I;16B", "TIFF"),
        ("<i4", "I", "TIFF"),
    ],
)
def test_sixteen_bit_grayscale_is_scaled_to_8_bit(
    tmp_path: Path, dtype: str, mode: str, fmt: str
) -> None:
    path = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(SIXTEEN.astype(dtype)).save(path, format=fmt)
    with Image.open(path) as raw:
        assert raw.mode == mode
    assert pixels(load_image(path)) == [(v, v, v) for v in EXPECTED_8]


def test_sixteen_bit_rgb_png_is_scaled_to_8_bit(tmp_path: Path) -> None:
    row = np.array([[[65535, 32768, 0], [257 * 100, 0, 65535]]], dtype=">u2")
    data = b"\x00" + row.tobytes()  # filter byte 0, then big-endian samples
    (tmp_path / "x.png").write_bytes(png_bytes(2, 1, 16, 2, data))
    assert pixels(load_image(tmp_path / "x.png")) == [(255, 128, 0), (100, 0, 255)]


def test_float_image_is_scaled_by_its_own_range(tmp_path: Path) -> None:
    a = np.array([[-2.0, 0.5, 3.0, np.nan]], dtype=np.float32)
    Image.fromarray(a, mode="F").save(tmp_path / "x.tif")
    assert [p[0] for p in pixels(load_image(tmp_path / "x.tif"))] == [0, 128, 255, 0]


def test_constant_float_image_does_not_divide_by_zero(tmp_path: Path) -> None:
    Image.fromarray(np.full((2, 2), 7.0, dtype=np.float32), mode="F").save(tmp_path / "x.tif")
    assert set(pixels(load_image(tmp_path / "x.tif"))) == {(0, 0, 0)}


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored left becomes displayed top
    stored.save(tmp_path / "x.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "x.jpg")
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    frames[0].save(tmp_path / "x.gif", save_all=True, append_images=frames[1:], duration=100)
    with Image.open(tmp_path / "x.gif") as raw:
        assert raw.n_frames == 2
    assert set(pixels(load_image(tmp_path / "x.gif"))) == {RED}


def test_draft_size_decodes_jpeg_smaller_but_not_below_it(tmp_path: Path) -> None:
    noise(256, 512).save(tmp_path / "x.jpg")
    assert load_image(tmp_path / "x.jpg").size == (512, 256)
    w, h = load_image(tmp_path / "x.jpg", draft_size=64).size
    assert min(w, h) >= 64 and (w, h) != (512, 256)
    assert load_image(tmp_path / "x.jpg", draft_size=1000).size == (512, 256)


def test_draft_size_is_ignored_for_png(tmp_path: Path) -> None:
    noise(256, 512).save(tmp_path / "x.png")
    assert load_image(tmp_path / "x.png", draft_size=64).size == (512, 256)


# --- bad files -----------------------------------------------------------------------------------


def assert_refused(path: Path, reason_part: str, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)
    err = info.value
    assert isinstance(err, DataError)
    assert str(path) in str(err)
    assert reason_part in err.reason
    assert check_image(path, **kwargs) == str(err)
    return err


def test_missing_file(tmp_path: Path) -> None:
    assert_refused(tmp_path / "nope.jpg", "file not found")


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").touch()
    err = assert_refused(tmp_path / "x.jpg", "zero-byte file")
    assert err.reason == "zero-byte file"


def test_text_with_image_extension_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_text("definitely not a JPEG\n" * 10)
    err = assert_refused(tmp_path / "x.jpg", "not an image")
    assert err.reason == "not an image: cannot identify image file"


def test_formats_outside_the_extension_list_are_refused(tmp_path: Path) -> None:
    # An EPS file named .jpg would otherwise be rendered through Ghostscript.
    (tmp_path / "x.jpg").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert_refused(tmp_path / "x.jpg", "not an image")


def test_jpeg_cut_in_half_is_refused(tmp_path: Path) -> None:
    noise(64, 64).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "x.jpg").write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path / "x.jpg", "truncated or corrupt image data")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # not switched on behind the user's back


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    noise(64, 64).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "x.png").write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path / "x.png", "truncated or corrupt image data")


def test_corrupt_compressed_data_is_refused(tmp_path: Path) -> None:
    noise(64, 64).save(tmp_path / "full.png")
    data = bytearray((tmp_path / "full.png").read_bytes())
    data[100:400] = bytes(300)  # zero out part of the IDAT stream, keep the header
    (tmp_path / "x.png").write_bytes(bytes(data))
    assert_refused(tmp_path / "x.png", "")  # any reason, as long as it is an ImageError


def test_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").mkdir()
    assert_refused(tmp_path / "x.jpg", "folder")


def test_broken_symlink_is_refused(tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.jpg", tmp_path / "x.jpg")
    assert_refused(tmp_path / "x.jpg", "broken symlink")


def test_symlinked_file_is_followed(tmp_path: Path) -> None:
    noise().save(tmp_path / "real.png")
    os.symlink(tmp_path / "real.png", tmp_path / "link.png")
    assert load_image(tmp_path / "link.png").size == (48, 32)


def test_pixel_limit(tmp_path: Path) -> None:
    noise(10, 10).save(tmp_path / "x.png")
    err = assert_refused(tmp_path / "x.png", "over the limit", max_pixels=99)
    assert err.reason == (
        "image has 100 pixels, over the limit of 99 "
        "(decompression-bomb guard; raise data.max_pixels to allow it)"
    )
    assert load_image(tmp_path / "x.png", max_pixels=100).size == (10, 10)
    assert load_image(tmp_path / "x.png", max_pixels=None).size == (10, 10)


@pytest.mark.parametrize("width", [10_000, 20_000])  # over Pillow's warning, and error, limits
def test_header_declared_bomb_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(width, 10_000, 8, 0, b"\x00" * 100))  # a few hundred bytes on disk
    assert path.stat().st_size < 1000

    def no_decoding(self):
        raise AssertionError("decoded a decompression bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = assert_refused(path, f"image has {width * 10_000} pixels")
    assert f"over the limit of {DEFAULT_MAX_PIXELS}" in err.reason
    assert caught == []


def test_raised_limit_goes_beyond_pillows_own_without_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shrink Pillow's process-wide limit so tiny files exercise both its warning and its error path.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    noise(8, 8).save(tmp_path / "warns.png")  # 64 pixels: Pillow warns
    noise(10, 10).save(tmp_path / "errors.png")  # 100 > 2 * 40: Pillow refuses
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_image(tmp_path / "warns.png", max_pixels=None).size == (8, 8)
        assert load_image(tmp_path / "errors.png", max_pixels=None).size == (10, 10)
        assert load_image(tmp_path / "errors.png", max_pixels=1000).size == (10, 10)
        assert_refused(tmp_path / "errors.png", "image has 100 pixels", max_pixels=99)
    assert caught == []
    assert Image.MAX_IMAGE_PIXELS == 40  # put back after being lifted


def test_other_warnings_are_still_shown_once(tmp_path: Path) -> None:
    # Python forgets which "default" warnings it has shown whenever the filter list changes, so
    # load_image must not touch the list on every call.
    noise().save(tmp_path / "x.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            load_image(tmp_path / "x.png")
            warnings.warn("from the user's own code", UserWarning)
    assert [str(w.message) for w in caught] == ["from the user's own code"]


def test_check_image(tmp_path: Path) -> None:
    noise().save(tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_text("nope")
    assert check_image(tmp_path / "good.jpg") is None
    message = check_image(tmp_path / "bad.jpg")
    assert message is not None and str(tmp_path / "bad.jpg") in message


def test_image_error_survives_pickling() -> None:
    # DataLoader workers send exceptions between processes.
    err = pickle.loads(pickle.dumps(ImageError("/data/cat/1.jpg", "zero-byte file")))
    assert (err.path, err.reason, str(err)) == (
        "/data/cat/1.jpg",
        "zero-byte file",
        "/data/cat/1.jpg: zero-byte file",
    )
